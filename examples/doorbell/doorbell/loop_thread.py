"""An asyncio event loop on a thread of its own, and blocking calls onto it from other threads.

Guarantees: :func:`start_loop_thread` returns once the loop runs; the loop, once stopped,
finishes its async generators and closes. :func:`run_on` waits for a coroutine run on that
loop and gives its result or raises its error; it refuses, instead of deadlocking, to be
called from the loop's own thread; a timeout or a Ctrl-C while it waits never leaves the
coroutine running unseen: it is cancelled (not started at all when it had not begun).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["run_on", "running_loop", "start_loop_thread"]

T = TypeVar("T")


def start_loop_thread(name: str) -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    """A new event loop running on a new daemon thread called ``name``."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    ready.wait()
    return loop, thread


def run_on(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T], timeout: float | None = None
) -> T:
    """Run ``coro`` on ``loop`` (running on another thread) and wait for its result."""
    if running_loop() is loop:
        coro.close()
        raise RuntimeError(
            "a blocking OrchestratorManager call from inside an event "
            "callback would deadlock; schedule it instead"
        )
    # Not asyncio.run_coroutine_threadsafe: a Ctrl-C inside it (its wake-up of the loop)
    # left the coroutine running with no future to cancel it by.
    future: concurrent.futures.Future[T] = concurrent.futures.Future()
    tasks: list[asyncio.Task[T]] = []

    def begin() -> None:
        if not future.set_running_or_notify_cancel():  # cancelled before it began
            coro.close()
            return
        task = loop.create_task(coro)
        tasks.append(task)
        task.add_done_callback(finish)

    def finish(task: asyncio.Task[T]) -> None:
        if task.cancelled():
            future.set_exception(concurrent.futures.CancelledError())
        elif (error := task.exception()) is not None:
            future.set_exception(error)
        else:
            future.set_result(task.result())

    def cancel() -> None:
        for task in tasks:
            task.cancel()

    try:
        loop.call_soon_threadsafe(begin)
        return future.result(timeout)
    except BaseException:  # a timeout, or Ctrl-C: the call is not left running unseen
        if not future.cancel():  # it began: its task is cancelled on the loop
            loop.call_soon_threadsafe(cancel)
        raise


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
