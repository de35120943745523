"""What the backend and the ``sd_import`` pipeline agree on about imports that have not ended.

An import of a card ends ``completed`` or ``cancelled``. Until then (:data:`UNENDED`: pending,
running, or stopped ``interrupted`` or ``failed`` and so resumable) it is the one that renders
the files it lists: the backend resumes it when its card is inserted again instead of starting
another import of the same files, and ``plan`` of any other import leaves them to it.

An import asks for copies and sends its status through the session of the latest insertion of
its card that found it unended (the session it started with may be gone: the detector
restarted, the card re-seated or moved to another reader): the backend records that session in
the ledger namespace :data:`SESSIONS`, keyed by the execution id, when it answers
``already_importing`` or before it resumes the import; each copy attempt reads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from framepipe import StepContext

__all__ = ["SESSIONS", "UNENDED", "session_of"]

UNENDED = ("pending", "running", "interrupted", "failed")
"""The statuses of an import that still has its files to render."""

SESSIONS = "sd_import.session"
"""Ledger namespace: execution id -> ``{"session_id", "detector_id"}`` of the latest insertion
that found that import unended."""


def session_of(ctx: StepContext) -> str:
    """The card session an import's step asks and tells: that of the latest insertion of the
    card that found this import unended (:data:`SESSIONS`, written by the backend), else the
    one it was started with."""
    entry = ctx.get_ledger(SESSIONS).get(ctx.execution_id)
    session = entry.meta.get("session_id") if entry is not None else None
    return session if isinstance(session, str) and session else str(ctx.inputs["session_id"])
