"""What the backend and the ``sd_import`` pipeline agree on about imports that have not ended.

An import of a card ends ``completed`` or ``cancelled``. Until then (:data:`UNENDED`: pending,
running, or stopped ``interrupted`` or ``failed`` and so resumable) it is the one that renders
the files it lists: the backend resumes it when its card is inserted again instead of starting
another import of the same files, and ``plan`` of any other import leaves them to it.

A resumed import asks for copies and sends its status through the session of the insertion
that resumed it (the detector's session of the first one may be gone): the backend records it
in the ledger namespace :data:`SESSIONS`, keyed by the execution id, before it resumes it.
"""

from __future__ import annotations

__all__ = ["SESSIONS", "UNENDED"]

UNENDED = ("pending", "running", "interrupted", "failed")
"""The statuses of an import that still has its files to render."""

SESSIONS = "sd_import.session"
"""Ledger namespace: execution id -> ``{"session_id", "detector_id"}`` of the insertion that
resumed that import."""
