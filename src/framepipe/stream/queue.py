"""A bounded queue of frames with an overflow policy.

``block``: a full queue makes ``put`` wait (backpressure up to the source). ``drop_oldest``: a
full queue drops its oldest *frame* to make room (live video: the newest frame matters most);
drops are counted. Control items (segment markers, end of stream) are never dropped, and a
queue may briefly exceed its size by them.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any, Literal

__all__ = ["FrameQueue", "Overflow"]

Overflow = Literal["block", "drop_oldest"]


class FrameQueue:
    """FIFO of items for one event loop; ``put``/``get`` are cancellation-safe."""

    def __init__(self, maxsize: int, overflow: Overflow = "block") -> None:
        if maxsize < 1:
            raise ValueError(f"queue size must be >= 1, got {maxsize}")
        if overflow not in ("block", "drop_oldest"):
            raise ValueError(f"overflow must be 'block' or 'drop_oldest', got {overflow!r}")
        self.maxsize = maxsize
        self.overflow = overflow
        self.dropped = 0
        self._items: collections.deque[Any] = collections.deque()
        self._getters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._putters: collections.deque[asyncio.Future[None]] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    @staticmethod
    def _wake(waiters: collections.deque[asyncio.Future[None]]) -> None:
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _frames(self) -> int:
        return sum(1 for item in self._items if not getattr(item, "control", False))

    async def put(self, item: Any) -> None:
        """Add ``item``: waits while full (``block``) or drops the oldest frame."""
        control = getattr(item, "control", False)
        if not control:
            if self.overflow == "drop_oldest":
                while len(self._items) >= self.maxsize and self._drop_one():
                    pass
            else:
                while len(self._items) >= self.maxsize:
                    waiter = asyncio.get_running_loop().create_future()
                    self._putters.append(waiter)
                    try:
                        await waiter
                    except BaseException:
                        waiter.cancel()
                        if len(self._items) < self.maxsize:
                            self._wake(self._putters)
                        raise
        self._items.append(item)
        self._wake(self._getters)

    def _drop_one(self) -> bool:
        for i, old in enumerate(self._items):
            if not getattr(old, "control", False):
                del self._items[i]
                self.dropped += 1
                return True
        return False

    def get_frame_nowait(self) -> Any | None:
        """The oldest item if there is one and it is not a control item, else None."""
        if not self._items or getattr(self._items[0], "control", False):
            return None
        item = self._items.popleft()
        self._wake(self._putters)
        return item

    def put_control(self, item: Any) -> None:
        """Add a control item now (never blocks, never dropped); usable from callbacks."""
        self._items.append(item)
        self._wake(self._getters)

    async def get(self) -> Any:
        """Remove and return the oldest item, waiting for one."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._getters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                if self._items:
                    self._wake(self._getters)
                raise
        item = self._items.popleft()
        self._wake(self._putters)
        return item
