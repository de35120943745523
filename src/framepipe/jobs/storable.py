"""Text a step hands the job records, made storable by every state backend.

A step's progress message, the text of the exception it raised and the ledger fields it
records are written to text columns. Two kinds of text no backend can hold both come
naturally from ordinary code:

* a lone surrogate (``"\\udce9"``): how ``os.listdir``, ``os.walk`` and ``os.fsdecode``
  return a file name that is not UTF-8 (a Latin-1 ``café.mp4`` on an SD card); neither
  SQLite nor PostgreSQL can encode it;
* a NUL character (``"\\x00"``): binary data decoded as text (``header.decode("latin-1")``);
  PostgreSQL's text columns refuse it.

:func:`~framepipe.untrusted.storable_text` is the one rule, applied where such text enters
the records (:meth:`~framepipe.jobs.context.StepContext.progress`,
:func:`~framepipe.jobs.outcomes.error_text`, :func:`~framepipe.jobs.ledger.ledger_row` and the
ledger's look-ups), so it holds in both job modes and on every backend. The rule writes each
such character as the backslash escape Python's ``repr`` shows for it (``\\udce9``,
``\\x00``), so a reader still sees which byte the name or data held, and nothing else in the
text changes. It is deterministic, so a ledger identity is found again by the same text it was
recorded with. (A text that already holds the six characters ``\\udce9`` reads the same as
one that held the surrogate: a message is for people, and an identity with a literal
backslash-u escape is not a file name anyone has.)
"""

from __future__ import annotations

from framepipe.untrusted import storable_text
from framepipe.urls import safe_text

__all__ = ["brief_error"]


def brief_error(exc: BaseException) -> str:
    """``Type: first line of the message`` of ``exc``, storable: what a log line or a stored
    error says of a failure whose full text is not wanted (a database error's first line,
    without the statement and its parameters), a URL in it without its password."""
    lines = str(exc).splitlines()
    return storable_text(
        safe_text(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)
    )
