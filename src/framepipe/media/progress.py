"""Progress of a long operation, reported as 0-100 to a caller's callback, and the check that
stops one (a cancelled job step) between two frames."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

__all__ = ["Progress", "ProgressCallback", "check_stop", "stop_when"]

ProgressCallback = Callable[[float], None]
"""What long operations take as ``progress``: called with 0-100 (a step passes
``ctx.progress``)."""

_STOP: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "media_stop", default=None
)


@contextlib.contextmanager
def stop_when(check: Callable[[], None]) -> Iterator[None]:
    """Within this block (this thread or task), the toolkit calls ``check`` before each frame
    or packet it decodes or demuxes and each unit of work it counts (:meth:`Progress.step`),
    and ``check`` stops the operation by raising (a job step passes ``ctx.check_cancelled``).

    Progress alone cannot stop one: it is reported once per whole percent of an estimate, so
    an operation whose length the header does not tell (a raw ``.h264`` stream: none) or
    understates (past 99 %: none) would report nothing until it ends. The exception leaves no
    output (:func:`~framepipe.media.atomic_output`)."""
    token = _STOP.set(check)
    try:
        yield
    finally:
        _STOP.reset(token)


def check_stop() -> None:
    """Call the check of the enclosing :func:`stop_when` block, if any (it raises to stop)."""
    check = _STOP.get()
    if check is not None:
        check()


class Progress:
    """Reports ``done / total`` as 0-100 to a callback: non-decreasing, below 100 until
    :meth:`finish`, and at most once per whole percent. Each :meth:`step` also calls
    :func:`check_stop`."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self.total = max(0, total)
        self.done = 0
        self._last = -1.0

    def step(self, n: int = 1) -> None:
        check_stop()
        self.done += n
        if self._callback is None or self.total <= 0:
            return
        pct = min(99.0, float(int(100 * self.done / self.total)))
        if pct > self._last:
            self._last = pct
            self._callback(pct)

    def finish(self) -> None:
        if self._callback is not None:
            self._last = 100.0
            self._callback(100.0)
