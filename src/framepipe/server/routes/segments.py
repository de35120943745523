"""The live apps' completed segments (orders, visits) with their stored frames, and each
source's recent history for the dashboard's plots.

* ``GET /api/segments/{app}``: the newest completed segments of an app (of one pipeline with
  ``?pipeline=``), newest first, each with its stored and selected frames' keys and the
  fields of its ``meta`` the app shows (:func:`framepipe.server.live.display_fields`);
* ``GET /api/segments/{app}/{pipeline}/frames/{key}``: a stored frame, as a JPEG downscaled
  on the server to ``width`` pixels (kept in a bounded cache);
* ``GET /api/sources/{app}/{pipeline}/history``: the source's samples (frames per second,
  per-stage latency, state, restarts) over the last minutes, its restart markers and a
  histogram of its segments' latency.

Guarantees: app and pipeline names match a fixed pattern (never ``..``); an app neither served
here nor writing a snapshot in this home is a 404. A frame's key is only ever a plain path
inside the stores of that app (``..``, absolute paths and the like are a 400; a local store
never follows a symlink out of its root: also a 400): for an app served here, the stores of
the pipeline's frame stores, then the app's dashboard store, then the service's; for an app of
another process, the service's object store (the home's). The error names the key, never a
store's path (a failure of the store itself is a 500).
A frame is decoded only when its header says it is a JPEG, PNG, WebP or BMP (else 415) whose
decode holds at most the setting ``thumbnail_max_pixels`` pixels (a baseline JPEG counts at the
reduced size it is decoded at; else 422 naming the key), whatever its file size; a frame that
begins as one of them but is truncated or corrupt (its header or its data cannot be read) is a
422 saying so. At most ``thumbnail_concurrency`` frames are read and decoded at once (a frame
kept downscaled for the first store needs no turn); a request that gets no turn within
:data:`~framepipe.server.thumbnails.SLOT_WAIT` seconds is a 503 with ``Retry-After``, having
read nothing (see :class:`~framepipe.server.thumbnails.ThumbnailSlots`).
Segments of an app served here come from memory (filled from the event log at start); those of
another process's app from the event log its ``StoreEventSink`` writes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Annotated, Any

from framepipe.app import read_snapshots
from framepipe.backends.objects import ObjectStore
from framepipe.backends.objects.base import validate_key
from framepipe.errors import InvalidKeyError, MissingDependencyError, ObjectNotFoundError
from framepipe.server.live import (
    MARKER_TYPES,
    LiveHistory,
    display_fields,
    histogram,
    marker_text,
    stored_app_events,
)
from framepipe.server.path_keys import ObjectKey
from framepipe.server.state import Service, ServiceState
from framepipe.server.store_errors import object_store_errors
from framepipe.server.thumbnails import (
    CorruptImageError,
    ImageTooLargeError,
    NotAnImageError,
    ObjectTooLargeError,
    ThumbnailCache,
    ThumbnailsBusyError,
)
from framepipe.stream.sinks import FrameStore

try:
    from fastapi import APIRouter, HTTPException, Query
    from fastapi import Path as Path_
    from fastapi.responses import Response
    from pydantic import BaseModel, Field
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["router"]

_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$"  # as the sources' routes: never '..'
Name = Annotated[str, Path_(pattern=_NAME)]

router = APIRouter(tags=["segments"])
"""Included under ``/api``."""


class DisplayField(BaseModel):
    """A field of a segment's meta, as the segments view shows it."""

    label: str
    value: str | float | int | bool | None = None
    image: str | None = Field(None, description="A stored image's key, shown as a picture.")


class SegmentOut(BaseModel):
    """One completed segment."""

    segment_id: str
    pipeline: str
    source_id: str | None = None
    key: str | None = None
    completed_at: float = Field(description="When it completed (Unix time).")
    first_ts_ms: int | None = None
    last_ts_ms: int | None = None
    duration_s: float | None = Field(None, description="From its first frame to its last.")
    frames: int = 0
    reason: str | None = Field(None, description="Why it closed (timeout, key_changed, ...).")
    latency_s: float | None = Field(None, description="From its last frame to completion.")
    stored: list[str] = Field(default_factory=list, description="Keys of its stored frames.")
    selected: list[str] = Field(default_factory=list, description="Keys of its best frames.")
    fields: list[DisplayField] = Field(default_factory=list)


class SegmentsPage(BaseModel):
    """The newest completed segments of an app."""

    app: str
    hosted: bool = Field(description="Whether the app runs inside this service.")
    segments: list[SegmentOut]


class SampleOut(BaseModel):
    """One reading of a source."""

    ts: float
    fps: float | None = Field(None, description="Frames captured per second since the last.")
    frames: int
    restarts: int
    state: str | None = None
    latency_ms: dict[str, float] = Field(
        default_factory=dict, description="Median processing time per stage."
    )


class MarkerOut(BaseModel):
    """A restart of a source, or what led to one."""

    ts: float
    type: str
    text: str


class HistogramOut(BaseModel):
    """Counts of values in equal bins from 0: ``counts[i]`` are in ``[edges[i], edges[i+1])``."""

    edges: list[float]
    counts: list[int]
    count: int


class SourceHistory(BaseModel):
    """A source's recent history."""

    app: str
    pipeline: str
    interval: float = Field(description="Seconds between samples.")
    window: float = Field(description="Seconds of samples kept.")
    samples: list[SampleOut]
    markers: list[MarkerOut]
    segment_latency: HistogramOut = Field(description="Of its newest segments, in seconds.")


def _history(service: ServiceState) -> LiveHistory:
    live = service.live
    if live is None or service.running is None:
        raise HTTPException(503, "the service is not running")
    return live


async def _known(service: ServiceState, app: str) -> bool:
    """True when ``app`` is served here; False when another process of this home runs it;
    404 otherwise."""
    if app in service.apps:
        return True
    names = {s.get("name") for s in await asyncio.to_thread(read_snapshots, service.settings)}
    if app not in names:
        raise HTTPException(404, f"no app {app!r} in this home")
    return False


def _segment(ts: float, data: dict[str, Any], fields: Any) -> SegmentOut | None:
    segment_id = data.get("segment_id")
    pipeline = data.get("pipeline")
    if not isinstance(segment_id, str) or not isinstance(pipeline, str):
        return None
    first, last = data.get("first_ts_ms"), data.get("last_ts_ms")
    duration = (last - first) / 1000.0 if isinstance(first, int) and isinstance(last, int) else None
    meta = data.get("meta")
    meta = meta if isinstance(meta, dict) else {}
    try:
        return SegmentOut(
            segment_id=segment_id,
            pipeline=pipeline,
            source_id=data.get("source_id"),
            key=data.get("key"),
            completed_at=ts,
            first_ts_ms=first,
            last_ts_ms=last,
            duration_s=duration,
            frames=data.get("frames") or 0,
            reason=data.get("reason"),
            latency_s=data.get("latency_s"),
            stored=[k for k in data.get("stored") or () if isinstance(k, str)],
            selected=[k for k in data.get("selected") or () if isinstance(k, str)],
            fields=[DisplayField(**f) for f in display_fields(meta, fields)],
        )
    except ValueError:  # a stored event of an older or foreign shape: left out
        return None


async def _segment_rows(
    service: ServiceState, app: str, pipeline: str | None, limit: int
) -> tuple[bool, list[tuple[float, dict[str, Any]]]]:
    hosted = await _known(service, app)
    if hosted:
        rows = _history(service).hosted_segments(app, pipeline)
    else:
        _history(service)
        found = await asyncio.to_thread(
            stored_app_events, service.store, app, ("segment.completed",), limit=5 * limit
        )
        rows = [(ts, d) for ts, _, d in found if pipeline is None or d.get("pipeline") == pipeline]
    return hosted, rows[:limit]


@router.get("/segments/{app_name}")
async def segments_list(
    app_name: Name,
    service: Service,
    pipeline: Annotated[str | None, Query(pattern=_NAME)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> SegmentsPage:
    """The newest completed segments of a live app (of one of its pipelines), newest first."""
    hosted, rows = await _segment_rows(service, app_name, pipeline, limit)
    board = service.boards.get(app_name)
    fields = board.segment_fields if board is not None else None
    out = [s for ts, data in rows if (s := _segment(ts, data, fields)) is not None]
    return SegmentsPage(app=app_name, hosted=hosted, segments=out)


def _stores(service: ServiceState, app: str, pipeline: str) -> list[ObjectStore]:
    """The stores a key of ``app``'s pipeline may be read from, in order."""
    stores: list[ObjectStore] = []
    live_app = service.apps.get(app)
    if live_app is not None:
        found = live_app.pipelines.get(pipeline)
        for stage in found.sinks if found is not None else ():
            sink = stage.processor
            if isinstance(sink, FrameStore):
                stores += [s for s in (sink.objects, sink.selected_store) if s is not None]
        board = service.boards.get(app)
        if board is not None and board.objects is not None:
            own = board.objects()
            if own is not None:
                stores.append(own)
    stores.append(service.objects)
    unique: dict[int, ObjectStore] = {}
    for s in stores:
        unique.setdefault(id(s), s)
    return list(unique.values())


def _thumbnail(
    cache: ThumbnailCache, stores: list[ObjectStore], key: str, width: int, max_pixels: int
) -> bytes:
    missing: ObjectNotFoundError | None = None
    for store in stores:
        try:
            return cache.get(store, key, width, max_pixels=max_pixels)
        except ObjectNotFoundError as exc:
            missing = exc
    assert missing is not None
    raise missing


@router.get(
    "/segments/{app_name}/{pipeline}/frames/{key:objectkey}",
    responses={200: {"content": {"image/jpeg": {}}}},
)
async def segments_frame(
    app_name: Name,
    pipeline: Name,
    key: ObjectKey,
    service: Service,
    width: Annotated[int, Query(ge=16, le=1920)] = 160,
) -> Response:
    """A stored frame of a live app's pipeline, as a JPEG at most ``width`` pixels wide."""
    await _known(service, app_name)
    cache = service.thumbnails
    if cache is None or service.running is None:
        raise HTTPException(503, "the service is not running")
    settings = service.settings
    try:
        validate_key(key)
        stores = _stores(service, app_name, pipeline)
        with object_store_errors("read", key):
            data = cache.kept_in(stores, key, width)
            if data is None:
                slots = cache.slots(settings.thumbnail_concurrency)
                work = functools.partial(
                    _thumbnail, cache, stores, key, width, settings.thumbnail_max_pixels
                )
                data = await slots.run(work)
    except ThumbnailsBusyError as exc:
        raise HTTPException(
            503,
            f"the frame {key!r} was not made into a thumbnail: {exc}; try again later",
            headers={"Retry-After": str(exc.retry_after)},
        ) from None
    except InvalidKeyError:
        raise HTTPException(
            400,
            f"the key {key!r} is refused: only a plain path inside the app's object store "
            "(no '..', no absolute path, no symlink out of the store)",
        ) from None
    except ObjectNotFoundError:
        raise HTTPException(404, f"no object {key!r} in app {app_name!r}'s store") from None
    except CorruptImageError as exc:
        raise HTTPException(
            422,
            f"the object {key!r} is a truncated or corrupt {exc.kind} image: no thumbnail "
            "can be made of it",
        ) from None
    except NotAnImageError:
        raise HTTPException(
            415, f"the object {key!r} is not an image (JPEG, PNG, WebP or BMP)"
        ) from None
    except ImageTooLargeError as exc:
        raise HTTPException(
            422,
            f"the object {key!r} is an image of {exc.width}x{exc.height} pixels, over the "
            f"{exc.limit} a thumbnail is made from",
        ) from None
    except ObjectTooLargeError as exc:
        raise HTTPException(
            422,
            f"the object {key!r} is {exc.size} bytes, larger than an image a thumbnail is "
            f"made from can be ({exc.limit}); not read",
        ) from None
    return Response(
        data,
        media_type="image/jpeg",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
    )


@router.get("/sources/{app_name}/{pipeline}/history")
async def sources_history(
    app_name: Name,
    pipeline: Name,
    service: Service,
    seconds: Annotated[float, Query(gt=0, le=86400)] = 300.0,
) -> SourceHistory:
    """A source's samples over the last ``seconds`` (at most the window kept), its restart
    markers over that time and a histogram of its newest segments' latency."""
    hosted = await _known(service, app_name)
    live = _history(service)
    every = live.samples(app_name, pipeline)
    since = (every[-1].ts if every else time.time()) - seconds
    samples = [s for s in every if s.ts > since]
    if hosted:
        markers = live.hosted_markers(app_name, pipeline)
        segments = live.hosted_segments(app_name, pipeline)
    else:
        found = await asyncio.to_thread(
            stored_app_events,
            service.store,
            app_name,
            ("segment.completed", *MARKER_TYPES),
            limit=5 * live.keep,
        )
        found = [f for f in found if f[2].get("pipeline") == pipeline]
        markers = [
            (ts, kind, marker_text(kind, d)) for ts, kind, d in found if kind != "segment.completed"
        ]
        segments = [(ts, d) for ts, kind, d in found if kind == "segment.completed"]
    latencies = [
        float(d["latency_s"])
        for _, d in segments[: live.keep]
        if isinstance(d.get("latency_s"), (int, float))
    ]
    return SourceHistory(
        app=app_name,
        pipeline=pipeline,
        interval=live.interval,
        window=live.window,
        samples=[SampleOut(**vars(s)) for s in samples],
        markers=[MarkerOut(ts=ts, type=k, text=t) for ts, k, t in markers if ts > since],
        segment_latency=HistogramOut(**histogram(latencies)),
    )
