"""The engine's database thread, as the helpers it composes see it: :class:`InDatabase`.

The embedded engine makes every store call from one thread of its own
(:meth:`~framepipe.jobs.group_commit.GroupCommit._in_db`): they run one at a time, in the
order they are asked for, between its group commits. A helper given an :class:`InDatabase`
makes its store calls through it, so they are ordered with the engine's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

__all__ = ["InDatabase"]

T = TypeVar("T")


class InDatabase(Protocol):
    """Runs ``fn(*args)`` in the engine's database thread and returns its result."""

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T: ...
