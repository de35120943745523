"""Alembic migrations of the state schema (``versions/``), applied when a store opens."""
