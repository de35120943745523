"""State backend: SQLAlchemy Core schema and store (SQLite embedded, PostgreSQL distributed)."""

from framepipe.backends.state.schema import (
    SCHEMA_HEAD,
    events,
    executions,
    ledger,
    metadata,
    objects_left,
    step_deps,
    steps,
    workers,
)
from framepipe.backends.state.store import StateStore

__all__ = [
    "SCHEMA_HEAD",
    "StateStore",
    "events",
    "executions",
    "ledger",
    "metadata",
    "objects_left",
    "step_deps",
    "steps",
    "workers",
]
