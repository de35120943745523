"""Distributed jobs: per-execution counters, step leases, dependency edges, workers.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fp_executions") as batch:
        batch.add_column(sa.Column("mode", sa.String(10), nullable=False, server_default="local"))
        for name in ("unfinished", "active", "next_seq", "next_done_seq"):
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default="0"))
        for name in ("wsum", "wtotal"):
            batch.add_column(sa.Column(name, sa.Float, nullable=False, server_default="0"))
    with op.batch_alter_table("fp_steps") as batch:
        batch.add_column(sa.Column("waiting", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_until", sa.Float, nullable=True))
        batch.add_column(sa.Column("worker", sa.String(200), nullable=True))
        batch.add_column(sa.Column("published_at", sa.Float, nullable=True))
    for name, column, status in (
        ("ix_fp_steps_running", "lease_until", "running"),
        ("ix_fp_steps_ready", "published_at", "ready"),
        ("ix_fp_steps_retrying", "next_attempt_at", "retrying"),
    ):
        where = sa.text(f"status = '{status}'")
        op.create_index(name, "fp_steps", [column], postgresql_where=where, sqlite_where=where)
    op.create_table(
        "fp_step_deps",
        sa.Column(
            "execution_id",
            sa.String(32),
            sa.ForeignKey("fp_executions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("dep", sa.String(300), primary_key=True),
        sa.Column("step_key", sa.String(300), primary_key=True),
        sa.Column("kind", sa.String(4), nullable=False),
    )
    op.create_table(
        "fp_workers",
        sa.Column("id", sa.String(200), primary_key=True),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("concurrency", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
        sa.Column("steps_done", sa.Integer, nullable=False, server_default="0"),
        sa.Column("output_tail", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("fp_workers")
    op.drop_table("fp_step_deps")
    for name in ("ix_fp_steps_retrying", "ix_fp_steps_ready", "ix_fp_steps_running"):
        op.drop_index(name, "fp_steps")
    with op.batch_alter_table("fp_steps") as batch:
        for name in ("published_at", "worker", "lease_until", "waiting"):
            batch.drop_column(name)
    with op.batch_alter_table("fp_executions") as batch:
        for name in ("wtotal", "wsum", "next_done_seq", "next_seq", "active", "unfinished", "mode"):
            batch.drop_column(name)
