"""An execution's trace travels with it: fp_executions.traceparent.

The W3C ``traceparent`` of the span that marked the execution's submit, written by the submit
only when OpenTelemetry tracing is on; each step attempt's span (in the engine or on a worker)
is its child. NULL: not traced (and every row stored before this revision).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fp_executions") as batch:
        batch.add_column(sa.Column("traceparent", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fp_executions") as batch:
        batch.drop_column("traceparent")
