"""An ``sd:copy_request`` as the SD-card detector answers it: which card it is for, the
progress it reports, and the reply's shape (the copy itself is :func:`sd_copy.copy_file`).

Guarantees: a request is for the inserted card with its session *or* its card id (after a
restart of the detector the card has a new session, and the backend's retried copy still names
the old one); a request for no inserted card is answered ``ok: false``, ``code: not_mounted``,
naming the session; ``sd:copy_progress`` goes out at most every 0.2 s per copy; every reply
carries the request's ``request_id``, ``session_id`` and ``path``. It logs on the detector's
logger (``sd_detector``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from sd_cards import Card

__all__ = ["card_for", "copy_reply", "log_copied", "not_inserted", "progress_reporter"]

log = logging.getLogger("sd_detector")

PROGRESS_EVERY = 0.2
"""Seconds between two ``sd:copy_progress`` of one copy, at least."""


def copy_reply(request: dict[str, Any]) -> dict[str, Any]:
    """The ``sd:file_copied`` answering ``request``, without its outcome."""
    return {
        "type": "sd:file_copied",
        "request_id": request.get("request_id"),
        "session_id": request.get("session_id"),
        "path": request.get("path"),
    }


def card_for(cards: Iterable[Card], request: dict[str, Any]) -> Card | None:
    """The inserted card ``request`` is for, by session or by card id."""
    return next(
        (
            c
            for c in cards
            if c.session_id == request.get("session_id") or c.card_id == request.get("card_id")
        ),
        None,
    )


def not_inserted(request: dict[str, Any]) -> dict[str, Any]:
    """The reply (logged) to a request for no inserted card."""
    error = f"no card with session {request.get('session_id')} is inserted"
    log.warning("copy of %s refused (not_mounted): %s", request.get("path"), error)
    return {**copy_reply(request), "ok": False, "code": "not_mounted", "error": error}


def progress_reporter(
    request: dict[str, Any], card: Card, send: Callable[[dict[str, Any]], object]
) -> Callable[[int], None]:
    """The ``progress(bytes_done)`` callback of one copy: it calls ``send`` with an
    ``sd:copy_progress`` at most every :data:`PROGRESS_EVERY` seconds."""
    last = [0.0]

    def progress(done: int) -> None:
        now = time.monotonic()
        if now - last[0] >= PROGRESS_EVERY:
            last[0] = now
            send(
                {
                    "type": "sd:copy_progress",
                    "request_id": request.get("request_id"),
                    "session_id": card.session_id,
                    "bytes": done,
                    "total": request.get("size"),
                }
            )

    return progress


def log_copied(request: dict[str, Any], result: dict[str, Any]) -> None:
    """Log a copy's outcome: ok, or why it failed."""
    if result["ok"]:
        log.info("copied %s: ok", request.get("path"))
    else:
        log.warning(
            "copy of %s failed (%s): %s",
            request.get("path"),
            result.get("code", "error"),
            result["error"],
        )
