"""The pipeline starts an app has under way (of ``start()``, ``add()``, ``resume()`` or a
recovery), each a task of its own.

Guarantees: a start launched here runs to its end even when whoever awaits it is cancelled (it
is shielded by its caller and held here until done): a start is never cut half-way (its stages
set up, its capture not yet supervised). :meth:`Starts.of` returns once no start of one
pipeline is under way, :meth:`Starts.all` once none at all is, including starts launched while
it waited.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

__all__ = ["Starts"]


class Starts:
    """The starts under way, each with the name of the pipeline it starts."""

    def __init__(self) -> None:
        self._in_flight: dict[asyncio.Task[Any], str] = {}

    def launch(self, start: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run pipeline ``name``'s ``start`` as a task of its own, held until it ends."""
        task = asyncio.ensure_future(start)
        self._in_flight[task] = name
        task.add_done_callback(lambda done: self._in_flight.pop(done, None))
        return task

    async def of(self, name: str) -> None:
        """Return once no start of pipeline ``name`` is under way."""
        while starts := {t for t, n in self._in_flight.items() if n == name}:
            await asyncio.wait(starts)

    async def all(self) -> None:
        """Return once no start is under way."""
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))
