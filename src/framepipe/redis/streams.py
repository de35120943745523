"""Reading Redis Streams: entries out of raw replies, and claiming what is pending."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Fields", "claim_pending", "stream_entries"]

Fields = dict[bytes, bytes]
"""The fields of one stream entry, as Redis gives them (bytes names and values)."""


def stream_entries(reply: Any) -> list[tuple[bytes, Fields | None]]:
    """The entries of a raw ``XREAD``/``XREADGROUP`` reply (one or more streams): ``(id,
    fields)``, fields None for an entry deleted while pending."""
    out: list[tuple[bytes, Fields | None]] = []
    for _stream, entries in reply or ():
        for mid, flat in entries:
            if flat is None:
                out.append((mid, None))
            else:
                pairs = iter(flat)
                out.append((mid, dict(zip(pairs, pairs, strict=True))))
    return out


async def claim_pending(
    redis: Redis, stream: str, group: str, consumer: str, *, count: int
) -> AsyncIterator[list[tuple[bytes, Fields]]]:
    """Claim for ``consumer`` every entry pending in ``group`` of ``stream``, whoever holds it
    and however briefly (``XAUTOCLAIM`` from ``0-0``, ``count`` a batch), batch by batch;
    entries deleted while pending are left out."""
    start: bytes | str = "0-0"
    while True:
        reply = await redis.xautoclaim(stream, group, consumer, 0, start_id=start, count=count)
        start = reply[0]
        yield [(mid, fields) for mid, fields in reply[1] if fields is not None]
        if start in (b"0-0", "0-0"):
            return
