"""The doorbell's events: the shape of a visit's event, and events kept as JSON in the
object store under ``events/``.

Guarantees: every event has ``type``, ``timestamp`` (UTC ISO 8601, milliseconds) and ``ts``
(epoch seconds); a visit's event id is ``visit-<segment id>``, so a visit stored twice is one
object; storing an event never raises (a failure is logged, naming the event); reading the
stored events back gives the latest ones, oldest first, and skips, with a warning naming it, any
that cannot be read. Both log on the doorbell's logger.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from framepipe.backends.objects import ObjectStore
from framepipe.errors import FramepipeError
from framepipe.logs import get_logger

__all__ = ["now_iso", "stamped", "store_event", "stored_events", "visit_event"]

log = get_logger("doorbell")


def now_iso(ts: float) -> str:
    """``ts`` (epoch seconds) as UTC ISO 8601, to the millisecond."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def stamped(kind: str, payload: dict[str, Any], now: float) -> dict[str, Any]:
    """The event of type ``kind`` at ``now``: ``type``, ``timestamp``, ``ts``, then ``payload``."""
    return {"type": kind, "timestamp": now_iso(now), "ts": now, **payload}


def visit_event(data: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """The ``visitor.known`` / ``visitor.unknown`` event (its type and payload) of a
    ``segment.completed``'s ``data``, or None when the segment had no visitor."""
    visitor = data.get("meta", {}).get("visitor")
    if not visitor:
        return None
    return "visitor.known" if visitor["known"] else "visitor.unknown", {
        "event_id": f"visit-{data['segment_id']}",
        "trigger": "visit",
        "source_id": data["source_id"],
        "segment_id": data["segment_id"],
        "name": visitor["name"],
        "known": visitor["known"],
        "distance": visitor["distance"],
        "snapshot_key": visitor["snapshot_key"],
        "frames": data["frames"],
        "face_frames": visitor["face_frames"],
        "matched_frames": visitor["matched_frames"],
        "names_seen": visitor["names_seen"],
        "first_ts_ms": data["first_ts_ms"],
        "last_ts_ms": data["last_ts_ms"],
        "closed": data["reason"],
        "latency_s": data["latency_s"],
        "faces": visitor["faces"],
    }


def store_event(objects: ObjectStore, event: dict[str, Any]) -> None:
    """Store the event's JSON as ``events/<event_id>.json`` (blocking; failures logged)."""
    try:
        objects.put(f"events/{event['event_id']}.json", json.dumps(event, default=str).encode())
    except Exception as exc:
        log.warning("event %s not stored: %s", event["event_id"], exc)


def stored_events(objects: ObjectStore, count: int) -> list[dict[str, Any]]:
    """The latest ``count`` events stored by earlier runs, oldest first (by the objects'
    modification time; unreadable ones skipped)."""
    infos = sorted(objects.list("events/"), key=lambda i: i.modified)
    events = []
    for info in infos[-count:]:
        try:
            events.append(json.loads(objects.get(info.key)))
        except (ValueError, FramepipeError) as exc:
            log.warning("stored event %s skipped: %s", info.key, exc)
    return events
