"""Text from a stream or a record as a log line may show it.

A frame id, a processor id, a field of an entry or a record: whatever a camera, a router or a
hostile writer put there reaches the processor's and the registry's logs. :func:`loggable`
bounds it and escapes what could forge or break a line.
"""

from __future__ import annotations

__all__ = ["LOGGED_CHARS", "loggable"]

LOGGED_CHARS = 120
"""At most this many characters of a value are shown (its head and its tail)."""


def _escape(char: str) -> str:
    code = ord(char)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def loggable(value: bytes | str | None, limit: int = LOGGED_CHARS) -> str:
    """``value`` for a log line: bytes decoded as UTF-8 (a bad byte replaced); longer than
    ``limit`` characters, its head and tail around a marker with its length
    (``ab…[200000 chars]…yz``); then every character that is not printable (NUL, newline,
    carriage return, tab, other controls, line separators, lone surrogates) written as its
    escape (``\\x00``, ``\\n`` as ``\\x0a``, ``\\u2028``). The result is one line of at most
    about ``10 x limit`` characters whatever ``value`` holds; printable text is unchanged."""
    if value is None:
        return ""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    if len(text) > limit:
        head = max(1, limit * 2 // 3)
        tail = max(1, limit - head)
        text = f"{text[:head]}…[{len(text)} chars]…{text[-tail:]}"
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)
