"""The recent history of the live apps' sources, kept by the service for the dashboard's
segments view and plots.

Where it comes from:

* **samples** (frames per second, per-stage latency, state, restarts), one per source every
  ``interval`` seconds: for an app served here from its pipelines' health, for an app of
  another process of this home from the health snapshot it writes (a sample per new
  snapshot); each source keeps the last ``window`` seconds;
* **segments** (``segment.completed``) and **restart markers** (``source.died``,
  ``source.restarting``, ``pipeline.recovered`` ...): for an app served here, kept in memory as
  they are emitted (the last ``keep`` per pipeline, filled from the event log when the service
  starts, so a restart of the service keeps them); for an app of another process, read from the
  event log, where its ``StoreEventSink`` commits them.

Guarantees: everything is bounded (per source: ``window / interval`` samples, ``keep``
segments and markers; a read of the event log looks at most ``scan`` rows); a failing read
(a snapshot being replaced, the database restarting) costs one sample, never the sampler; a
snapshot not of the shape apps write (another version's, a neighbour's) is not sampled, and
costs the others nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from framepipe.app import App, read_snapshots
from framepipe.backends.state import StateStore
from framepipe.backends.state.event_log import stored_app_events
from framepipe.config import Settings
from framepipe.logs import get_logger
from framepipe.server.panels import SegmentField

__all__ = [
    "MARKER_TYPES",
    "LiveHistory",
    "Sample",
    "display_fields",
    "histogram",
    "marker_text",
    "stored_app_events",
]

_log = get_logger("server.live")

MARKER_TYPES = (
    "source.died",
    "source.stalled",
    "source.restarting",
    "source.restarted",
    "source.failed",
    "pipeline.failed",
    "pipeline.recovered",
    "pipeline.healthy",
)
"""The events marked on a source's plot: its restarts and what led to them."""

_SEGMENT = "segment.completed"
_DEFAULT_FIELDS = ("label", "who")
_MAX_FIELDS = 6
_MAX_IMAGES = 2
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif")

Key = tuple[str, str]


@dataclass(frozen=True)
class Sample:
    """One reading of a source."""

    ts: float
    fps: float | None
    """Frames captured per second since the previous sample (None for the first)."""
    frames: int
    restarts: int
    state: str | None
    latency_ms: dict[str, float] = field(default_factory=dict)
    """Median processing time of each stage's recent frames."""


def marker_text(kind: str, data: Mapping[str, Any]) -> str:
    """What a marker says: the event's error or reason, else its attempt, else its type."""
    for name in ("error", "reason", "last_error"):
        value = data.get(name)
        if value:
            return str(value)[:300]
    attempt = data.get("attempt")
    return f"attempt {attempt}" if attempt else kind


def _flatten(meta: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
    for name, value in meta.items():
        if isinstance(value, Mapping):
            for inner, item in value.items():
                yield f"{name}.{inner}", item
        else:
            yield str(name), value


def _lookup(meta: Mapping[str, Any], path: str) -> Any:
    value: Any = meta
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def _scalar(value: Any) -> str | float | int | bool | None:
    if value is None or isinstance(value, (bool, int, str)):
        return value if not isinstance(value, str) else value[:300]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return None


def display_fields(
    meta: Mapping[str, Any], named: Sequence[SegmentField] | None
) -> list[dict[str, Any]]:
    """What the segments view shows of a segment's ``meta``: ``[{label, value, image}]``.

    With ``named`` (the app's :class:`SegmentField` list) those fields, in that order (a field
    the segment lacks has value None). Without: the ``label`` and ``who`` fields when the meta
    has either, else its first six scalar fields (a nested dict counts as ``outer.inner``
    fields), then its first two fields whose name ends in ``key`` and whose value is an
    image's key, shown as those images.
    """
    if not isinstance(meta, Mapping):
        return []
    if named is not None:
        out = []
        for f in named:
            value = _lookup(meta, f.path)
            image = value if f.image and isinstance(value, str) and value else None
            out.append(
                {"label": f.label, "value": None if image else _scalar(value), "image": image}
            )
        return out
    chosen = [(n, meta[n]) for n in _DEFAULT_FIELDS if n in meta] or list(_flatten(meta))
    plain: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    for name, value in chosen:
        if (
            isinstance(value, str)
            and name.endswith("key")
            and value.lower().endswith(_IMAGE_SUFFIXES)
        ):
            images.append({"label": name, "value": None, "image": value})
        elif _scalar(value) is not None:
            plain.append({"label": name, "value": _scalar(value), "image": None})
    return plain[:_MAX_FIELDS] + images[:_MAX_IMAGES]


def histogram(values: Sequence[float], bins: int = 10) -> dict[str, Any]:
    """``values`` counted in ``bins`` equal bins from 0 to a round number above their
    maximum: ``{edges (bins + 1), counts (bins), count}``."""
    finite = [v for v in values if math.isfinite(v) and v >= 0]
    top = max(finite, default=0.0)
    if top <= 0:
        top = 1.0
    step = 10 ** math.floor(math.log10(top / bins))
    for nice in (1, 2, 2.5, 5, 10):
        if nice * step * bins >= top:
            step *= nice
            break
    edges = [round(i * step, 6) for i in range(bins + 1)]
    counts = [0] * bins
    for v in finite:
        counts[min(bins - 1, int(v / step))] += 1
    return {"edges": edges, "counts": counts, "count": len(finite)}


class LiveHistory:
    """Samples, segments and markers of the sources of this home's live apps (see the module
    docstring). ``apps`` are the apps served here; others are found through their
    snapshots."""

    def __init__(
        self,
        apps: Mapping[str, App],
        settings: Settings,
        *,
        interval: float = 1.0,
        window: float = 600.0,
        keep: int = 200,
    ) -> None:
        if interval <= 0 or window < interval or keep < 1:
            raise ValueError("interval must be > 0, window >= interval and keep >= 1")
        self.apps = apps
        self.settings = settings
        self.interval = interval
        self.window = window
        self.keep = keep
        self._samples: dict[Key, deque[Sample]] = {}
        self._segments: dict[Key, deque[tuple[float, dict[str, Any]]]] = {}
        self._markers: dict[Key, deque[tuple[float, str, str]]] = {}
        self._removers: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None

    # -- the apps served here ------------------------------------------------------------------

    def _on_event(self, app: str, kind: str, data: dict[str, Any]) -> None:
        pipeline = data.get("pipeline")
        if not isinstance(pipeline, str):
            return
        key = (app, pipeline)
        if kind == _SEGMENT:
            self._segments.setdefault(key, deque(maxlen=self.keep)).appendleft(
                (time.time(), dict(data))
            )
        elif kind in MARKER_TYPES:
            self._markers.setdefault(key, deque(maxlen=self.keep)).appendleft(
                (time.time(), kind, marker_text(kind, data))
            )

    def _fill(self, store: StateStore) -> None:
        for name in self.apps:
            found = stored_app_events(store, name, (_SEGMENT, *MARKER_TYPES), limit=10 * self.keep)
            for ts, kind, data in reversed(found):  # oldest first: appendleft keeps newest first
                pipeline = data.get("pipeline")
                if not isinstance(pipeline, str):
                    continue
                key = (name, pipeline)
                if kind == _SEGMENT:
                    self._segments.setdefault(key, deque(maxlen=self.keep)).appendleft((ts, data))
                else:
                    self._markers.setdefault(key, deque(maxlen=self.keep)).appendleft(
                        (ts, kind, marker_text(kind, data))
                    )

    async def start(self, store: StateStore) -> None:
        """Listen to the apps served here (call before they start), fill their history from
        the event log, and start sampling."""
        for name, app in self.apps.items():
            self._removers.append(app.on("*", functools.partial(self._on_event, name)))
        try:
            await asyncio.to_thread(self._fill, store)
        except Exception as exc:  # the history starts empty, the service runs
            _log.warning("the segments of the apps served here were not read back: %s", exc)
        self._task = asyncio.create_task(self._run(), name="framepipe-live-history")

    async def stop(self) -> None:
        """Stop sampling and listening."""
        for remove in self._removers:
            remove()
        self._removers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- sampling ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                self._sample_hosted(time.time())
                snapshots = await asyncio.to_thread(read_snapshots, self.settings)
                self._sample_snapshots(snapshots)
            except Exception as exc:
                _log.warning("sampling the live sources failed: %s", exc)
            await asyncio.sleep(self.interval)

    def _add(self, key: Key, ts: float, status: Mapping[str, Any]) -> None:
        ring = self._samples.get(key)
        if ring is None:
            ring = self._samples[key] = deque(maxlen=max(2, round(self.window / self.interval)))
        previous = ring[-1] if ring else None
        if previous is not None and ts <= previous.ts:
            return
        frames = int(status.get("frames_captured") or 0)
        source = status.get("source") or {}
        fps = None
        if previous is not None and frames >= previous.frames:
            fps = round((frames - previous.frames) / (ts - previous.ts), 3)
        latency = {
            str(s.get("name")): float(s.get("latency_ms") or 0.0)
            for s in status.get("stages") or ()
            if isinstance(s, Mapping)
        }
        ring.append(
            Sample(
                ts=ts,
                fps=fps,
                frames=frames,
                restarts=int(source.get("restarts") or 0) if isinstance(source, Mapping) else 0,
                state=status.get("state"),
                latency_ms=latency,
            )
        )

    def _sample_hosted(self, now: float) -> None:
        for name, app in self.apps.items():
            if not app.pipelines:
                continue
            for pipeline, status in app.health().pipeline_status.items():
                self._add((name, pipeline), now, status)

    def _sample_snapshots(self, snapshots: Iterable[Mapping[str, Any]]) -> None:
        for snap in snapshots:  # of the shape apps write (read_snapshots leaves out the rest)
            name = snap["name"]
            if name in self.apps or snap["state"] == "dead":
                continue
            try:
                ts = float(snap.get("updated_at") or 0.0)
                for pipeline, status in snap["pipeline_status"].items():
                    self._add((name, pipeline), ts, status)
            except (TypeError, ValueError) as exc:  # a field of another version's, a neighbour's
                _log.debug("the snapshot of app %r is not sampled: %s", name, exc)

    # -- reading ----------------------------------------------------------------------------------

    def samples(self, app: str, pipeline: str, since: float = 0.0) -> list[Sample]:
        """The samples of a source newer than ``since``, oldest first."""
        return [s for s in self._samples.get((app, pipeline), ()) if s.ts > since]

    def hosted_segments(self, app: str, pipeline: str | None) -> list[tuple[float, dict[str, Any]]]:
        """``(ts, segment.completed data)`` of an app served here, newest first."""
        rows = [
            row
            for (a, p), ring in self._segments.items()
            if a == app and (pipeline is None or p == pipeline)
            for row in ring
        ]
        rows.sort(key=lambda r: r[0], reverse=True)
        return rows

    def hosted_markers(self, app: str, pipeline: str) -> list[tuple[float, str, str]]:
        """``(ts, type, text)`` of an app served here, newest first."""
        return list(self._markers.get((app, pipeline), ()))
