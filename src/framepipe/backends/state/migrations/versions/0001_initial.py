"""Initial schema: executions, steps, events, ledger.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "fp_executions",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("pipeline", sa.String(200), nullable=False),
        sa.Column("pipeline_ref", sa.Text, nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("inputs", sa.JSON, nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("owner", sa.String(200), nullable=True),
        sa.Column("heartbeat_at", sa.Float, nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("runs", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    op.create_index("ix_fp_executions_status", "fp_executions", ["status"])
    op.create_index("ix_fp_executions_created", "fp_executions", ["created_at"])
    op.create_table(
        "fp_steps",
        sa.Column(
            "execution_id",
            sa.String(32),
            sa.ForeignKey("fp_executions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("key", sa.String(300), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("depends_on", sa.JSON, nullable=False),
        sa.Column("spawned_by", sa.String(300), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("weight", sa.Float, nullable=False),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("message", sa.Text, nullable=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("crashes", sa.Integer, nullable=False),
        sa.Column("output", sa.JSON, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("done_seq", sa.Integer, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("ready_at", sa.Float, nullable=True),
        sa.Column("started_at", sa.Float, nullable=True),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Column("next_attempt_at", sa.Float, nullable=True),
    )
    op.create_table(
        "fp_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("ts", sa.Float, nullable=False),
        sa.Column("type", sa.String(60), nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=True),
        sa.Column("step_key", sa.String(300), nullable=True),
        sa.Column("data", sa.JSON, nullable=False),
    )
    op.create_index("ix_fp_events_execution", "fp_events", ["execution_id", "id"])
    op.create_table(
        "fp_ledger",
        sa.Column("namespace", sa.String(200), primary_key=True),
        sa.Column("identity", sa.String(500), primary_key=True),
        sa.Column("content_hash", sa.String(128), nullable=True),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("meta", sa.JSON, nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=True),
        sa.Column("step_key", sa.String(300), nullable=True),
        sa.Column("imported_at", sa.Float, nullable=False),
    )
    op.create_index("ix_fp_ledger_hash", "fp_ledger", ["namespace", "content_hash"])


def downgrade() -> None:
    op.drop_table("fp_ledger")
    op.drop_table("fp_events")
    op.drop_table("fp_steps")
    op.drop_table("fp_executions")
