"""What the SD-card detector says to the backend when it connects, and what it does with what
the backend sends other than a copy request.

Guarantees: :func:`read_message` never raises on what the backend sends (an unreadable
message is logged, cut to 200 characters, and dropped); :func:`note_message` marks the cards
of an ``sd:status``'s session as acknowledged (so they are not announced again after a
reconnect), and logs a failed or cancelled import (with how to resume it) and, when an import
ended, each problem and each held file on a line of its own, naming the card. It logs on the
detector's logger (``sd_detector``).
"""

from __future__ import annotations

import json
import logging
import platform
import socket
from collections.abc import Iterable
from typing import Any

from sd_cards import Card

__all__ = ["hello", "note_message", "read_message"]

log = logging.getLogger("sd_detector")


def hello(detector_id: str, cards: Iterable[Card]) -> dict[str, Any]:
    """``detector:hello``: who this detector is and the cards it still has (their sessions),
    so copies the backend retries after a reconnect reach it."""
    return {
        "type": "detector:hello",
        "detector_id": detector_id,
        "hostname": socket.gethostname(),
        "platform": platform.system(),
        "sessions": [
            {"session_id": c.session_id, "card_id": c.card_id, "label": c.label} for c in cards
        ],
    }


def read_message(raw: str | bytes) -> dict[str, Any] | None:
    """The backend's message with its ``type``, or None (logged) when it is not one."""
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict) or "type" not in message:
        log.warning("unreadable message from the backend: %r", raw[:200])
        return None
    return message


def note_message(message: dict[str, Any], cards: Iterable[Card]) -> None:
    """Act on a message that is not a copy request (see the module docstring)."""
    kind = message["type"]
    if kind == "sd:status":
        for card in cards:
            if card.session_id == message.get("session_id"):
                card.acknowledged = True
        card_name = message.get("card_id") or message.get("session_id")
        log.info(
            "status of %s: %s %s",
            card_name,
            message.get("state"),
            message.get("execution_id", ""),
        )
        if message.get("state") in ("failed", "cancelled"):
            log.warning(
                "card %s: the import %s %s: %s; insert the card again to resume it",
                card_name,
                message.get("execution_id", ""),
                message.get("state"),
                message.get("error") or "no reason given",
            )
        summary = message.get("summary")
        if isinstance(summary, dict):  # the import ended: what needs a person, one line each
            for problem in summary.get("problems") or []:
                log.warning("card %s: %s", card_name, problem)
            for held in summary.get("held") or []:
                if isinstance(held, dict):
                    log.warning(
                        "card %s: %s held: %s", card_name, held.get("path"), held.get("reason")
                    )
    elif kind == "error":
        log.warning("backend: %s", message.get("detail"))
    elif kind != "detector:welcome":
        log.info("ignored %s from the backend", kind)
