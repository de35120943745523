"""The tasks of one run of a live pipeline and the run's end: :class:`RunTasks`, made by
:class:`~framepipe.stream.pipeline.StreamPipeline` at each start.

Guarantees:

* A task of the run that dies (raises) fails the run loudly: it is logged with its traceback
  and the run's ``fail`` is called with why. So does a task cancelled while the run is on by
  anything but the run's own end (its teardown, a failure, or the end of the stream coming
  out of the last hop): nothing waits forever on a dead task.
* The run is over (:attr:`RunTasks.done` set) once the stream drained, the run failed, or it
  was torn down; it never starts again.
* The teardown runs once, however many callers wait for it, and the run is over when it ends
  (also when it raised, or a stop that cut the drain short began it): every waiter returns.
* A failed run (:meth:`RunTasks.abort`) has its tasks cancelled at once and is over; its
  capture's stop goes on as a task of its own, kept until the teardown waits for it.
* :meth:`RunTasks.end` cancels the tasks still running and waits for every one (and for a
  failed run's capture to stop); their failures were reported as they happened.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from logging import Logger, LoggerAdapter
from typing import Any

__all__ = ["RunTasks"]


class RunTasks:
    """The tasks of one run; ``fail(error)`` fails the run, ``log`` is the pipeline's."""

    def __init__(self, log: Logger | LoggerAdapter[Any], fail: Callable[[str], None]) -> None:
        self._log = log
        self._fail = fail
        self.done = asyncio.Event()
        """Set once the run is over: drained, failed, or torn down."""
        self.drained = False
        """The end of the stream came out of the last hop: no call of the run runs any more."""
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping: asyncio.Task[Any] | None = None  # a failed run's capture stopping
        self._teardown: asyncio.Future[None] | None = None

    @property
    def over(self) -> bool:
        """True once the run is over (failed or finished): its state no longer changes."""
        return self.done.is_set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        """Run ``coro`` as task ``name`` of the run, watched."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            if self._teardown is None and not self.over:  # not by the run's own end
                self._log.error("pipeline task %s was cancelled while running", task.get_name())
                self._fail(f"task {task.get_name()} was cancelled while the pipeline ran")
            return
        exc = task.exception()
        if exc is None:
            return
        self._log.error("pipeline task %s died: %r", task.get_name(), exc, exc_info=exc)
        self._fail(f"task {task.get_name()} died: {type(exc).__name__}: {exc}")

    def drained_out(self) -> None:
        """The end of the stream came out of the last hop: the run is over, drained."""
        if not self.done.is_set():
            self.drained = True
            self.done.set()

    def abort(self, stopping: Coroutine[Any, Any, Any] | None) -> None:
        """The run failed: cancel its tasks, run ``stopping`` (its capture's stop) as a task
        :meth:`end` waits for; the run is over."""
        for task in self._tasks:
            task.cancel()
        if stopping is not None:  # kept: the loop holds tasks only weakly
            self._stopping = asyncio.get_running_loop().create_task(stopping)
        self.done.set()

    async def end(self) -> None:
        """Cancel the tasks still running and wait for each one to end."""
        for task in self._tasks:
            if not task.done():
                task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self._stopping is not None:  # a failed run's capture ends with the run
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._stopping
            self._stopping = None

    async def tear_down(self, teardown: Callable[[], Awaitable[None]]) -> None:
        """Run ``teardown`` once, however many callers wait for it; the run is over at its
        end."""
        if self._teardown is None:
            self._teardown = asyncio.ensure_future(self._tear_down(teardown))
        await asyncio.shield(self._teardown)

    async def _tear_down(self, teardown: Callable[[], Awaitable[None]]) -> None:
        try:
            await teardown()
        finally:
            self.done.set()  # a stop that cut the drain short ends the run here
