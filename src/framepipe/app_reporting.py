"""What an app reports of its pipelines: its health (:func:`app_health`), and the files other
processes read, its health snapshot and each pipeline's latest frame as a small JPEG
(:class:`SnapshotWriter`; where they are, and how they are read: :mod:`framepipe.snapshots`).

Guarantees: :func:`app_health` is a copy computed from the pipelines at the call (see
:meth:`framepipe.app.App.health` for the states it reports). Each file is written whole (a
temporary file beside it, then renamed over it): a reader sees the previous content or the new,
never a part. A preview is written only when the pipeline's latest frame changed since the last
one written; one that cannot be written is logged and the others are written.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from framepipe.app_health import AppHealth, SystemState
from framepipe.errors import FramepipeError
from framepipe.health import HealthState
from framepipe.liveness import this_host
from framepipe.logs import ComponentLogger
from framepipe.sink_counts import SinkCounts
from framepipe.snapshots import PREVIEW_QUALITY, preview_file_name, preview_jpeg
from framepipe.stream.pipeline import StreamPipeline
from framepipe.urls import safe_json

__all__ = ["SnapshotWriter", "app_health", "performance_warnings"]


def app_health(
    name: str,
    state: SystemState,
    pipelines: Mapping[str, StreamPipeline],
    paused: set[str],
    event_sinks: Iterable[SinkCounts],
    *,
    performance_threshold: float,
    last_error: str | None,
    started_at: float | None,
) -> AppHealth:
    """The health of an app named ``name`` in ``state`` running ``pipelines`` (those in
    ``paused`` reported ``stopped``), with the counts of the ``event_sinks`` attached to it."""
    statuses = {n: p.health() for n, p in pipelines.items()}
    for n in paused & statuses.keys():
        statuses[n]["state"] = "stopped"
    scores = [s["performance_score"] for n, s in statuses.items() if n not in paused]
    failed = [n for n, s in statuses.items() if s["state"] == HealthState.FAILED.value]
    down = [n for n, p in pipelines.items() if p.source_down and n not in paused]
    sinks = [
        {
            "sink": sink.kind,
            "target": sink.target,
            "written": sink.written,
            "dropped": sink.dropped,
            "pending": sink.pending,
            "failing_since": sink.failing_since,
        }
        for sink in event_sinks
    ]
    sink_failing = any(s["failing_since"] is not None for s in sinks)
    if state is SystemState.RUNNING and failed:
        state = SystemState.FAILED if len(failed) == len(statuses) else SystemState.DEGRADED
    elif state is SystemState.RUNNING and (
        down or sink_failing or (scores and min(scores) < performance_threshold)
    ):
        state = SystemState.DEGRADED
    return AppHealth(
        name=name,
        state=state,
        performance_score=round(sum(scores) / len(scores), 3) if scores else 1.0,
        uptime=round(time.time() - started_at, 3) if started_at else 0.0,
        last_error=last_error,
        pid=os.getpid(),
        updated_at=time.time(),
        host=this_host(),
        pipeline_status=statuses,
        event_sinks=sinks,
    )


def performance_warnings(
    pipelines: Mapping[str, StreamPipeline], threshold: float, warned: set[str]
) -> Iterator[tuple[str, float]]:
    """Each running pipeline whose performance score fell below ``threshold``, with its score,
    once until it rose to ``threshold`` again: ``warned`` holds the pipelines warned about, and
    is updated as the pipelines are scored (one after the other, as they are yielded)."""
    for name, pipeline in pipelines.items():
        if pipeline.state is not HealthState.RUNNING:
            continue
        score = pipeline.performance_score()
        if score < threshold and name not in warned:
            warned.add(name)
            yield name, score
        elif score >= threshold:
            warned.discard(name)


class SnapshotWriter:
    """Writes an app's health snapshot and its pipelines' previews, and remembers the frame
    each preview shows."""

    def __init__(self, log: ComponentLogger) -> None:
        self._log = log
        self.previewed: dict[str, Any] = {}
        """The frame each pipeline's preview shows, by pipeline name."""

    def forget(self, name: str) -> None:
        """Forget the preview of pipeline ``name`` (removed): a pipeline added later under
        the same name gets its preview written afresh."""
        self.previewed.pop(name, None)

    def write(
        self,
        path: Path,
        health: AppHealth,
        folder: Path,
        pipelines: Mapping[str, StreamPipeline],
    ) -> None:
        """Write ``health`` to ``path``, then the previews of ``pipelines`` into ``folder``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(safe_json(health.to_dict()), default=str))
        os.replace(tmp, path)
        for name, pipeline in pipelines.items():
            try:
                self._write_preview(folder, name, pipeline)
            except OSError as exc:
                self._log.warning("preview of %r not written: %s", name, exc)

    def _write_preview(self, folder: Path, name: str, pipeline: StreamPipeline) -> None:
        frame = pipeline.latest_frame
        if frame is None or frame is self.previewed.get(name):
            return
        self.previewed[name] = frame
        captured, planes = frame.captured_jpeg, frame.planes
        if captured is not None and frame.width <= 640:
            data = captured  # a captured JPEG small enough is its own preview
        elif planes is not None and planes.width <= 640:
            data = planes.to_jpeg(PREVIEW_QUALITY)  # the decoder's planes: no BGR
        else:
            try:
                data = preview_jpeg(frame)
            except FramepipeError as exc:
                self._log.warning("preview of %r not written: %s", name, exc)
                return
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / preview_file_name(name)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
