"""A distributed execution stops in two phases: fp_executions.stopping.

While a failed or cancelled execution still has running steps, its status stays 'running' and
``stopping`` holds the status it will end with ('failed' or 'cancelled'); nothing new starts.
When its last running step ends, the status becomes that value and ``stopping`` is cleared, so
an execution reported finished has no step running, in both modes. NULL otherwise (and for
every row stored before this revision).

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fp_executions") as batch:
        batch.add_column(sa.Column("stopping", sa.String(20), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fp_executions") as batch:
        batch.drop_column("stopping")
