"""Reading Redis Streams: entries out of raw replies."""

from __future__ import annotations

from typing import Any

__all__ = ["Fields", "stream_entries"]

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
