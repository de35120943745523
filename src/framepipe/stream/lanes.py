"""Worker threads of a hop, and the one way their results come back to the event loop.

``loop.run_in_executor`` costs about 70 us of CPU a call on a loaded machine: a
``concurrent.futures.Future`` chained to an asyncio one, a lock, and one write to the loop's
wake-up pipe for every result. A live pipeline makes two or three such hand-offs a frame, for
every camera. A :class:`ThreadLane` hands a call to its threads through a plain queue, and
every result goes back through the loop's :class:`Inbox`: results that complete while the
loop is busy are delivered in one wake-up, in the order they completed.

Guarantees: each call runs exactly once, in one of the lane's threads; its future gets its
result, or its exception (any ``BaseException`` raised in the call); a future cancelled
meanwhile is left cancelled; calls submitted after :meth:`ThreadLane.shutdown` are refused.

A call that a stop may abandon (a sink's ``segment_closed``, the ``teardown`` of a processor
run on the event loop) goes through :func:`run_detached` instead: a daemon thread of its own,
so one that never returns holds neither the stop nor the program's exit (asyncio's default
executor would: ``asyncio.run`` joins its threads before it returns), and a warning names it
when its caller gives up on it.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import weakref
from collections.abc import Callable
from logging import Logger, LoggerAdapter
from typing import Any, TypeVar

__all__ = ["Inbox", "ThreadLane", "inbox_for", "run_detached"]

_T = TypeVar("_T")


class Inbox:
    """Results for one event loop, posted from any thread, delivered on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        # weak: the inbox is the value of its loop's entry in a WeakKeyDictionary
        self._loop = weakref.ref(loop)
        self._items: collections.deque[tuple[asyncio.Future[Any], Any, BaseException | None]]
        self._items = collections.deque()
        self._armed = False  # a delivery is scheduled on the loop and has not started yet

    def post(self, future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
        """Deliver ``result`` (or ``error``) to ``future`` on the loop. Thread-safe. The item
        is queued before the flag is read, so a delivery that has started (and cleared the
        flag) or one scheduled after it always finds it."""
        self._items.append((future, result, error))
        if self._armed:
            return
        self._armed = True
        loop = self._loop()
        if loop is None:  # the loop is gone: nobody waits for the result any more
            return
        try:
            loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: likewise
            self._armed = False

    def _deliver(self) -> None:
        self._armed = False
        items = self._items
        while items:
            future, result, error = items.popleft()
            if future.done():  # cancelled while the call ran
                continue
            if error is None:
                future.set_result(result)
            elif isinstance(error, StopIteration):  # a future refuses it, as a coroutine does
                future.set_exception(RuntimeError(f"call raised StopIteration: {error}"))
            else:
                future.set_exception(error)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def inbox_for(loop: asyncio.AbstractEventLoop) -> Inbox:
    """The one :class:`Inbox` of ``loop`` (shared by every lane that loop hands work to, so
    results of different hops share wake-ups too)."""
    with _inboxes_lock:
        inbox = _inboxes.get(loop)
        if inbox is None:
            inbox = _inboxes[loop] = Inbox(loop)
        return inbox


_Job = tuple[Inbox, asyncio.Future[Any], Callable[..., Any], tuple[Any, ...]]


class ThreadLane:
    """``workers`` daemon threads named ``<name>-<i>``, started at the first call."""

    def __init__(self, workers: int, name: str) -> None:
        if workers < 1:
            raise ValueError(f"lane {name!r}: workers must be >= 1, got {workers}")
        self.workers = workers
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """Run ``fn(*args)`` in one of the lane's threads; call on the event loop."""
        if self._closed:
            raise RuntimeError(f"lane {self.name!r} is shut down")
        if not self._threads:
            self._start()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._jobs.put((inbox_for(loop), future, fn, args))
        return future

    def _start(self) -> None:
        for i in range(self.workers):
            thread = threading.Thread(target=self._run, name=f"{self.name}-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            inbox, future, fn, args = job
            _answer(inbox, future, fn, args)

    def shutdown(self) -> None:
        """Refuse new calls; each thread ends after the calls queued before this one."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(None)


def _answer(inbox: Inbox, future: asyncio.Future[Any], fn: Callable[..., Any], args: Any) -> None:
    """Call ``fn(*args)`` in this thread and post its result or exception to ``future``
    through ``inbox``."""
    try:
        result = fn(*args)
    except BaseException as exc:  # the caller's to handle, as with an executor
        inbox.post(future, None, exc)
    else:
        inbox.post(future, result, None)


async def run_detached(
    fn: Callable[..., _T],
    *args: Any,
    what: str,
    thread: str,
    log: Logger | LoggerAdapter[Any],
) -> _T:
    """``fn(*args)`` in a daemon thread of its own named ``thread``: its result, or its
    exception, as with ``loop.run_in_executor`` (it comes back through the loop's
    :class:`Inbox`). Cancelled while the call runs, this abandons the call: a warning naming it
    (``what``) is logged and the thread is left to finish on its own; being a daemon thread, it
    does not hold the program's exit if it never does."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    inbox = inbox_for(loop)

    worker = threading.Thread(
        target=_answer, args=(inbox, future, fn, args), name=thread, daemon=True
    )
    worker.start()
    try:
        return await future
    except asyncio.CancelledError:
        if worker.is_alive():
            log.warning(
                "%s abandoned while it ran (a call that never returns?): left to finish on its "
                "own in daemon thread %r, which neither the stop nor the program's exit waits for",
                what,
                thread,
            )
        raise
