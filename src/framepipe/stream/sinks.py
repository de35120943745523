"""Sinks: where a live pipeline's frames end up. :class:`FrameStore` writes JPEGs to the object
store under hierarchical keys and reads them back.

Each field of a key template is escaped by :func:`escape_key_field` before it goes into the
key, so a segment key read from a QR tag (``https://shop.example/o/17``, ``T1/extra``, ``..``)
stays one path segment of its own: it neither makes the key invalid nor lands inside another
segment's folder.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import string
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

from framepipe.backends.objects import LocalObjectStore, ObjectInfo, ObjectStore
from framepipe.backends.objects.base import validate_key
from framepipe.errors import ConfigError, InvalidKeyError, ObjectKeyConflictError, ObjectStoreError
from framepipe.frames import Frame, decode_jpeg
from framepipe.logs import get_logger
from framepipe.processors.base import Processor
from framepipe.stream.segment import Segment
from framepipe.stream.spool import Spool
from framepipe.urls import safe_url

__all__ = ["FrameStore", "Sink", "escape_key_field", "unescape_key_field"]

_log = get_logger("frame_store")

DEFAULT_TEMPLATE = "frames/{source_id}/{segment_id}/frame_{ts_ms}_{seq}.jpg"

MAX_FIELD_BYTES = 128
"""Longest escaped field, in bytes of UTF-8; a longer one is shortened (see
:func:`escape_key_field`)."""

_ESCAPED = frozenset("%/\\:")
_SHORTENED = "%~"  # never made by percent-encoding: it marks a shortened field
_DIGEST_CHARS = 20


def _escape_char(char: str, first: bool) -> str:
    code = ord(char)
    if (
        char in _ESCAPED
        or code < 0x20
        or 0x7F <= code <= 0x9F
        or 0xD800 <= code <= 0xDFFF
        or (first and char == ".")
    ):
        return "".join(f"%{b:02X}" for b in char.encode("utf-8", "surrogatepass"))
    return char


def escape_key_field(text: str) -> str:
    """``text`` as a part of an object key that cannot change the key's shape.

    ``%``, ``/``, ``\\``, ``:``, control characters (C0, DEL, C1), lone surrogates and a
    leading ``.`` (so never a ``.`` or ``..`` segment, nor a store's hidden ``.tmp-`` name) are
    percent-encoded as UTF-8 bytes (a lone surrogate as its surrogate-pass bytes); everything
    else is kept, so a plain id (``ORDER_1``) is its own escape. Distinct texts give distinct
    results. A result longer than :data:`MAX_FIELD_BYTES` bytes is cut (between escapes) and
    ended by ``%~`` and 80 bits of a SHA-256 digest of ``text`` (``%~`` is never an escape):
    distinct but for a digest collision, and not reversible. An empty text stays empty (a
    template field that is a whole path segment then makes an invalid key)."""
    parts: list[str] = []
    size = 0
    for index, char in enumerate(text):
        part = _escape_char(char, index == 0)
        parts.append(part)
        size += len(part.encode("utf-8"))
    if size <= MAX_FIELD_BYTES:
        return "".join(parts)
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:_DIGEST_CHARS]
    budget = MAX_FIELD_BYTES - len(_SHORTENED) - _DIGEST_CHARS
    kept: list[str] = []
    for part in parts:
        budget -= len(part.encode("utf-8"))
        if budget < 0:
            break
        kept.append(part)
    return "".join(kept) + _SHORTENED + digest


def unescape_key_field(field: str) -> str:
    """The text that :func:`escape_key_field` turned into ``field``; :class:`ValueError` for a
    shortened field or one it does not make."""
    if _SHORTENED in field:
        raise ValueError(f"key field {field!r} was shortened: its text is not in it")
    text = urllib.parse.unquote(field, errors="surrogatepass")
    if escape_key_field(text) != field:
        raise ValueError(f"{field!r} is not an escaped key field")
    return text


def _prefix(head: str, fields: list[str], *, escape: bool) -> str:
    """``head`` and the ``fields`` as folders (escaped, or raw as earlier versions wrote)."""
    return head + "".join((escape_key_field(f) if escape else f) + "/" for f in fields)


def _is_escape(field: str) -> bool:
    """True when :func:`escape_key_field` makes ``field`` of some text (a shortened field is
    taken as one)."""
    if _SHORTENED in field:
        return True
    try:
        unescape_key_field(field)
    except ValueError:
        return False
    return True


class _KeyFormatter(string.Formatter):
    """``str.format`` whose every field is escaped after formatting (so ``{seq:06d}`` still
    works)."""

    def format_field(self, value: Any, format_spec: str) -> str:
        return escape_key_field(super().format_field(value, format_spec))


_KEY_FORMATTER = _KeyFormatter()


class Sink(Processor):
    """A processor at the end of a pipeline: :meth:`write` each frame (in worker threads unless
    ``async``); :meth:`segment_closed` runs once all of a segment's frames were written."""

    workers: int = 1

    def process(self, item: Any) -> Any:
        self.write(item)
        return item

    def write(self, frame: Frame) -> None:
        """Consume one frame."""
        raise NotImplementedError

    def segment_closed(self, segment: Segment) -> None:
        """Called (in a worker thread) after every frame of ``segment`` went through write."""

    def segment_taken(self, frame: Frame, segment_id: str) -> bool:
        """True when this sink already holds frames of a segment ``segment_id`` of
        ``frame``'s source (an earlier run's): the segmenter then gives the segment ``frame``
        opens another id. Called in a thread; may raise (the id is then used)."""
        return False


class FrameStore(Sink):
    """Writes frames as JPEG to ``objects`` under ``template`` and keeps what it stored per
    segment in ``segment.stored``.

    ``template`` fields: ``source_id``, ``segment_id``, ``seq``, ``ts_ms``, ``key`` and any
    ``frame.meta`` entry. Frames outside any segment are skipped unless ``store_unsegmented``
    (they then use ``segment_id="none"``). With ``select_best=N`` the N frames with the highest
    ``frame.meta[score_key]`` of each segment are copied under ``selected_prefix`` (same key
    below it), in ``selected_store`` when given (another bucket) or the same store, when the
    segment closes; their keys go to ``segment.selected``. A best frame the store fails to
    copy (it is away when the segment closes) is left out of ``selected``, counted in
    ``segment.not_selected`` and named in one warning for the segment, which completes all
    the same: the pipeline goes on. A frame it fails to write (the store
    refused it, or it could not be encoded) raises, as any sink's failure does (the pipeline
    reports it), and is counted in its segment's ``not_stored``.

    With ``spool`` (a local :class:`ObjectStore`, or a folder for one), a frame the object
    store refuses for any reason but its key is kept there instead and uploaded under its key
    once the store takes frames again (:mod:`framepipe.stream.spool`, tried every
    ``spool_retry`` seconds, also by the next run): it is listed in its segment's ``spooled``,
    not in ``stored`` (nor among the best frames), and each round that uploads kept frames
    emits ``frames.uploaded`` (``count``, ``keys``). After a refusal the frames go to the spool
    without trying the store until it takes a kept frame again (a store that hangs holds back
    only the frames that found it away, said in one warning). A kept frame the store then
    refuses for its key (a key conflict) is set aside in the spool, never uploaded by this
    run: ``frames.refused`` (``key``, ``error``) names it, and the frames after it go on. The
    spool holds at most ``spool_max_bytes`` (4 GiB); only a frame it cannot take either (full,
    or its disk failing) is ``not_stored``.

    Every field is escaped by :func:`escape_key_field` (``T1/extra`` is stored under
    ``T1%2Fextra/``), so any segment key gives valid keys of its own segment, apart from every
    other segment's; :meth:`list_frames` and :meth:`read_frames` escape the ids they are given
    the same way, and also read what earlier versions, which did not escape, stored under
    the raw ids (see :meth:`list_frames`)."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        template: str = DEFAULT_TEMPLATE,
        quality: int = 85,
        workers: int = 2,
        store_unsegmented: bool = False,
        select_best: int = 0,
        score_key: str = "score",
        selected_prefix: str = "selected/",
        selected_store: ObjectStore | None = None,
        spool: ObjectStore | str | os.PathLike[str] | None = None,
        spool_retry: float = 5.0,
        spool_max_bytes: int = 4 * 1024**3,
    ) -> None:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        if not fields:
            raise ConfigError(
                f"frame key template {template!r} has no fields: every frame "
                "would overwrite the same object"
            )
        self.objects = objects
        self.template = template
        self.quality = quality
        self.workers = workers
        self.store_unsegmented = store_unsegmented
        self.select_best = select_best
        self.score_key = score_key
        self.selected_prefix = selected_prefix.rstrip("/") + "/" if selected_prefix else ""
        self.selected_store = selected_store
        self.name = "frame_store"
        self._lock = threading.Lock()
        self._by_segment: dict[str, list[tuple[int, str, float]]] = {}
        self._failed: dict[str, int] = {}  # segment id -> frames not written
        self._spooled: dict[str, list[str]] = {}  # segment id -> keys kept in the spool
        if spool is not None and not isinstance(spool, ObjectStore):
            spool = LocalObjectStore(spool)
        self.spool = (
            None
            if spool is None
            else Spool(
                spool,
                objects,
                retry_every=spool_retry,
                uploaded=lambda count, keys: self.emit("frames.uploaded", count=count, keys=keys),
                refused=lambda key, reason: self.emit("frames.refused", key=key, error=reason),
                log=get_logger("frame_store"),
                max_bytes=spool_max_bytes,
            )
        )

    @staticmethod
    def _fields(frame: Frame, segment_id: str) -> dict[str, Any]:
        """The values a key template of ``frame`` in segment ``segment_id`` may name."""
        values = dict(frame.meta)
        values.update(
            source_id=frame.source_id, segment_id=segment_id, seq=frame.seq, ts_ms=frame.ts_ms
        )
        return values

    def key_for(self, frame: Frame) -> str:
        """The object key ``frame`` is stored under (each field escaped)."""
        values = self._fields(frame, frame.segment_id or "none")
        try:
            return _KEY_FORMATTER.format(self.template, **values)
        except KeyError as exc:
            raise ConfigError(
                f"frame key template {self.template!r} uses {exc.args[0]!r}, "
                f"which frame {frame.source_id}#{frame.seq} does not have"
            ) from exc

    def write(self, frame: Frame) -> None:
        if frame.segment_id is None and not self.store_unsegmented:
            return
        key = self.key_for(frame)
        try:
            data = frame.to_jpeg(self.quality)
            if self.spool is not None and self.spool.away:  # not tried: it would hang too
                validate_key(key)  # a key the store could never hold is not kept
                self._keep(frame, key, data)
                return
            try:
                self.objects.put(key, data)
            except (InvalidKeyError, ObjectKeyConflictError):
                raise  # the key itself is wrong: kept, it would be refused again
            except ObjectStoreError as exc:
                if self.spool is None:
                    raise
                self._keep(frame, key, data)
                self.spool.refused(key, exc)
                return
        except Exception:
            if frame.segment_id is not None:
                with self._lock:
                    self._failed[frame.segment_id] = self._failed.get(frame.segment_id, 0) + 1
            raise
        if frame.segment_id is not None:
            score = frame.meta.get(self.score_key)
            with self._lock:
                self._by_segment.setdefault(frame.segment_id, []).append(
                    (frame.seq, key, float(score) if score is not None else float("-inf"))
                )

    def _keep(self, frame: Frame, key: str, data: bytes) -> None:
        """Keep a frame the store refused, or would, in the spool (listed in its segment)."""
        assert self.spool is not None
        self.spool.keep(key, data)
        if frame.segment_id is not None:
            with self._lock:
                self._spooled.setdefault(frame.segment_id, []).append(key)

    def segment_closed(self, segment: Segment) -> None:
        with self._lock:
            written = self._by_segment.pop(segment.id, [])
            # several frame stores on one segment: the frames the worst of them lost
            segment.not_stored = max(segment.not_stored, self._failed.pop(segment.id, 0))
            segment.spooled.extend(sorted(self._spooled.pop(segment.id, [])))
        written.sort()
        segment.stored = [key for _, key, _ in written]
        if self.select_best > 0 and written:
            best = heapq.nlargest(self.select_best, written, key=lambda w: (w[2], -w[0]))
            failed: list[tuple[str, ObjectStoreError]] = []
            for _, key, _ in sorted(best):
                target = self.selected_prefix + key
                try:
                    if self.selected_store is None:
                        self.objects.copy(key, target)
                    else:
                        self.selected_store.put(target, self.objects.get(key))
                except ObjectStoreError as exc:
                    failed.append((target, exc))
                    continue
                segment.selected.append(target)
            if failed:
                segment.not_selected += len(failed)
                _log.warning(
                    "segment %s: %d of its %d best frames were not copied (the first to %s: "
                    "%s); the segment completes without them",
                    segment.id,
                    len(failed),
                    len(best),
                    failed[0][0],
                    failed[0][1],
                )

    def segment_taken(self, frame: Frame, segment_id: str) -> bool:
        """True when the store (or the spool) holds an object under ``segment_id``'s folder
        for ``frame``'s source: the template's part up to ``{segment_id}/``, with ``frame``'s
        fields. Always False for a template without a ``{segment_id}/`` folder, or whose
        folders use ``{seq}`` or ``{ts_ms}``. Raises what listing the store raises, and
        :class:`ObjectStoreError` while the store is away (the spool takes the frames)."""
        head, sep, _ = self.template.partition("{segment_id}/")
        fields = {f for _, f, _, _ in string.Formatter().parse(head) if f}
        if not sep or fields & {"seq", "ts_ms"}:
            return False
        values = self._fields(frame, segment_id)
        try:
            folder = _KEY_FORMATTER.format(head + "{segment_id}/", **values)
        except KeyError:
            return False  # key_for names the missing field when the frame is written
        if self.spool is not None:
            if next(iter(self.spool.local.list(folder)), None) is not None:
                return True
            if self.spool.away:  # asking would hang or fail as its frames do
                raise ObjectStoreError(
                    f"the object store {safe_url(self.objects.url)} is away (frames go to "
                    f"{self.spool.local.url})"
                )
        return next(iter(self.objects.list(folder)), None) is not None

    def setup(self) -> None:
        """Start uploading frames an earlier run kept in the spool, if any."""
        if self.spool is not None:
            self.spool.start()

    def teardown(self) -> None:
        """Stop the spool's uploader; kept frames stay for the next run."""
        if self.spool is not None:
            self.spool.close()

    def list_frames(self, source_id: str, segment_id: str | None = None) -> list[ObjectInfo]:
        """Stored frames of a source (and segment), by key order; only for the default-shaped
        templates that start with ``<prefix>/{source_id}/{segment_id}/``; both ids are escaped
        as :meth:`key_for` escapes them.

        Frames earlier versions stored, with the ids in the key as they were (``door:1``,
        ``50%``: valid keys then), are listed too, each once: when an id's escape differs
        from it, the raw ids' folder is looked at as well, unless it is not a valid key prefix
        (nothing could be stored there), it is itself the escape of another id (``a%2Fb`` is
        where ``a/b`` is stored now: its frames are that id's, not this one's), or a raw id
        holds a ``/`` (its folders are where other sources' and segments' frames are stored
        now)."""
        head = self.template.split("{source_id}")[0]
        fields = [source_id] if segment_id is None else [source_id, segment_id]
        found = {info.key: info for info in self.objects.list(_prefix(head, fields, escape=True))}
        if (
            any(escape_key_field(f) != f for f in fields)
            and not any(_is_escape(f) for f in fields if escape_key_field(f) != f)
            and not any("/" in f for f in fields)
        ):
            try:
                earlier = list(self.objects.list(_prefix(head, fields, escape=False)))
            except InvalidKeyError:
                earlier = []
            for info in earlier:
                found.setdefault(info.key, info)
        return [found[key] for key in sorted(found)]

    def read_frames(self, source_id: str, segment_id: str) -> Iterator[Frame]:
        """The stored frames of one segment, decoded, in capture order (``ts_ms``, ``seq``
        from the default key names; key order otherwise)."""
        entries = []
        for info in self.list_frames(source_id, segment_id):
            stem = info.key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            parts = stem.split("_")
            try:
                ts_ms, seq = int(parts[-2]), int(parts[-1])
            except (IndexError, ValueError):
                ts_ms, seq = 0, 0
            entries.append((ts_ms, seq, info.key))
        for ts_ms, seq, key in sorted(entries):
            yield Frame(
                image=decode_jpeg(self.objects.get(key)),
                source_id=source_id,
                seq=seq,
                ts_ms=ts_ms,
                segment_id=segment_id,
                meta={"key": key},
            )
