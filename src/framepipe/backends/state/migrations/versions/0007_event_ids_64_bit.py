"""Event ids are 64-bit on PostgreSQL: fp_events.id and its sequence become ``bigint``.

They were an ``integer`` (SERIAL): 2**31 - 1 ids, which a live deployment appending tens of
events a second uses up within a few years, after which every event write fails ("integer out
of range", or the sequence's "reached maximum value"). The column's type changes (its index is
rebuilt with it) and so does its sequence's, keeping its place: the next id is the one it
would have been. SQLite is left as it is: its ids are already 64-bit rowids.

The type change rewrites the table under an exclusive lock, so while the upgrade runs events
are neither written nor read (the jobs and live apps wait for it); its length grows with the
number of stored events (``framepipe db prune-events`` before upgrading shortens it). The
downgrade fails once an id has passed 2**31 - 1.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def _retype(sql_type: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE fp_events ALTER COLUMN id TYPE {sql_type}")
    # The sequence's bounds follow its type only while they are the old type's own.
    sequence = op.get_bind().exec_driver_sql("SELECT pg_get_serial_sequence('fp_events', 'id')")
    op.execute(f"ALTER SEQUENCE {sequence.scalar_one()} AS {sql_type}")


def upgrade() -> None:
    _retype("bigint")


def downgrade() -> None:
    _retype("integer")
