"""The end of a live pipeline's line: what leaves its last queue (:func:`leaving`).

Guarantees:

* Items are taken in the order they reach the last queue, until the end of stream (which
  comes after everything queued before it); then the iteration ends.
* A segment marker completes its segment (``complete``): it followed the segment's frames
  through every sink, so every sink is done with them.
* Each frame that left the pipeline is yielded once; control items are neither yielded nor
  counted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from framepipe.stream.queue import FrameQueue
from framepipe.stream.segment import Segment, SegmentMarker
from framepipe.stream.stage import END

__all__ = ["leaving"]


async def leaving(queue: FrameQueue, complete: Callable[[Segment], None]) -> AsyncIterator[Any]:
    """The frames that leave the pipeline through ``queue`` (see the module)."""
    while True:
        item = await queue.get()
        if item is END:
            return
        if isinstance(item, SegmentMarker):
            complete(item.segment)
        elif not getattr(item, "control", False):
            yield item
