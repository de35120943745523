"""A failing state database, as the job client reports it: :func:`database_errors`.

Guarantee: an error SQLAlchemy raises inside the block leaves it as
:class:`~framepipe.errors.StateStoreError` ("the state database failed: <the driver's
reason>"), with SQLAlchemy's error as its cause, so a caller of the client catches one error
tree; any other error passes unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import sqlalchemy as sa

from framepipe.errors import StateStoreError

__all__ = ["database_errors"]


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """A failing state database as :class:`StateStoreError` (SQLAlchemy's error its cause)."""
    try:
        yield
    except sa.exc.SQLAlchemyError as exc:
        reason = getattr(exc, "orig", None) or type(exc).__name__
        raise StateStoreError(f"the state database failed: {reason}") from exc
