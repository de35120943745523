"""Retention of the event table: live apps' events (orders, visits, sources, tags) are pruned
after a while; an execution's events stay as long as its execution.

:func:`prune_events` deletes the app events (``execution_id`` NULL) older than a cutoff, in
batches of ``batch`` rows, each batch its own transaction, so a long prune never holds a lock
that stops the engine or an app from writing. ``framepipe db prune-events --older-than 7d``
runs it by hand; ``FRAMEPIPE_EVENTS_RETENTION_DAYS`` makes :class:`~framepipe.StoreEventSink`
run it every hour.
"""

from __future__ import annotations

import re
import time

import sqlalchemy as sa

from framepipe.backends.state.schema import events
from framepipe.backends.state.store import StateStore

__all__ = ["parse_duration", "prune_events"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``"90"``, ``"30m"``, ``"12h"``, ``"7d"`` or ``"2w"``; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration: use a number of seconds or 30m, 12h, 7d, 2w")
    return float(match[1]) * _UNITS[(match[2] or "s").lower()]


def prune_events(
    store: StateStore, older_than: float, *, batch: int = 5000, now: float | None = None
) -> int:
    """Delete app events older than ``older_than`` seconds; return how many were deleted."""
    if older_than < 0:
        raise ValueError(f"older_than must be >= 0 seconds, got {older_than}")
    cutoff = (time.time() if now is None else now) - older_than
    deleted = 0
    while True:
        chosen = (
            sa.select(events.c.id)
            .where(events.c.execution_id.is_(None), events.c.ts < cutoff)
            .order_by(events.c.id)
            .limit(batch)
        )
        with store.write() as conn:
            ids = list(conn.execute(chosen).scalars())
            if ids:
                conn.execute(events.delete().where(events.c.id.in_(ids)))
        deleted += len(ids)
        if len(ids) < batch:
            return deleted
