"""Alembic environment: framepipe runs migrations programmatically on a given connection."""

from __future__ import annotations

from alembic import context

from framepipe.backends.state.schema import VERSION_TABLE, metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=True,
    version_table=VERSION_TABLE,
)
with context.begin_transaction():
    context.run_migrations()
