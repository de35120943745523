"""An event id is never given out twice: on SQLite fp_events.id becomes AUTOINCREMENT.

fp_events.id was a plain rowid there, which SQLite hands out as the largest id in the table
plus one: once the newest events were deleted (``framepipe db prune-events`` removes app
events by age), the next events got their ids again, below the id a reader had already paged
past (``/ws`` and ``GET /api/events?after=``), and were never read. With AUTOINCREMENT SQLite
remembers the largest id ever given (``sqlite_sequence``). The table is rebuilt with its rows
and ids kept; the largest kept id seeds the sequence (ids reused before this revision cannot be
told apart).

PostgreSQL is left as it is: its sequence never gives an id twice. (Its ``integer`` column is
widened to ``bigint`` by 0007.)

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_COLUMNS = "id, ts, type, execution_id, step_key, data"


def _rebuild(*, autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    op.create_table(
        "_fp_events_rebuilt",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("type", sa.String(60), nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=True),
        sa.Column("step_key", sa.String(300), nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
        sqlite_autoincrement=autoincrement,
    )
    op.execute(
        f"INSERT INTO _fp_events_rebuilt ({_COLUMNS}) SELECT {_COLUMNS} FROM fp_events ORDER BY id"
    )
    op.drop_table("fp_events")
    op.rename_table("_fp_events_rebuilt", "fp_events")
    op.create_index("ix_fp_events_execution", "fp_events", ["execution_id", "id"])


def upgrade() -> None:
    _rebuild(autoincrement=True)


def downgrade() -> None:
    _rebuild(autoincrement=False)
