"""Whether a state-store error is transient: the one rule the embedded engine and the workers
share to tell "the store could not be reached or asked, try again" from "the store refused
this write".

A transient error is retried (the engine's group commit, a worker's round, heartbeats); any
other error a commit raises is a refusal of its data, which the engine and the workers answer
by committing execution by execution (or piece by piece) and failing only the execution (or
attempt) whose part is refused. So the rule decides whether a batch of executions waits for
the store or some of them are failed for good: a lost connection must never count as a
refusal.
"""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["is_transient_store_error"]

_TRANSIENT = (
    # The DB-API's "not the statement's fault" errors: the server went away, restarted, was
    # shut down, terminated the session, ran out of connections, a lock was not granted in
    # time (SQLite's "database is locked"), the connection was already closed.
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    # The pool gave no connection within its timeout (every connection in use).
    sa.exc.TimeoutError,
    # A pooled connection found dead when checked out (raised by the pool's checkout hooks).
    sa.exc.DisconnectionError,
)


# PostgreSQL's SQLSTATEs that say "try again": connection exceptions (08), a transaction
# rolled back by the server (40: serialization failure, deadlock), insufficient resources
# (53: too many connections, out of memory or disk), a lock not granted in time, a statement
# timeout, the server shutting down or starting. Any other SQLSTATE is about the statement or
# its data (54: program limit exceeded, e.g. an index row too large, is raised as an
# OperationalError by the driver, yet fails the same way every time).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "40", "53")
_TRANSIENT_SQLSTATES = frozenset({"55P03", "57014", "57P01", "57P02", "57P03"})


def is_transient_store_error(exc: BaseException) -> bool:
    """True when ``exc``, raised by a state-store call, says the store could not be reached
    or could not answer in time, so the same call may succeed later and is to be retried:
    SQLAlchemy's ``OperationalError``, ``InterfaceError``, the pool's ``TimeoutError``,
    ``DisconnectionError``, and any other DB-API error that SQLAlchemy found had broken the
    connection (``connection_invalidated``). False for everything else, which is the store
    refusing what was written (a constraint, text it cannot encode, a value out of range) or a
    bug: retrying it would fail the same way. Where the driver gives a SQLSTATE
    (PostgreSQL), it decides, whatever the exception's class."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        state = getattr(exc.orig, "sqlstate", None)
        if isinstance(state, str) and len(state) == 5:
            return state[:2] in _TRANSIENT_SQLSTATE_CLASSES or state in _TRANSIENT_SQLSTATES
    return isinstance(exc, _TRANSIENT)
