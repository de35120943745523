"""The hop runtime that moves items between the stages of a live pipeline.

At run time every stage, the segmenter and every sink is a *hop*: workers take items from the
hop's queue, handle them and hand the results to the next hop. With ``ordered`` the results
leave a hop in the order the items entered it, whatever the worker count, so a segmenter or a
stateful stage downstream sees each source's frames in order. Control items (segment markers,
end of stream) are never dropped and act as barriers: a hop handles one only after every item
before it has left the hop.

An ordered hop holds at most a bounded window of items between the oldest one not yet out and
the newest one taken (:meth:`Hop._window`): a worker that finished its item while an earlier
one is still on its way (or waits for room downstream) takes no new item past the window, so
back-pressure from a slow hop downstream reaches the queue in front of this one instead of
piling results up in memory.

A processor call that raises (:data:`~framepipe.stream.processes.FRAME_ERRORS`) fails that
frame only, wherever it runs. That includes a ``CancelledError`` an async processor raises
without its hop being cancelled (a future it awaited was cancelled elsewhere): the hop goes on
to the next frame. A hop being cancelled is never taken for a frame's error.

A control item's handling (a sink's ``segment_closed``) that raises is a processor error of
the hop naming the segment; the segment flows on and completes. Once started, it runs to its
end even when the hop is cancelled, and :meth:`Hop.teardown` waits for it before the processor's
``teardown``: a sink is never torn down while its ``segment_closed`` runs. :meth:`Hop.teardown`
can be bounded (a processor call that never returns cannot hold a stop): past the bound the
hop is abandoned.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from logging import Logger, LoggerAdapter
from typing import Any

from framepipe.errors import ProcessorError
from framepipe.logs import get_logger
from framepipe.processors.base import Processor
from framepipe.stream.lanes import ThreadLane, run_detached
from framepipe.stream.processes import FRAME_ERRORS, ProcessWorker
from framepipe.stream.queue import FrameQueue
from framepipe.stream.stage import END, StageStats

__all__ = ["Hop"]

_Call = tuple[int, list[Any], "asyncio.Future[list[tuple[Any, BaseException | None, float]]]"]
"""A call handed to a hop's lane: the index of its first frame, its frames, its results."""


def _cancel_requested() -> bool:
    """True when someone asked to cancel the running task (a ``CancelledError`` is then the
    task's), False when a ``CancelledError`` came from something it awaited."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


Output = Callable[[Any], Awaitable[None]]
ErrorHook = Callable[[ProcessorError], None]
CrashHook = Callable[[str, int, ProcessorError], None]


class Hop:
    """Runtime of one stage, sink or segmenter: a queue, workers, ordered hand-off."""

    def __init__(
        self,
        name: str,
        *,
        source_id: str,
        workers: int,
        queue: FrameQueue,
        ordered: bool,
        output: Output,
        stats: StageStats,
        handle: Callable[[Any], Awaitable[Any]] | None = None,
        processor: Processor | None = None,
        inline: bool = False,
        control: Callable[[Any], Awaitable[Any]] | None = None,
        on_error: ErrorHook | None = None,
        crash_after: int | None = None,
        on_crash: CrashHook | None = None,
        processes: bool = False,
        log: Logger | LoggerAdapter[Any] | None = None,
    ) -> None:
        self.name = name
        self.log = log or get_logger(name)
        self.source_id = source_id
        self.workers = workers
        self.queue = queue
        self.ordered = ordered
        self.output = output
        self.stats = stats
        stats.queue = queue
        self.processor = processor
        self.inline = inline
        self._is_async = processor is not None and processor.is_async
        self._cost = 0.0  # moving average of one call's seconds, to decide on batching
        self._handle = handle
        self._control = control
        self._on_error = on_error
        self._crash_after = crash_after
        self._on_crash = on_crash
        self._streak = 0  # processor calls that raised in a row
        self._lane: ThreadLane | None = None
        self._controls: dict[asyncio.Future[Any], Any] = {}  # handlers not ended, their items
        self._processes = processes
        self._idle: asyncio.Queue[ProcessWorker] | None = None
        self._workers: list[ProcessWorker] = []
        self._next_idx = 0
        self._release = 0
        self._pending: dict[int, Any] = {}
        self._release_lock = asyncio.Lock()
        self._done: set[int] = set()
        self._watermark = 0
        self._progress = asyncio.Condition()
        self._waiting = 0  # workers waiting on _progress: only they need it notified

    async def setup(self) -> None:
        """Create the worker threads and call the processor's ``setup`` once (in a thread), or
        start the worker processes (each calls ``setup`` itself)."""
        proc = self.processor
        if self._processes and proc is not None:
            await self._start_processes(proc)
            return
        if proc is None:
            return
        if not proc.is_async and not self.inline:
            self._lane = ThreadLane(self.workers, f"fp-{self.name}")
            await self._lane.submit(proc.setup)
        else:
            await asyncio.get_running_loop().run_in_executor(None, proc.setup)

    async def _start_processes(self, proc: Processor) -> None:
        self._lane = lane = ThreadLane(self.workers, f"fp-{self.name}")
        self._workers = [ProcessWorker(proc, self.name, i) for i in range(self.workers)]
        started = await asyncio.gather(
            *(lane.submit(w.start) for w in self._workers), return_exceptions=True
        )
        self._idle = asyncio.Queue()
        for worker in self._workers:
            self._idle.put_nowait(worker)
        for outcome in started:
            if isinstance(outcome, BaseException):
                raise outcome

    async def teardown(self, within: float | None, closing: Sequence[Any] = ()) -> None:
        """Wait for the control items still being handled (a sink's ``segment_closed`` that
        was running when the hop was cancelled), handle the control items ``closing``
        (segment markers a stop left undelivered), then call the processor's ``teardown`` and
        release the threads (or stop the worker processes, which call ``teardown``
        themselves, each given 10 s before it is killed), in that order.

        ``within``: None waits for all of it however long it takes (a run whose calls all
        returned). A number of seconds bounds it (calls may still be running): past it, raise
        :class:`TimeoutError`, leave the daemon threads to finish on their own (a warning names
        each ``segment_closed`` or ``teardown`` call abandoned while it ran) and kill the worker
        processes. A control item's handler that raises is a processor error of the hop, as
        while it runs (:meth:`_control_failed`), and does not stop the teardown."""
        lane = self._lane
        try:
            if within is None:
                await self._finish(closing)
            else:
                await asyncio.wait_for(self._finish(closing), within)
        except TimeoutError:
            for worker in self._workers:
                worker.kill()
            for task in self._controls:  # abandoned: their waits end now, with a warning
                task.cancel()
            raise
        finally:
            if lane is not None:
                lane.shutdown()

    async def _finish(self, closing: Sequence[Any]) -> None:
        failure: BaseException | None = None
        running = dict(self._controls)
        if running:
            await asyncio.wait(running)  # never cancels them, even when this wait is
            for task, item in running.items():
                self._controls.pop(task, None)
                error = None if task.cancelled() else task.exception()
                if isinstance(error, Exception):
                    self._control_failed(item, error)
                elif error is not None:
                    failure = failure or error
        if self._control is not None:
            for item in closing:
                try:
                    await self._control(item)
                except Exception as exc:
                    self._control_failed(item, exc)
        lane = self._lane
        if self._workers:
            assert lane is not None
            await asyncio.gather(*(lane.submit(w.stop) for w in self._workers))
        elif self.processor is not None and lane is not None:
            await lane.submit(self.processor.teardown)
        elif self.processor is not None:
            await run_detached(
                self.processor.teardown,
                what=f"stage {self.name!r}: teardown()",
                thread=f"fp-{self.name}-teardown",
                log=self.log,
            )
        if failure is not None:
            raise failure

    async def _handle_control(self, item: Any) -> None:
        """Run the control handler on ``item`` in a task of its own that the hop's
        cancellation does not cancel (kept in ``_controls`` until it ended, for
        :meth:`teardown` to wait for)."""
        assert self._control is not None
        task = asyncio.ensure_future(self._control(item))
        self._controls[task] = item
        try:
            await asyncio.shield(task)
        except Exception as exc:  # the handler's own failure: reported, the item goes on
            self._control_failed(item, exc)
        finally:
            if task.done():
                self._controls.pop(task, None)

    def _control_failed(self, item: Any, exc: Exception) -> None:
        """A sink's ``segment_closed`` raised: a processor error of this hop naming the
        segment, as a frame's would be (not counted towards a crash); its segment completes
        and the pipeline goes on."""
        segment = getattr(item, "segment", None)
        what = f"segment_closed({segment.id})" if segment is not None else "control item"
        self.stats.errors += 1
        error = ProcessorError(
            f"{what} failed: {type(exc).__name__}: {exc}", source_id=self.source_id, stage=self.name
        )
        error.__cause__ = exc
        self.stats.last_error = str(error)
        if self._on_error is not None:
            self._on_error(error)

    async def run(self) -> None:
        """Handle items until END, then pass END on."""
        workers = [
            asyncio.create_task(self._worker(), name=f"hop-{self.name}-{i}")
            for i in range(self.workers)
        ]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for w in workers:
                w.cancel()
            raise
        await self.output(END)

    @property
    def _window(self) -> int:
        """How many items past the oldest one not yet out an ordered hop may take: two per
        worker, or two batches per worker for a stage cheap enough to batch its frames (see
        :meth:`_take_batch`), so the workers do not wait on each other."""
        return 2 * self.workers * (self._BATCH if self._cost <= self._CHEAP_S else 1)

    def _may_take(self) -> bool:
        """True when the hop may take another item (see :attr:`_window`)."""
        return not self.ordered or self._next_idx - self._watermark < self._window

    async def _within_window(self) -> None:
        """Wait until the hop may take another item."""
        if self._may_take():
            return
        self._waiting += 1
        try:
            async with self._progress:
                await self._progress.wait_for(self._may_take)
        finally:
            self._waiting -= 1

    async def _worker(self) -> None:
        while True:
            await self._within_window()
            item = await self.queue.get()
            if item is END:
                await self.queue.put(END)  # let the sibling workers see it too
                return
            idx = self._next_idx
            self._next_idx += 1
            if getattr(item, "control", False):
                await self._barrier(idx)
                result = item
                if self._control is not None:
                    await self._handle_control(item)
                await self._complete(idx, result)
                continue
            if self._idle is not None:
                self.stats.frames_in += 1
                worker = await self._idle.get()
                assert self._lane is not None
                try:
                    outcome = await self._lane.submit(worker.call, item)
                finally:
                    self._idle.put_nowait(worker)
                await self._complete(idx, self._account(item, *outcome))
                continue
            if not self._threaded:
                self.stats.frames_in += 1
                await self._complete(idx, await self._process(item))
                continue
            call: _Call | None = self._submit(idx, item)
            while call is not None:
                ahead = self._take_ahead()
                first, batch, results = call
                for offset, (frame, outcome) in enumerate(zip(batch, await results, strict=True)):
                    await self._complete(first + offset, self._account(frame, *outcome))
                call = ahead

    _BATCH = 16
    _CHEAP_S = 0.0005
    _AHEAD_S = 0.02

    def _submit(self, idx: int, item: Any) -> _Call:
        """Hand ``item`` (with a batch of frames queued behind it, when cheap) to the lane."""
        batch = self._take_batch(item)
        self._next_idx = idx + len(batch)
        self.stats.frames_in += len(batch)
        assert self._lane is not None
        return idx, batch, self._lane.submit(self._call_batch, batch)

    def _take_ahead(self) -> _Call | None:
        """The next frame already queued, handed to the lane while the current call runs,
        so the thread does not wait for the event loop between calls; None for a control
        item, an empty queue, a full window, or calls too long for the hand-off to matter (or
        not timed yet)."""
        if not 0.0 < self._cost < self._AHEAD_S or not self._may_take():
            return None  # the cost is unknown until the first call returns
        item = self.queue.get_frame_nowait()
        return None if item is None else self._submit(self._next_idx, item)

    @property
    def _threaded(self) -> bool:
        """A sync processor run in this hop's threads. Its calls are timed inside the thread
        (``_call_batch``), so the batching decision sees the processor's own cost, not the
        hand-off and queueing delays of a loaded machine."""
        return self._lane is not None and self._handle is None and not self._is_async

    def _take_batch(self, item: Any) -> list[Any]:
        """``item`` plus, for a cheap threaded processor, frames already queued behind it,
        so that one thread hand-off serves several frames. Each worker takes at most its share
        of the queue, so the other workers stay busy."""
        batch = [item]
        if self._cost > self._CHEAP_S:
            return batch
        limit = min(self._BATCH, 1 + len(self.queue) // self.workers)
        while len(batch) < limit:
            more = self.queue.get_frame_nowait()
            if more is None:
                break
            batch.append(more)
        return batch

    def _call_batch(self, batch: list[Any]) -> list[tuple[Any, BaseException | None, float]]:
        """Run the processor on each frame of ``batch`` in this worker thread."""
        assert self.processor is not None
        out: list[tuple[Any, BaseException | None, float]] = []
        for frame in batch:
            started = time.perf_counter()
            try:
                out.append((self.processor.process(frame), None, time.perf_counter() - started))
            except FRAME_ERRORS as exc:  # no task here: any CancelledError is the processor's
                out.append((None, exc, time.perf_counter() - started))
        return out

    async def _process(self, item: Any) -> Any:
        started = time.perf_counter()
        try:
            if self._handle is not None:
                result = await self._handle(item)
            else:
                assert self.processor is not None
                if self._is_async:
                    result = await self.processor.process(item)
                else:  # inline: threaded processors go through _call_batch
                    result = self.processor.process(item)
        except FRAME_ERRORS as exc:
            if isinstance(exc, asyncio.CancelledError) and _cancel_requested():
                raise  # the hop itself is being cancelled: no frame's error
            return self._account(item, None, exc, time.perf_counter() - started)
        return self._account(item, result, None, time.perf_counter() - started)

    def _account(self, item: Any, result: Any, exc: BaseException | None, seconds: float) -> Any:
        """Count one processor call; report a failure; return what goes downstream."""
        self._cost = seconds if self._cost == 0.0 else 0.9 * self._cost + 0.1 * seconds
        if exc is not None:
            self.stats.errors += 1
            error = ProcessorError(
                f"{type(exc).__name__}: {exc}",
                source_id=self.source_id,
                stage=self.name,
                seq=getattr(item, "seq", None),
            )
            error.__cause__ = exc
            self.stats.last_error = str(error)
            if self._on_error is not None:
                self._on_error(error)
            self._streak += 1
            if (
                self._crash_after is not None
                and self._streak == self._crash_after
                and self._on_crash is not None
            ):
                self._on_crash(self.name, self._streak, error)
            return None
        self._streak = 0
        self.stats.record(seconds)
        if result is None:
            self.stats.filtered += 1
        return result

    async def _complete(self, idx: int, result: Any) -> None:
        if not self.ordered:
            if result is not None:
                self.stats.frames_out += 0 if getattr(result, "control", False) else 1
                await self.output(result)
            await self._mark_done(idx)
            return
        self._pending[idx] = result
        if self._release_lock.locked():
            return  # the worker holding the lock releases it in order
        async with self._release_lock:
            while self._release in self._pending:
                out = self._pending.pop(self._release)
                if out is not None:
                    self.stats.frames_out += 0 if getattr(out, "control", False) else 1
                    await self.output(out)
                await self._mark_done(self._release)
                self._release += 1

    async def _mark_done(self, idx: int) -> None:
        self._done.add(idx)
        advanced = False
        while self._watermark in self._done:
            self._done.discard(self._watermark)
            self._watermark += 1
            advanced = True
        if advanced and self._waiting:
            async with self._progress:
                self._progress.notify_all()

    async def _barrier(self, idx: int) -> None:
        self._waiting += 1
        try:
            async with self._progress:
                await self._progress.wait_for(lambda: self._watermark >= idx)
        finally:
            self._waiting -= 1
