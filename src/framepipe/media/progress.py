"""Progress of a long operation, reported as 0-100 to a caller's callback."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "ProgressCallback"]

ProgressCallback = Callable[[float], None]
"""What long operations take as ``progress``: called with 0-100 (a step passes
``ctx.progress``)."""


class Progress:
    """Reports ``done / total`` as 0-100 to a callback: non-decreasing, below 100 until
    :meth:`finish`, and at most once per whole percent."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self.total = max(0, total)
        self.done = 0
        self._last = -1.0

    def step(self, n: int = 1) -> None:
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
