"""Reading a child process's output pipes line by line, safely.

:func:`lines` is the one reader for the text a child writes (a model's ``progress: N`` lines,
a capture's stderr): it never fails on what the child writes and always drains the pipe, so the
child never blocks on a full pipe however long a line it writes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

__all__ = ["MAX_LINE_BYTES", "lines"]

MAX_LINE_BYTES = 16384
_BREAK = re.compile(rb"[\r\n]")


async def lines(
    stream: asyncio.StreamReader, max_bytes: int = MAX_LINE_BYTES
) -> AsyncIterator[str]:
    """Each line of ``stream`` until its end, decoded as UTF-8 (invalid bytes replaced) and
    without its break. ``\\r`` ends a line as ``\\n`` does, so a progress bar redrawn in place
    gives a line per redraw; empty lines are yielded too. A line longer than ``max_bytes`` is
    cut to its first ``max_bytes`` bytes and the rest of it is read and dropped: memory stays
    bounded and the pipe keeps draining."""
    line = bytearray()
    while chunk := await stream.read(65536):
        parts = _BREAK.split(chunk)
        for ended, part in enumerate(parts):
            if ended:  # a break came before this part: the line so far is complete
                yield line.decode(errors="replace")
                line.clear()
            if (room := max_bytes - len(line)) > 0:
                line += part[:room]
    if line:
        yield line.decode(errors="replace")
