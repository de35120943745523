"""What the MQTT sink says about each camera (a pipeline of the attached app): :class:`Cameras`
shapes each event into the message published on ``<prefix>/events`` and keeps the camera's
retained topics, the segments open per label and the health (the topics are listed in
:mod:`framepipe.mqtt`). :class:`AppView` is what it reads of the app.

Guarantees:

* A camera's or a label's name enters a topic only as :func:`~framepipe.mqtt_urls.topic_level`
  makes it: one valid level, never ``/``, ``+`` or ``#``.
* ``segment.started`` is ``type: "new"`` and ``segment.completed`` ``type: "end"``, with the
  ``before``/``after`` segment objects; the open-segment count of the camera's label follows
  them, and a stopped or failed pipeline's counts fall to 0.
* A camera's health topic changes only when its state, its score's first decimal or its last
  error does (:meth:`Cameras.refresh_health`).
* ``pipeline.removed`` forgets the camera: its retained topics are cleared
  (:meth:`~framepipe.mqtt.retained.RetainedTopics.forget`).
* Nothing here blocks or touches the network: the writer publishes what is due.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from typing import Any, Protocol

from framepipe.mqtt.retained import RetainedTopics
from framepipe.mqtt_urls import topic_level

__all__ = ["AppView", "Cameras", "encode"]

HEALTH_EVENTS = ("source.", "pipeline.", "stage.crashed", "system_error", "performance_warning")
"""Events (names or their beginnings) after which the cameras' health is looked at at once."""


class SegmenterView(Protocol):
    """What is read of a pipeline's segmenter: its label."""

    @property
    def label(self) -> str: ...


class PipelineView(Protocol):
    """What is read of a pipeline: its segmenter, if it has one."""

    @property
    def segmenter(self) -> SegmenterView | None: ...


class HealthView(Protocol):
    """What is read of an app's health: each pipeline's status."""

    @property
    def pipeline_status(self) -> Mapping[str, Mapping[str, Any]]: ...


class AppView(Protocol):
    """What is read of the attached app (:class:`framepipe.App` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def pipelines(self) -> Mapping[str, PipelineView]: ...

    def health(self) -> HealthView: ...


def encode(value: Any) -> bytes:
    """``value`` as compact JSON that every JSON parser reads (RFC 8259): an object JSON cannot
    hold as its ``str``, a NaN or an infinity as null (as the stored events have it). A value
    that cannot be encoded (a circular one) raises ValueError."""
    try:
        return json.dumps(value, default=str, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:  # a NaN or an infinity in it (a circular value fails again below)
        plain = json.loads(json.dumps(value, default=str))
        return json.dumps(_finite(plain), separators=(",", ":"), allow_nan=False).encode()


def _finite(plain: Any) -> Any:
    """``plain`` (as :func:`json.loads` gives it) with every NaN and infinity made None."""
    if isinstance(plain, float):
        return plain if math.isfinite(plain) else None
    if isinstance(plain, dict):
        return {key: _finite(item) for key, item in plain.items()}
    if isinstance(plain, list):
        return [_finite(item) for item in plain]
    return plain


def _seconds(ms: object) -> float | None:
    return ms / 1000.0 if isinstance(ms, int | float) else None


class Cameras:
    """The messages and retained topics of the cameras under ``prefix``; ``labels`` renames
    segmenter labels."""

    def __init__(self, prefix: str, labels: Mapping[str, str]) -> None:
        self.prefix = prefix
        self.labels = dict(labels)
        self.app: AppView | None = None
        self.retained = RetainedTopics()
        self.health_due = False
        """Whether the health is to be looked at before the next publish."""
        self._open: dict[str, dict[str, dict[str, Any]]] = {}
        self._health_key: dict[str, tuple[Any, ...]] = {}

    def attach(self, app: AppView) -> None:
        """Read ``app``'s pipelines: each segmented one's count is retained (0), and the health
        is due."""
        self.app = app
        for name, pipeline in app.pipelines.items():
            if pipeline.segmenter is not None:
                self._set_count(name, self._label(name))
        self.health_due = True

    def message(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        """The message of ``event`` for ``<prefix>/events``; updates the camera's counts."""
        pipeline = data.get("pipeline")
        camera = next(
            (
                data[key]
                for key in ("pipeline", "camera", "station_id", "source_id")
                if data.get(key)
            ),
            None,
        )
        message: dict[str, Any] = {
            "type": event,
            "event": event,
            "app": self.app.name if self.app is not None else None,
            "pipeline": pipeline,
            "camera": camera,
            "time": time.time(),
            "data": data,
        }
        if camera is None:
            return message
        cam = str(camera)
        if event == "segment.started":
            after = self._segment(cam, pipeline, data, end=False)
            self._open.setdefault(cam, {})[after["id"]] = after
            self._set_count(cam, after["label"])
            message.update(type="new", before=None, after=after)
        elif event == "segment.completed":
            before = self._open.get(cam, {}).pop(str(data.get("segment_id")), None)
            after = self._segment(cam, pipeline, data, end=True)
            self._set_count(cam, after["label"])
            message.update(type="end", before=before, after=after)
        elif event == "pipeline.started" and self._segmented(pipeline):
            self._set_count(cam, self._label(pipeline))
        elif event in ("pipeline.stopped", "pipeline.failed"):
            segments = self._open.pop(cam, {})
            for label in {s["label"] for s in segments.values()}:
                self._set_count(cam, label)
        elif event == "pipeline.removed":
            self._forget(cam)
        return message

    def refresh_health(self, *, again: bool = False) -> None:
        """Retain each camera's health that changed (every camera's with ``again``: a new
        connection); the health is no longer due."""
        if again:
            self._health_key.clear()
        self.health_due = False
        app = self.app
        if app is None:
            return
        for name, status in app.health().pipeline_status.items():
            performance = status.get("performance") or {}
            score = float(status.get("performance_score", 1.0))
            key = (status.get("state"), round(score, 1), status.get("last_error"))
            if self._health_key.get(name) == key:
                continue
            self._health_key[name] = key
            self.retained.retain(
                name,
                f"{self.prefix}/{topic_level(name)}/health",
                encode(
                    {
                        "state": status.get("state"),
                        "performance_score": score,
                        "reason": performance.get("reason"),
                        "last_error": status.get("last_error"),
                        "updated_at": time.time(),
                    }
                ),
            )

    def _label(self, pipeline: str | None) -> str:
        found = self.app.pipelines.get(pipeline) if self.app and pipeline else None
        label = found.segmenter.label if found is not None and found.segmenter else "segment"
        return self.labels.get(label, label)

    def _segmented(self, pipeline: str | None) -> bool:
        found = self.app.pipelines.get(pipeline) if self.app and pipeline else None
        return found is not None and found.segmenter is not None

    def _segment(
        self, camera: str, pipeline: str | None, data: dict[str, Any], *, end: bool
    ) -> dict[str, Any]:
        start = _seconds(data.get("first_ts_ms"))
        last = _seconds(data.get("last_ts_ms"))
        return {
            "id": str(data.get("segment_id")),
            "camera": camera,
            "label": self._label(pipeline),
            "sub_label": data.get("key"),
            "start_time": start,
            "end_time": last if end else None,
            "frame_time": last if last is not None else start,
            "frames": data.get("frames", 0),
            "end_reason": data.get("reason"),
            "latency_s": data.get("latency_s"),
            "stored": data.get("stored", []),
            "selected": data.get("selected", []),
            "meta": data.get("meta", {}),
        }

    def _set_count(self, camera: str, label: str) -> None:
        count = sum(1 for s in self._open.get(camera, {}).values() if s["label"] == label)
        topic = f"{self.prefix}/{topic_level(camera)}/{topic_level(label)}"
        self.retained.retain(camera, topic, str(count).encode())

    def _forget(self, camera: str) -> None:
        self.retained.forget(camera)
        self._health_key.pop(camera, None)
        self._open.pop(camera, None)
