"""Outages of a dependency (a database, Redis, an object store), as one of its users finds
them: :class:`Outage` tells the first failed try from the ones after it and says how long it
lasted, so the user logs one warning when it begins and one line when it ends, whatever the
number of tries between; :func:`cause` is what such a line says of an error.

Credentials refused (a password changed on the server) are a setting to fix, yet a running
user retries them as an outage, because they may be set back: :meth:`Outage.failed` with
``refused=True`` tells the first such try of an outage, whenever in the outage it comes, so
the user says them once, plainly, and once more (the outage's end) when they work again.
"""

from __future__ import annotations

import time

from framepipe.untrusted import storable_text
from framepipe.urls import safe_text

__all__ = ["Outage", "cause"]


def cause(exc: BaseException) -> str:
    """``Type: first line`` of ``exc``, with the secrets of any URL in it masked: a database
    error's further lines (its statement, "Background on this error") are left out."""
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return safe_text(storable_text(text))


class Outage:
    """Failed tries in a row; :meth:`answered` ends them."""

    def __init__(self) -> None:
        self.started: float | None = None
        """``time.monotonic()`` of the first failed try of the outage under way, else None."""
        self.since: float | None = None
        """The wall-clock time of that try (for health and metrics), else None."""
        self.attempts = 0
        """Failed tries of the outage under way."""
        self.last_error: str | None = None
        """:func:`cause` of the last failed try (kept after the outage)."""
        self.refused = False
        """A try of the outage under way failed on credentials refused."""

    @property
    def down(self) -> bool:
        """True while an outage is under way."""
        return self.started is not None

    def failed(self, exc: BaseException, *, refused: bool = False) -> bool:
        """Count a failed try; True when it is the first of an outage (say so then, once).
        ``refused``: the try failed on credentials refused; True then when it is the first
        such try of the outage, whatever failed before it in the outage (say them then,
        once; say nothing of the other failures, which :attr:`refused` then explains)."""
        self.last_error = cause(exc)
        self.attempts += 1
        first = self.started is None
        if first:
            self.started, self.since = time.monotonic(), time.time()
        if refused:
            first, self.refused = not self.refused, True
        return first

    def answered(self) -> float | None:
        """A try worked: the outage under way (if any) is over. Its length in seconds, or
        None when there was none (nothing to say)."""
        if self.started is None:
            return None
        lasted = time.monotonic() - self.started
        self.started = self.since = None
        self.attempts = 0
        self.refused = False
        return lasted
