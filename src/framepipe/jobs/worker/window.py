"""A worker's claim window (:class:`ClaimWindow`): how many steps it may hold at once and how
many it holds, reserved by its reader or a take-over before a claim, or held by a claimed step
until the step's code is done.

The window's lock is the worker's one lock: it also guards its runs' flags and what they
reported (:mod:`framepipe.jobs.worker.runs`), so a step's end marks its run finished, queues
its outcome and frees its slot at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

__all__ = ["ClaimWindow"]

_SHORT_STEP = 0.05
_PAUSE_AFTER = 0.2  # a worker full for this long pauses its delivery (see ClaimWindow.reserve)


class ClaimWindow:
    """``concurrency`` slots, times ``prefetch`` while recent steps are short (:attr:`capacity`).

    A slot is taken by :meth:`reserve` or :meth:`take_free` and given back by :meth:`release`
    (reserved, not claimed) or :meth:`step_ended` (the step's code is done); nothing is
    reserved once ``stopping`` is set, except by :meth:`take_free`, whose callers check it."""

    def __init__(
        self,
        lock: threading.Lock,
        *,
        concurrency: int,
        prefetch: int,
        stopping: threading.Event,
    ) -> None:
        self.lock = lock
        self.concurrency = concurrency
        self._prefetch = prefetch
        self._stopping = stopping
        self._slots = threading.Condition(lock)
        self._taken = 0  # slots reserved by the reader or held by running steps
        self.avg_run: float | None = None  # moving average of step run times, seconds

    @property
    def capacity(self) -> int:
        """How many steps the worker holds at most: ``concurrency``, times ``prefetch`` while
        its recent steps are short (under 50 ms on average)."""
        avg = self.avg_run
        if avg is not None and avg < _SHORT_STEP:
            return self.concurrency * self._prefetch
        return self.concurrency

    def reserve(self, pause: Callable[[], None]) -> int:
        """Wait for free slots and reserve them all; 0 once stopping. A worker full for
        ``_PAUSE_AFTER`` seconds calls ``pause`` (its delivery's: RabbitMQ then stops pushing
        to it and requeues what it sent ahead); the next take resumes it."""
        full_since: float | None = None
        paused = False
        while True:
            with self.lock:
                if self._stopping.is_set():
                    return 0
                free = self.capacity - self._taken
                if free > 0:
                    self._taken += free
                    return free
                self._slots.wait(0.5 if paused else 0.05)
            now = time.monotonic()
            full_since = full_since or now
            if not paused and now - full_since >= _PAUSE_AFTER:
                pause()
                paused = True

    def take_free(self) -> int:
        """Reserve every slot free now, without waiting; how many (maybe 0)."""
        with self.lock:
            free = max(0, self.capacity - self._taken)
            self._taken += free
            return free

    def release(self, n: int) -> None:
        """Give back ``n`` reserved slots that were not claimed (or whose run was cut off)."""
        if n <= 0:
            return
        with self.lock:
            self._taken -= n
            self._slots.notify_all()

    def step_ended(self, began: float | None) -> None:
        """A claimed step's code is done; the caller holds :attr:`lock`. Its slot is free, so
        the next step may be claimed while its outcome is being committed; its run time (since
        ``began``, a monotonic time, if it began) counts in the average."""
        if began is not None:
            took = time.monotonic() - began
            avg = self.avg_run
            self.avg_run = took if avg is None else 0.8 * avg + 0.2 * took
        self._taken -= 1
        self._slots.notify_all()

    def wake_waiters(self) -> None:
        """Wake a :meth:`reserve` waiting for a slot (to see the stop)."""
        with self.lock:
            self._slots.notify_all()
