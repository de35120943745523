"""A doorbell press: who the faces in the camera's latest frame are, and the press's result and
visitor event.

Guarantees: each face is described with its box, detection score, name (None when no known
face is near enough) and distance (None when nothing is known), rounded to 4 places; a press
with faces names one visitor, decided by the same rule as a visit
(:func:`~doorbell.stages.decide_visitor`), its distance rounded as a visit's; a press's event
id is ``doorbell-<source>-<ts_ms>-<seq>`` (one per frame), its visitor event's the same with
``-visitor``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from doorbell.stages import decide_visitor
from framepipe.frames import Frame
from framepipe.processors.faces import Face, FaceMatcher

__all__ = ["match_faces", "press_id", "press_result", "press_visitor_event"]


def match_faces(
    faces: Sequence[Face], matcher: FaceMatcher
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each face described, and the visitor (``visitor``, ``known``, ``distance``; empty
    without faces)."""
    described = []
    votes: collections.Counter[str] = collections.Counter()
    best: dict[str, float] = {}
    nearest: float | None = None
    for face in faces:
        name, distance = matcher.match(face.encoding)
        described.append(
            {
                "box": face.box.as_list(),
                "score": round(face.box.score, 4),
                "name": name,
                "distance": None if distance is None else round(distance, 4),
            }
        )
        if distance is not None:
            nearest = distance if nearest is None else min(nearest, distance)
        if name is not None and distance is not None:
            votes[name] += 1
            best[name] = min(distance, best.get(name, distance))
    if not faces:
        return described, {}
    verdict = decide_visitor(len(faces), votes, best, nearest, 0.0)
    distance = verdict["distance"]
    return described, {
        "visitor": verdict["name"],
        "known": verdict["known"],
        "distance": None if distance is None else round(distance, 4),  # as a visit's
    }


def press_id(frame: Frame) -> str:
    """The event id of a press on ``frame``."""
    return f"doorbell-{frame.source_id}-{frame.ts_ms}-{frame.seq}"


def press_result(
    frame: Frame,
    channel: int | None,
    described: list[dict[str, Any]],
    visitor: dict[str, Any],
    key: str,
) -> dict[str, Any]:
    """What a press on ``frame`` returns (and ``doorbell.pressed`` carries); its snapshot is
    stored under ``key``."""
    return {
        "success": True,
        "channel": channel,
        "event_id": press_id(frame),
        "faces_detected": len(described),
        "faces": described,
        "snapshot_key": key,
        "frame_seq": frame.seq,
        "frame_ts_ms": frame.ts_ms,
        **visitor,
    }


def press_visitor_event(result: dict[str, Any], source_id: str) -> tuple[str, dict[str, Any]]:
    """The ``visitor.*`` event (type and payload) of a press with faces."""
    return "visitor.known" if result["known"] else "visitor.unknown", {
        "event_id": f"{result['event_id']}-visitor",
        "trigger": "doorbell",
        "source_id": source_id,
        "name": result["visitor"],
        "known": result["known"],
        "distance": result["distance"],
        "snapshot_key": result["snapshot_key"],
        "faces": result["faces"],
    }
