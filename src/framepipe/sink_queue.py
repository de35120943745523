"""The machinery of a live app's event sinks (:mod:`framepipe.event_sinks`): a bounded queue, one
ordered batching writer and the retry policy, in :class:`QueuedSink`, which each sink
subclasses with its backend's write.

Each sink is an :meth:`App.on <framepipe.app.App.on>` callback; :meth:`~QueuedSink.attach`
(``sink.attach(app)``) subscribes one to all of an app's events and adds its counts to the
app's metrics. Guarantees:

* Calling a sink never blocks and never raises: the event is queued. The queue is bounded:
  past ``max_pending`` queued events the *oldest* queued event is dropped and counted in
  ``dropped`` (the newest events are kept, as on a live dashboard; the batch being written is
  never dropped). Called outside a running event loop, the event waits in the queue for the
  writer, which starts with the next event emitted inside the loop (or with :meth:`aclose`).
* One writer task per sink writes the queued events in the order they were emitted, in batches
  (one transaction, one pipeline round trip).
* A backend that is away (database restarting or refusing connections, Redis down or hung)
  never costs the app, and costs no event while the queue holds: the batch is retried with
  backoff (0.5 s doubling to 10 s by default) for as long as writing fails, while newer events
  queue behind it. Any failure is retried so; one that lasts (a missing table, a Redis key of
  another type) holds the queue like an outage. A Redis that accepts the connection and never
  answers fails an attempt after ``socket_timeout`` seconds (10 s).
* An outage is logged once: a warning when writing first fails (the sink, where it writes,
  the error's first line with any URL's password masked) and an info line when writing works
  again (how long it failed, how many events waited, how many were dropped meanwhile).
* A wrong setting is no outage: :meth:`~QueuedSink.start` fails with
  :class:`~framepipe.errors.ConfigError` when Redis refuses the sink's credentials (naming
  the sink and its URL, the password masked). Credentials refused later (a password changed
  on the server) are retried like an outage, and said so in one error line (not as a
  backend that is away); the info line says when writing works again.
* Counts: ``written``, ``dropped``, ``pending`` (queued or being written) and
  ``failing_since`` (when the current outage began, else None); :meth:`~QueuedSink.stats`
  has them all, and ``/metrics`` shows them through :meth:`~QueuedSink.attach`.
* Delivery is at least once: a write that failed late (a hung Redis that executes the commands
  once it answers again, a commit whose answer was lost) is written again, so an event can
  appear twice, never out of order before its first copy. On the Redis Stream each event
  carries an ``event_id`` to drop the repeats by.
* An event type no backend can store (a lone surrogate, a NUL) is written with
  :func:`~framepipe.untrusted.storable_text`'s escapes, so it never fails the batch of
  good events it is written with.
* :meth:`aclose` writes what is queued, bounded by ``timeout`` even while the backend is away;
  what could not be written by then, the batch in flight included, is counted in ``dropped``
  and said in one warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

from framepipe.backends.state.schema import EVENT_TYPE_MAX
from framepipe.backoff import Backoff
from framepipe.events import Event
from framepipe.logs import get_logger
from framepipe.outage import Outage, cause
from framepipe.telemetry import event_sink_metrics
from framepipe.untrusted import storable_json, storable_text
from framepipe.urls import safe_json

if TYPE_CHECKING:
    from framepipe.app import App

__all__ = ["QueuedSink", "sink_json"]


def sink_json(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` as every sink writes it: storable by every backend, and no password of a URL
    in it (an error naming ``rtsp://user:pw@cam``)."""
    result: dict[str, Any] = safe_json(storable_json(data))
    return result


def _storable_type(event: str) -> str:
    """``event`` as every backend stores it: escaped (:func:`storable_text`) and at most
    :data:`EVENT_TYPE_MAX` characters (a longer one is cut and ends with ``…``)."""
    if not event.isascii() or "\x00" in event:
        event = storable_text(event)
    return event if len(event) <= EVENT_TYPE_MAX else event[: EVENT_TYPE_MAX - 1] + "…"


class QueuedSink:
    """The queue, the ordered batching writer and the retry policy; subclasses write."""

    kind = "events"

    def __init__(
        self,
        *,
        max_pending: int = 10_000,
        batch: int = 256,
        backoff: Backoff | None = None,
    ) -> None:
        if max_pending < 1 or batch < 1:
            raise ValueError("max_pending and batch must be >= 1")
        self.max_pending = max_pending
        self.batch = batch
        self.backoff = backoff or Backoff(0.5, 2.0, 10.0, 0.1)
        self.dropped = 0
        self.written = 0
        self.last_error: str | None = None
        """The last failed attempt's error (its first line), None until one fails."""
        self.app_name: str | None = None
        """The app it is attached to (:meth:`attach`), for the metrics' ``app`` label."""
        self._pending: deque[Event] = deque()
        self._inflight: list[Event] = []
        """The batch the writer is writing (and retrying): off the queue, not yet counted."""
        self._seq = 0
        """Events given to the sink; each queued event's ``id`` is its number."""
        self._origin = uuid.uuid4().hex[:16]
        self._outage = Outage()
        self._dropped_before = 0  # ``dropped`` when the outage under way began
        self._wake: asyncio.Event | None = None
        self._retry_now: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._detach: list[Callable[[], None]] = []
        self._log = get_logger(f"events.{self.kind}")

    @property
    def target(self) -> str:
        """Where the sink writes, as logs and metrics show it (passwords masked)."""
        return self.kind

    @property
    def pending(self) -> int:
        """Events not yet written: queued, and the batch being written."""
        return len(self._pending) + len(self._inflight)

    def _named(self) -> str:
        return f"event sink {self.kind} ({self.target})"

    def stats(self) -> dict[str, Any]:
        """The counts (see the module docstring) and where the sink writes."""
        return {
            "sink": self.kind,
            "target": self.target,
            "written": self.written,
            "dropped": self.dropped,
            "pending": self.pending,
            "failing_since": self.failing_since,
            "last_error": self.last_error,
        }

    async def start(self) -> Self:
        """Check that the backend takes the sink's settings, before the events count on it:
        a wrong one (credentials refused) raises :class:`~framepipe.errors.ConfigError`; a
        backend that is away now is no error (the events queue while the writer waits it
        out). Optional: without it a wrong setting is met, and said, by the writer."""
        return self

    def attach(self, app: App) -> Self:
        """Receive every event of ``app`` (``app.on("*", self)``) and add the counts to its
        metrics (``framepipe_event_sink_*``); :meth:`aclose` undoes both."""
        self.app_name = app.name
        self._detach.append(app.on("*", self))
        self._detach.append(event_sink_metrics(app.registry).add(self))
        return self

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Queue one event (an ``App.on`` callback); never blocks, never raises."""
        if self._closed:
            self.dropped += 1
            return
        self._seq += 1
        try:
            shaped = Event(
                _storable_type(event), time.time(), None, None, self._shape(data), self._seq
            )
        except Exception:  # data that does not serialize (a reference cycle): never the app's
            self.dropped += 1
            self._log.exception("event %s not queued", event)
            return
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
        self._pending.append(shaped)
        with contextlib.suppress(RuntimeError):  # outside a running loop: it waits in the queue
            self._ensure_writer()

    def _ensure_writer(self) -> None:
        """Start the writer if it is not running and wake it; ``RuntimeError`` outside a
        running event loop."""
        if self._writer is None:
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._retry_now = asyncio.Event()
            self._writer = loop.create_task(self._write_loop(), name=f"event-sink-{self.kind}")
        assert self._wake is not None
        self._wake.set()

    def _shape(self, data: dict[str, Any]) -> dict[str, Any]:
        return sink_json(data)

    async def _write_loop(self) -> None:
        assert self._wake is not None
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Taken off the queue before writing: an overflow while the batch is in flight
            # drops the oldest queued events, never events of the batch. The batch stays on
            # the sink (_inflight) until written, so aclose counts it if it cancels the writer.
            batch = [self._pending.popleft() for _ in range(min(self.batch, len(self._pending)))]
            self._inflight = batch
            await self._write_until_written(batch)
            self._inflight = []

    async def _write_until_written(self, batch: list[Event]) -> None:
        """Write ``batch``, retrying with backoff for as long as that fails. An event the
        backend refuses for what it holds (:meth:`_refuses`) is found by writing the batch's
        events one at a time, then dropped, counted and named in a warning: it would be
        refused for ever, and hold every later event behind it."""
        alone = False
        while batch:
            part = batch[:1] if alone else list(batch)
            size = len(part)
            try:
                await self._write(part)
            except Exception as exc:
                done = size - len(part)  # the events a partial write took off the front
                self.written += done
                del batch[:done]
                if not self._refuses(exc):
                    self._failed(exc)
                else:
                    self._recovered()  # it answered
                    if alone or size - done == 1:
                        self._drop_refused(batch.pop(0), exc)
                    alone = True
                    continue
            else:
                self.written += size
                self._recovered()  # the events waiting count this batch
                del batch[:size]
                continue
            assert self._retry_now is not None
            delay = self.backoff.delay(1 if self._closed else self._outage.attempts)
            self._retry_now.clear()
            with contextlib.suppress(TimeoutError):  # aclose cuts the wait short
                await asyncio.wait_for(self._retry_now.wait(), delay)

    def _refuses(self, exc: Exception) -> bool:
        """True when ``exc`` says the backend refuses what an event holds (it would refuse it
        again), not that it is away."""
        return False

    def _drop_refused(self, event: Event, exc: Exception) -> None:
        self.dropped += 1
        self._log.warning(
            "%s refused event %s (%s) and dropped it; the events after it are written",
            self._named(),
            event.type,
            cause(exc),
        )

    @property
    def failing_since(self) -> float | None:
        """``time.time()`` of the first failed attempt of the current outage; None while
        writing works."""
        return self._outage.since

    def _misconfigured(self, exc: Exception) -> str | None:
        """What is wrong when ``exc`` says a setting is (credentials refused), else None: an
        outage, or trouble with what was written."""
        return None

    def _failed(self, exc: Exception) -> None:
        if not self._outage.down:
            self._dropped_before = self.dropped
        wrong = self._misconfigured(exc)
        first = self._outage.failed(exc, refused=wrong is not None)
        self.last_error = self._outage.last_error
        if not first:
            self._log.debug(
                "%s: attempt %d failed: %s", self._named(), self._outage.attempts, self.last_error
            )
            return
        if wrong is not None:
            self._log.error(
                "%s cannot write: %s (retrying until it can; up to %d events queue meanwhile, "
                "past that the oldest are dropped and counted)",
                self._named(),
                wrong,
                self.max_pending,
            )
            return
        self._log.warning(
            "%s cannot write (retrying until it can; up to %d events queue meanwhile, past "
            "that the oldest are dropped and counted): %s",
            self._named(),
            self.max_pending,
            self.last_error,
        )

    def _recovered(self) -> None:
        attempts = self._outage.attempts
        lasted = self._outage.answered()
        if lasted is None:
            return
        self._log.info(
            "%s writes again after %.1f s (%d failed attempt(s)): %d event(s) waited, "
            "%d dropped meanwhile",
            self._named(),
            lasted,
            attempts,
            self.pending,
            self.dropped - self._dropped_before,
        )

    async def _write(self, batch: list[Event]) -> None:
        """Write ``batch`` or raise. A write that wrote only its first events may remove them
        from ``batch`` before raising: only the rest is written again."""
        raise NotImplementedError

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Write what is queued (bounded by ``timeout``, an outage or not), stop the writer,
        detach from the app, release the backend. What is not written by then (queued, or
        the batch being written) is counted in ``dropped`` and said in one warning."""
        self._closed = True
        for detach in self._detach:
            detach()
        self._detach.clear()
        if self._pending:
            self._ensure_writer()  # events queued outside a loop had no writer yet
        writer = self._writer
        if writer is not None:
            assert self._wake is not None
            assert self._retry_now is not None
            self._wake.set()
            self._retry_now.set()  # a writer waiting out a long backoff tries again now
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except TimeoutError:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                lost = self.pending
                self.dropped += lost
                why = (
                    f"writing has failed for {time.monotonic() - self._outage.started:.1f} s "
                    f"({self.last_error})"
                    if self._outage.started is not None
                    else "the backend did not answer in time"
                )
                self._log.warning(
                    "%s closed with %d event(s) not written within %g s, counted as dropped: %s",
                    self._named(),
                    lost,
                    timeout,
                    why,
                )
            self._inflight = []
            self._pending.clear()
        await self._release()

    async def _release(self) -> None:
        """Release the backend connection (subclasses)."""
