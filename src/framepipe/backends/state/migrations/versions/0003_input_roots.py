"""Confinement of local paths travels with the execution: fp_executions.input_roots.

NULL (every execution stored before this revision, and those submitted from the command line
or the Python API) means local paths are unrestricted; a JSON list of folders confines them.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fp_executions") as batch:
        batch.add_column(sa.Column("input_roots", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fp_executions") as batch:
        batch.drop_column("input_roots")
