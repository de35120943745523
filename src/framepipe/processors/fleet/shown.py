"""Text from a stream or a record as a log line may show it.

A frame id, a processor id, a field of an entry or a record: whatever a camera, a router or a
hostile writer put there reaches the processor's and the registry's logs. :func:`loggable`
(the rule of every component, :mod:`framepipe.logs`) bounds it and escapes what could forge or
break a line.
"""

from __future__ import annotations

from framepipe.logs import LOGGED_CHARS, loggable

__all__ = ["LOGGED_CHARS", "loggable"]
