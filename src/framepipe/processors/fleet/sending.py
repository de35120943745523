"""What a route writes: an item's stream fields, and the script that adds each entry to its
processor's stream only while the processor is ``ready``.

Entries go out by :data:`~framepipe.redis.scripts.ROUTE` (run by its SHA) at once on one
connection, so concurrent routes pipeline by themselves and a batch is written in one go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from framepipe.frames import Frame
from framepipe.processors.fleet.frame_entries import Routable, entry_fields, frame_entry
from framepipe.processors.fleet.registry import Registration
from framepipe.redis.scripts import ROUTE
from framepipe.redis.wire import Wire

__all__ = ["INLINE_ENCODE_PIXELS", "send_entries", "stream_fields"]

INLINE_ENCODE_PIXELS = 256 * 256
"""Frames up to this many pixels are JPEG-encoded on the event loop (at most about 0.2 ms
here; the hand-off to a thread costs more than that); larger ones in the default executor."""


async def stream_fields(item: Routable, quality: int, trace: str | None) -> dict[str, bytes | str]:
    """``item``'s stream fields; ``trace`` (the send span's) replaces its trace context."""
    if isinstance(item, Mapping):
        entry = entry_fields(item)
        if trace is not None:
            entry["trace_context"] = trace
        return entry
    if isinstance(item, Frame):
        if item.width * item.height <= INLINE_ENCODE_PIXELS:
            return frame_entry(item, quality=quality, trace_context=trace)
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: frame_entry(item, quality=quality, trace_context=trace)
        )
    raise TypeError(f"cannot route a {type(item).__name__}: give a Frame or an entry dict")


async def send_entries(
    wire: Wire, items: list[tuple[Registration, dict[str, bytes | str]]]
) -> list[Any]:
    """XADD each entry to its processor's stream (only while ready), pipelined on ``wire``.
    Results: message id, None (not ready) or an exception."""
    calls = []
    for proc, fields in items:
        args: list[bytes | str] = [proc.hash_key, proc.stream]
        for pair in fields.items():
            args += pair
        calls.append(args)
    try:
        return await wire.run_many(ROUTE, calls, keys=2)
    except Exception as exc:
        return [exc] * len(items)
