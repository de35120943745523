"""Store and forward: frames the object store refused, kept in a local store until it takes
them again (:class:`Spool`, used by :class:`~framepipe.stream.sinks.FrameStore`).

Guarantees:

* A frame is kept under the key it was meant to have; once the object store is back, an
  uploader thread writes it there under that key and only then deletes the local copy, so a
  frame is never in neither place (it may briefly be in both).
* The uploader tries every ``retry_every`` seconds while anything is kept; a round stops at the
  first refusal (the store is still down) and says so in the log at most once a minute. Its
  log lines name the spool's folder and the object store, so stations that each keep frames
  in a folder of their own are told apart.
* Frames kept by an earlier run (the process stopped during an outage, or the pipeline was
  stopped and started again) are uploaded by the next one: :meth:`Spool.start` starts the
  uploader when the local store holds anything.
* :meth:`Spool.close` stops the uploader; what is still kept stays on disk for the next run.
* A store that refused a frame is *away* (:attr:`Spool.away`, set by :meth:`Spool.refused`)
  until the uploader gets a kept frame into it: meanwhile the frame store keeps every frame
  here without trying the store, so a store that hangs (each try waits out its read timeout)
  holds back only the frames that found it away, not every frame after them. Going away is
  logged once, as a warning naming the error; coming back by the uploader's line.
* A kept frame the target refuses for its key (:class:`~framepipe.errors.InvalidKeyError`,
  :class:`~framepipe.errors.ObjectKeyConflictError`: it would be refused again, outage or
  not) is set aside: it stays in the local store and is not tried again by this run (the next
  run tries it once more, so a conflict cleared meanwhile lets it go), ``refused(key,
  reason)`` is called, and the round goes on with the next frame. Each round that sets
  frames aside says so in one error naming the first key and why. A frame set aside never
  holds back the frames after it, nor keeps the store *away*.
* At most ``max_bytes`` are kept (a long outage must not fill the disk): a frame past that is
  refused with an :class:`~framepipe.errors.ObjectStoreError` saying the spool is full.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from framepipe.backends.objects import ObjectInfo, ObjectStore
from framepipe.errors import InvalidKeyError, ObjectKeyConflictError, ObjectStoreError
from framepipe.logs import ComponentLogger, Repeats
from framepipe.urls import safe_url

__all__ = ["Spool"]


class Spool:
    """Frames kept in ``local`` until ``target`` takes them; ``uploaded(count, keys)`` is
    called from the uploader thread after each round that uploaded something, ``refused(key,
    reason)`` for each kept frame set aside (refused for its key)."""

    def __init__(
        self,
        local: ObjectStore,
        target: ObjectStore,
        *,
        retry_every: float,
        uploaded: Callable[[int, list[str]], None],
        log: ComponentLogger,
        max_bytes: int,
        refused: Callable[[str, str], None] | None = None,
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, not {max_bytes}")
        self.local = local
        self.max_bytes = max_bytes
        self._bytes: int | None = None  # what is kept, counted at the first use
        self.target = target
        self.retry_every = retry_every
        self._uploaded = uploaded
        self._on_refused = refused
        self._set_aside: set[str] = set()  # kept frames the target refused for their keys
        self._log = log
        self._refusals = Repeats(60.0)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._away = False

    @property
    def away(self) -> bool:
        """True from a refusal (:meth:`refused`) until a kept frame was uploaded."""
        return self._away

    def refused(self, key: str, error: ObjectStoreError) -> None:
        """The target refused the frame ``key`` (kept here): it is away until the uploader
        gets a kept frame into it; said once."""
        with self._lock:
            if self._away:
                return
            self._away = True
        self._log.warning(
            "the object store %s refused frame %s (%s): frames go to %s until it takes them "
            "again, tried every %gs",
            safe_url(self.target.url),
            key,
            error,
            self.local.url,
            self.retry_every,
        )

    def keep(self, key: str, data: bytes) -> None:
        """Keep ``data`` under ``key`` until the target takes it. Raises what the local store
        raises, or :class:`ObjectStoreError` when the spool is full: then the frame is lost,
        and the caller says so."""
        with self._lock:
            kept = self._kept_bytes()
            if kept + len(data) > self.max_bytes:
                raise ObjectStoreError(
                    f"the frame spool {self.local.url} is full ({kept} of {self.max_bytes} "
                    f"bytes): frame {key!r} not kept"
                )
            self._bytes = kept + len(data)
        try:
            self.local.put(key, data)
        except BaseException:
            with self._lock:
                self._bytes = max(0, self._kept_bytes() - len(data))
            raise
        self._ensure_uploader()

    def _kept_bytes(self) -> int:
        if self._bytes is None:
            self._bytes = sum(info.size for info in self.local.list())
        return self._bytes

    def start(self) -> None:
        """Start the uploader if frames of an earlier run are kept; after :meth:`close` too
        (the same frame store in a pipeline started again)."""
        self._stop.clear()
        self._set_aside.clear()  # tried again: the conflict may be gone
        if next(iter(self.local.list()), None) is not None:
            self._ensure_uploader()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the uploader (its round in progress ends at the next frame)."""
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def drain(self) -> int:
        """Upload what is kept, in key order, until the target refuses one (a frame refused
        for its key is set aside, and the round goes on); returns how many went."""
        done: list[str] = []
        refused: list[tuple[str, ObjectStoreError]] = []
        for info in sorted(self._pending(), key=lambda i: i.key):
            if self._stop.is_set():
                break
            try:
                self.target.put(info.key, self.local.get(info.key))
            except (InvalidKeyError, ObjectKeyConflictError) as exc:
                with self._lock:
                    self._set_aside.add(info.key)
                refused.append((info.key, exc))
                if self._on_refused is not None:
                    self._on_refused(info.key, str(exc))
                continue
            except ObjectStoreError as exc:
                held = self._refusals.admit("target")
                if held is not None:
                    self._log.warning(
                        "frames kept in %s while the object store %s refuses them (%s); "
                        "next try in %gs",
                        self.local.url,
                        safe_url(self.target.url),
                        exc,
                        self.retry_every,
                    )
                break
            self._away = False
            self.local.delete(info.key)
            with self._lock:
                self._bytes = max(0, self._kept_bytes() - info.size)
            done.append(info.key)
        if refused:
            self._log.error(
                "the object store %s refused %d frame(s) kept in %s for their keys, the first "
                "%s: %s; they stay there, set aside until the next run, and the frames after "
                "them go on",
                safe_url(self.target.url),
                len(refused),
                self.local.url,
                refused[0][0],
                refused[0][1],
            )
        if done:
            self._log.info(
                "%d frame(s) kept in %s uploaded to %s",
                len(done),
                self.local.url,
                safe_url(self.target.url),
            )
            self._uploaded(len(done), done)
        return len(done)

    def _pending(self) -> list[ObjectInfo]:
        """What is kept and not set aside."""
        with self._lock:
            aside = set(self._set_aside)
        return [info for info in self.local.list() if info.key not in aside]

    def _ensure_uploader(self) -> None:
        with self._lock:
            if self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(target=self._run, name="fp-spool", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.retry_every):
            try:
                self.drain()
            except ObjectStoreError as exc:  # the local store itself failed
                self._log.error("the frame spool %s cannot be read (%s)", self.local.url, exc)
            with self._lock:  # keep() starts a new uploader once this one is gone
                aside = self._set_aside
                if all(info.key in aside for info in self.local.list()):
                    self._thread = None
                    return
