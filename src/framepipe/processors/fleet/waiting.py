"""The routes of a registry waiting for capacity, and the pulse that wakes them.

Routes that find no free slot for their capability queue per capability in arrival order: a
free slot goes to the first in line (:meth:`Waiting.turn`), never to a route that came later.
Every change that can free a slot or rule a processor out (a request ending, a circuit
opening, the registrations read again) is a pulse (:meth:`Waiting.changed`): the waiting
routes look again then, or when their own wait runs out.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools

__all__ = ["Waiting"]


class Waiting:
    """The waiting routes of one registry."""

    def __init__(self) -> None:
        self._pulse = asyncio.Event()
        self._pulse_waiters = 0
        self._lines: dict[str, collections.deque[int]] = {}  # capability -> tickets of the
        # routes waiting for capacity, in arrival order: only the first may take a free slot
        self._tickets = itertools.count()

    def changed(self) -> None:
        """Wake the routes waiting for a change."""
        if self._pulse_waiters:  # a fresh Event per change only when a route waits on it
            self._pulse.set()
            self._pulse = asyncio.Event()

    async def wait_change(self, seconds: float) -> None:
        """Wait for the next change, at most ``seconds``."""
        self._pulse_waiters += 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pulse.wait(), seconds)
        finally:
            self._pulse_waiters -= 1

    def join(self, capability: str) -> int:
        """Queue a route for ``capability``'s free slots; its ticket."""
        ticket = next(self._tickets)
        self._lines.setdefault(capability, collections.deque()).append(ticket)
        return ticket

    def turn(self, capability: str, ticket: int | None) -> bool:
        """Whether the route holding ``ticket`` (None: not queued) may take a free slot of
        ``capability``: no route waits for one, or it is the first in line."""
        line = self._lines.get(capability)
        return not line or line[0] == ticket

    def leave(self, capability: str, ticket: int) -> None:
        """The route holding ``ticket`` leaves the line: the next in line may take a slot."""
        line = self._lines[capability]
        line.remove(ticket)
        if not line:
            del self._lines[capability]
        self.changed()
