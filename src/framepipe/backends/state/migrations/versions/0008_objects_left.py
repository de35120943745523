"""The objects a prune could not delete are remembered: fp_objects_left.

A prune deletes an execution's records, then its objects; an object the store failed to
delete was named once and then forgotten, since no record was left to name it. Each such
prefix is now a row with its object store's URL, which the next prune with objects of that
store tries again and deletes once its objects are gone.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fp_objects_left",
        sa.Column("store", sa.String(1000), primary_key=True),
        sa.Column("prefix", sa.String(1000), primary_key=True),
        sa.Column("execution_id", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("since", sa.Float, nullable=False),
        sa.Column("tries", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("fp_objects_left")
