"""Interrupting PyAV's blocking open and reads from another thread.

FFmpeg stops a blocking call (opening an input, reading a packet) when the container's
interrupt callback says so; it asks at least every 100 ms while it waits for the network.
PyAV's callback only says so once the call has taken longer than its ``timeout``, which it
measures by ``time.monotonic()`` read through the module of its containers
(``av.container.core``); it offers no way to ask for a stop. :func:`interruptible` installs
there a clock that reads as the real one, except in a thread that registered a stop flag
(:func:`watching`) once that flag is set: from then on each of that thread's readings is
a century past the one before, so every timeout has run out and the blocking call returns
at FFmpeg's next check.

Guarantees:

* Threads that registered no flag, or whose flag is not set, see the real monotonic clock:
  PyAV's own timeouts, in this thread and every other, behave as before.
* A stopped thread's readings keep increasing, so PyAV never takes them for a clock set
  back.
* Only a container opened with a timeout asks the clock (PyAV skips its callback without
  one): pass ``timeout=`` to ``av.open``.
* Where PyAV reads its clock otherwise (a version without that module global), nothing is
  installed, :func:`interruptible` returns False, and a blocking call ends by its timeout
  alone, as before.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

__all__ = ["interruptible", "watching"]

_STEP = 3.2e9
"""Seconds (about a century) that each reading of a stopped thread's clock moves on: more
than any timeout."""

_local = threading.local()
_install_lock = threading.Lock()


class _Clock:
    """Stands for the ``time`` module in PyAV's container module: ``monotonic`` as described
    above, everything else the ``time`` module's own."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def monotonic(self) -> float:
        now: float = self._real.monotonic()
        stop: threading.Event | None = getattr(_local, "stop", None)
        if stop is None or not stop.is_set():
            return now
        skew: float = getattr(_local, "skew", 0.0) + _STEP
        _local.skew = skew
        return now + skew

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@functools.cache
def interruptible() -> bool:
    """Install the clock (once per process); True when PyAV's blocking calls can be
    interrupted by a registered stop flag."""
    try:
        from av.container import core
    except ImportError:
        return False
    with _install_lock:
        current = getattr(core, "time", None)
        if isinstance(current, _Clock):
            return True
        if current is not time:
            return False
        core.time = _Clock(time)  # type: ignore[attr-defined]
        return True


@contextmanager
def watching(stop: threading.Event) -> Iterator[None]:
    """Within the block, the PyAV calls of this thread end soon after ``stop`` is set (when
    :func:`interruptible`)."""
    interruptible()
    previous = getattr(_local, "stop", None)
    _local.stop, _local.skew = stop, 0.0
    try:
        yield
    finally:
        _local.stop, _local.skew = previous, 0.0
