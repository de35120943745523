"""The doorbell's stages: face detection, face recognition and the visit recorder (a sink).

* :class:`FaceDetection` finds faces (dlib HOG or CNN) and drops frames without one, so the
  segmenter after it sees only frames with a face: a visit is a run of such frames.
* :class:`FaceRecognition` encodes each face and names it after the closest known face within
  the tolerance (``frame.meta["faces"]``: box, score, name or None, distance).
* :class:`VisitRecorder` collects a visit's recognitions and, when the visit closes, decides who
  came, stores the best frame as the visit's snapshot in the object store and puts the verdict
  on ``segment.meta["visitor"]`` before ``segment.completed`` is emitted.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from framepipe.backends.objects import ObjectStore
from framepipe.frames import Frame
from framepipe.processors.base import Processor
from framepipe.processors.faces import FaceAnalyzer, FaceBox, FaceMatcher
from framepipe.stream.segment import Segment
from framepipe.stream.sinks import Sink

__all__ = ["FaceDetection", "FaceRecognition", "VisitRecorder", "decide_visitor", "snapshot_key"]


def snapshot_key(source_id: str, event_id: str) -> str:
    """Where the snapshot of a visit or a doorbell press is stored."""
    return f"captures/{source_id}/{event_id}/snapshot.jpg"


class FaceDetection(Processor):
    """Detects faces; a frame without one is dropped (filtered, not an error)."""

    def __init__(self, analyzer: FaceAnalyzer) -> None:
        self.analyzer = analyzer
        self.name = "face_detection"

    def setup(self) -> None:
        self.analyzer.load(detect=True, encode=False)

    def teardown(self) -> None:
        self.analyzer.unload()  # a restart (recovery) gets fresh models

    def process(self, item: Any) -> Any:
        frame: Frame = item
        boxes = self.analyzer.detect(frame.image)
        if not boxes:
            return None
        frame.meta["face_boxes"] = boxes
        frame.meta["score"] = round(max(b.score for b in boxes), 4)
        return frame


class FaceRecognition(Processor):
    """Encodes the detected faces and names them with the current :class:`FaceMatcher`
    (``matcher()`` is asked for each frame, so reloading the known faces takes effect at
    once)."""

    def __init__(self, analyzer: FaceAnalyzer, matcher: Callable[[], FaceMatcher]) -> None:
        self.analyzer = analyzer
        self.matcher = matcher
        self.name = "face_recognition"

    def setup(self) -> None:
        self.analyzer.load(detect=False, encode=True)

    def teardown(self) -> None:
        self.analyzer.unload()  # a restart (recovery) gets fresh models

    def process(self, item: Any) -> Any:
        frame: Frame = item
        boxes: list[FaceBox] = frame.meta.pop("face_boxes", [])
        matcher = self.matcher()
        faces = []
        for box, encoding in zip(boxes, self.analyzer.encode(frame.image, boxes), strict=True):
            name, distance = matcher.match(encoding)
            faces.append(
                {
                    "box": box.as_list(),
                    "score": round(box.score, 4),
                    "name": name,
                    "distance": None if distance is None else round(distance, 4),
                }
            )
        frame.meta["faces"] = faces
        return frame


@dataclass
class _Visit:
    face_frames: int = 0
    votes: Counter[str] = field(default_factory=Counter)
    best_distance: dict[str, float] = field(default_factory=dict)
    nearest: float | None = None
    best: tuple[float, Frame] | None = None


def decide_visitor(
    face_frames: int,
    votes: Counter[str],
    best_distance: dict[str, float],
    nearest: float | None,
    min_known_ratio: float,
) -> dict[str, Any]:
    """Who came: the known name recognised in the most frames, when it was recognised in at
    least ``min_known_ratio`` of the frames with a face (and at least one); otherwise an
    unknown visitor. ``distance`` is the smallest distance of the chosen name, or for an unknown
    visitor the smallest distance to any known face (None when no face is known)."""
    if votes:
        name, count = votes.most_common(1)[0]
        if count >= max(1, math.ceil(min_known_ratio * face_frames)):
            return {
                "known": True,
                "name": name,
                "distance": best_distance[name],
                "matched_frames": count,
            }
    return {"known": False, "name": None, "distance": nearest, "matched_frames": 0}


class VisitRecorder(Sink):
    """Accumulates each visit's recognitions; on close stores its snapshot and verdict."""

    def __init__(
        self, objects: ObjectStore, *, min_known_ratio: float = 0.3, quality: int = 90
    ) -> None:
        self.objects = objects
        self.min_known_ratio = min_known_ratio
        self.quality = quality
        self.name = "event_processing"
        self.workers = 1
        self._visits: dict[str, _Visit] = {}
        self._lock = threading.Lock()

    def write(self, frame: Frame) -> None:
        faces = frame.meta.get("faces") or []
        if frame.segment_id is None or not faces:
            return
        with self._lock:
            visit = self._visits.setdefault(frame.segment_id, _Visit())
            visit.face_frames += 1
            for face in faces:
                distance = face["distance"]
                if distance is not None:
                    visit.nearest = (
                        distance if visit.nearest is None else min(visit.nearest, distance)
                    )
                if face["name"] is not None:
                    visit.votes[face["name"]] += 1
                    visit.best_distance[face["name"]] = min(
                        distance, visit.best_distance.get(face["name"], math.inf)
                    )
            left, top, right, bottom = faces[0]["box"]
            quality = (right - left) * (bottom - top) * (1.0 + faces[0]["score"])
            if visit.best is None or quality > visit.best[0]:
                visit.best = (quality, frame)

    def segment_closed(self, segment: Segment) -> None:
        with self._lock:
            visit = self._visits.pop(segment.id, None)
        if visit is None or visit.best is None:
            return
        verdict = decide_visitor(
            visit.face_frames, visit.votes, visit.best_distance, visit.nearest, self.min_known_ratio
        )
        frame = visit.best[1]
        key = snapshot_key(segment.source_id, segment.id)
        self.objects.put(key, frame.to_jpeg(self.quality))
        segment.meta["visitor"] = {
            **verdict,
            "snapshot_key": key,
            "face_frames": visit.face_frames,
            "names_seen": dict(visit.votes),
            "snapshot_seq": frame.seq,
            "faces": frame.meta.get("faces", []),
        }
