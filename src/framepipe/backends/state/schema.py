"""The state schema (SQLAlchemy Core): executions, steps, events, the import ledger and the
objects a prune left.

Times are unix seconds (floats) so SQLite and PostgreSQL store and compare them alike.
The schema only changes through the migrations in ``migrations/versions``; ``SCHEMA_HEAD`` is
the revision this code expects.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = [
    "EVENT_ID_MAX",
    "EVENT_TYPE_MAX",
    "SCHEMA_HEAD",
    "VERSION_TABLE",
    "events",
    "executions",
    "ledger",
    "metadata",
    "objects_left",
    "step_deps",
    "steps",
    "workers",
]

SCHEMA_HEAD = "0008"

VERSION_TABLE = "fp_alembic_version"
"""The table framepipe's schema revision is stamped in: its own, not Alembic's default
``alembic_version``, which an application sharing the database may keep its revision in."""

EVENT_TYPE_MAX = 60
"""The longest event type ``fp_events.type`` holds (characters)."""

metadata = sa.MetaData()

executions = sa.Table(
    "fp_executions",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("pipeline", sa.String(200), nullable=False),
    sa.Column("pipeline_ref", sa.Text, nullable=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("inputs", sa.JSON, nullable=False),
    sa.Column("progress", sa.Float, nullable=False, default=0.0),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("owner", sa.String(200), nullable=True),
    sa.Column("heartbeat_at", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("runs", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    # Kept by the workers of a distributed execution (mode 'workers') under its row lock;
    # the embedded engine keeps these counts in memory and leaves the columns at 0.
    sa.Column("mode", sa.String(10), nullable=False, server_default="local"),
    sa.Column("unfinished", sa.Integer, nullable=False, server_default="0"),
    sa.Column("active", sa.Integer, nullable=False, server_default="0"),
    sa.Column("wsum", sa.Float, nullable=False, server_default="0"),
    sa.Column("wtotal", sa.Float, nullable=False, server_default="0"),
    sa.Column("next_seq", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_done_seq", sa.Integer, nullable=False, server_default="0"),
    # The folders whose local files the submitter may name (resolved absolute paths), or
    # NULL: unrestricted (the command line, the Python API). Written by the submit only,
    # never updated (a retry keeps it); steps see it as StepContext.input_roots.
    sa.Column("input_roots", sa.JSON(none_as_null=True), nullable=True),
    # A distributed execution that failed or was cancelled while steps of it still run: the
    # status it ends with once they have ended ('failed', 'cancelled'); NULL otherwise.
    sa.Column("stopping", sa.String(20), nullable=True),
    # The W3C traceparent of the submit's span when OpenTelemetry tracing is on (its steps'
    # spans are its children, in the engine or on a worker); NULL: not traced.
    sa.Column("traceparent", sa.String(64), nullable=True),
    sa.Index("ix_fp_executions_status", "status"),
    sa.Index("ix_fp_executions_created", "created_at"),
)

steps = sa.Table(
    "fp_steps",
    metadata,
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
    # Distributed executions: unmet step-key dependencies, the lease of the running attempt,
    # the worker holding it, and when the step was last handed to the broker.
    sa.Column("waiting", sa.Integer, nullable=False, server_default="0"),
    sa.Column("lease_until", sa.Float, nullable=True),
    sa.Column("worker", sa.String(200), nullable=True),
    sa.Column("published_at", sa.Float, nullable=True),
    # Partial indexes for the workers' sweeps, and no other index leading with execution_id:
    # on a fresh table without statistics PostgreSQL would pick one for a claim and scan every
    # step of the execution instead of looking the keys up by primary key.
    sa.Index(
        "ix_fp_steps_running",
        "lease_until",
        postgresql_where=sa.text("status = 'running'"),
        sqlite_where=sa.text("status = 'running'"),
    ),
    sa.Index(
        "ix_fp_steps_ready",
        "published_at",
        postgresql_where=sa.text("status = 'ready'"),
        sqlite_where=sa.text("status = 'ready'"),
    ),
    sa.Index(
        "ix_fp_steps_retrying",
        "next_attempt_at",
        postgresql_where=sa.text("status = 'retrying'"),
        sqlite_where=sa.text("status = 'retrying'"),
    ),
)

step_deps = sa.Table(
    "fp_step_deps",
    metadata,
    sa.Column(
        "execution_id",
        sa.String(32),
        sa.ForeignKey("fp_executions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("dep", sa.String(300), primary_key=True),
    sa.Column("step_key", sa.String(300), primary_key=True),
    # 'key': waits for that one step; 'name': for every instance of a parameterised step.
    sa.Column("kind", sa.String(4), nullable=False),
)

workers = sa.Table(
    "fp_workers",
    metadata,
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

events = sa.Table(
    "fp_events",
    metadata,
    # 64-bit ids (migration 0007 on PostgreSQL); on SQLite INTEGER, the 64-bit rowid itself.
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("ts", sa.Float, nullable=False),
    sa.Column("type", sa.String(EVENT_TYPE_MAX), nullable=False),
    sa.Column("execution_id", sa.String(32), nullable=True),
    sa.Column("step_key", sa.String(300), nullable=True),
    sa.Column("data", sa.JSON, nullable=False),
    sa.Index("ix_fp_events_execution", "execution_id", "id"),
    # SQLite: an id is never given twice, even after the newest events were deleted (a plain
    # rowid would give them again, below the id a reader has paged past); migration 0006.
    sqlite_autoincrement=True,
)

EVENT_ID_MAX = 2**63 - 1
"""The largest id ``fp_events.id`` holds on either database (a ``bigint``, a SQLite rowid)."""

ledger = sa.Table(
    "fp_ledger",
    metadata,
    sa.Column("namespace", sa.String(200), primary_key=True),
    sa.Column("identity", sa.String(500), primary_key=True),
    sa.Column("content_hash", sa.String(128), nullable=True),
    sa.Column("size", sa.BigInteger, nullable=True),
    sa.Column("meta", sa.JSON, nullable=False),
    sa.Column("execution_id", sa.String(32), nullable=True),
    sa.Column("step_key", sa.String(300), nullable=True),
    sa.Column("imported_at", sa.Float, nullable=False),
    sa.Index("ix_fp_ledger_hash", "namespace", "content_hash"),
)

objects_left = sa.Table(
    "fp_objects_left",
    metadata,
    # A prefix of a pruned execution whose objects could not all be deleted, and the object
    # store (its URL, secrets masked) it is in; a later prune with objects of that store
    # deletes them and the row (migration 0008).
    sa.Column("store", sa.String(1000), primary_key=True),
    sa.Column("prefix", sa.String(1000), primary_key=True),
    sa.Column("execution_id", sa.String(32), nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("since", sa.Float, nullable=False),
    sa.Column("tries", sa.Integer, nullable=False),
)
