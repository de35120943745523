"""One station: its capture (:func:`station_source`), its pipeline (:func:`build_station`:
capture -> order tags -> orders -> frame store), and stations as they are written in
settings (:func:`parse_stations`, :func:`split_pairs`).
"""

from __future__ import annotations

import math
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from tags import OrderKey, OrderTagStage, TagReader

from framepipe import (
    Backoff,
    CommandSource,
    FrameStore,
    ObjectStore,
    Segmenter,
    Source,
    Stage,
    StreamPipeline,
)
from framepipe.errors import ConfigError
from framepipe.sources import Capture, capture_source

__all__ = [
    "FRAME_TEMPLATE",
    "AfterRestarts",
    "build_station",
    "parse_stations",
    "split_pairs",
    "station_source",
]

FRAME_TEMPLATE = "frames/{station_id}/{segment_id}/frame_{ts_ms}_{seq}.jpg"
STATION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
AfterRestarts = Literal["fail", "keep_trying"]


def station_source(
    station_id: str,
    spec: str,
    *,
    capture: Capture = "auto",
    fps: float | None = None,
    loop: bool = False,
    realtime: bool = True,
    decode_threads: int | None = 1,
    input_options: Mapping[str, str] | None = None,
) -> Source:
    """The capture of one station.

    ``spec`` is a video file, a stream URL (``rtsp://``, ``http://``, ``udp://`` ...), a
    camera's device node (``/dev/video0``), or ``cmd:<command line>`` (any command writing an
    MJPEG stream to stdout, e.g. a ``gst-launch-1.0 ... ! jpegenc ! fdsink fd=1`` pipeline).
    Files, URLs and devices are captured by
    :func:`framepipe.sources.capture_source`: ``capture="auto"`` runs gst-launch-1.0 where
    GStreamer can play the input, else ffmpeg (the hand-written station's model: one
    persistent process per station, which ``STATION_ID`` is passed to); ``gst`` or ``ffmpeg``
    force one, ``av`` decodes with PyAV in this process. Files are played at their own rate
    (``realtime``) once, or forever with ``loop``; ``fps`` resamples the capture (the
    hand-written station ran at 1 fps). ``decode_threads=1`` (the default) decodes each
    station's video in one thread: a station's camera is small and slow, and one thread is the
    cheapest per frame when many stations share the machine. ``input_options`` are FFmpeg's
    options for opening the camera (``{"input_format": "mjpeg"}`` asks a USB camera for its
    JPEG pictures, which are then stored as they come); they make ``auto`` capture with
    ffmpeg."""
    env = {"STATION_ID": station_id}
    if spec.startswith("cmd:"):
        argv = shlex.split(spec[4:])
        if not argv:
            raise ConfigError(f"station {station_id}: 'cmd:' needs a command")
        return CommandSource(argv, station_id, env=env, fps=fps)
    return capture_source(
        spec,
        station_id,
        capture=capture,
        fps=fps,
        loop=loop,
        realtime=realtime,
        env=env,
        decode_threads=decode_threads,
        input_options=input_options,
    )


def build_station(
    station_id: str,
    source: Source,
    *,
    frames: ObjectStore,
    selected: ObjectStore | None = None,
    selected_prefix: str = "selected/",
    order_timeout: float = 10.0,
    max_order_seconds: float | None = None,
    best_frames: int = 3,
    tag_workers: int = 2,
    store_workers: int = 2,
    reader: TagReader | str | None = None,
    stall_timeout: float | None = 10.0,
    max_restarts: int = 5,
    backoff: Backoff | None = None,
    frame_template: str = FRAME_TEMPLATE,
    after_restarts: AfterRestarts = "keep_trying",
    retry_delay: float | None = None,
    clock: Literal["wall", "stream"] = "wall",
    spool: ObjectStore | str | os.PathLike[str] | None = None,
) -> StreamPipeline:
    """The pipeline of one station (see the module docstring). ``reader``: ``"qr"`` (QR
    tags, the default), ``"ocr"`` (printed order numbers) or any :class:`TagReader`.
    ``clock="stream"`` times orders out by the recording's own time (frames' ``pts``), for
    footage read faster than real time.
    ``frame_template``: the frames' keys (``station_1/{segment_id}/...`` for a store that is
    the ``frames`` bucket itself). ``after_restarts``: ``keep_trying`` retries a camera that
    failed ``max_restarts`` times in a row every ``retry_delay`` seconds (default: the
    backoff's cap) until it is back; ``fail`` gives the station up. ``spool``: a local folder
    where frames the object store refuses (MinIO down) are kept, each under its key, until it
    takes them again (:class:`~framepipe.stream.FrameStore`'s store and forward)."""
    if STATION_PATTERN.fullmatch(station_id) is None:
        raise ConfigError(
            f"station id {station_id!r}: use letters, digits, '_' and '-' "
            "(it becomes part of storage keys)"
        )
    if not 0 < order_timeout < math.inf:  # also refuses NaN, which no comparison holds for
        raise ConfigError(f"order_timeout must be > 0 seconds, got {order_timeout}")
    if max_order_seconds is not None and not 0 < max_order_seconds < math.inf:
        raise ConfigError(f"max_order_seconds must be > 0 seconds, got {max_order_seconds}")
    if best_frames < 0:
        raise ConfigError(f"best_frames must be 0 or more, got {best_frames}")
    return StreamPipeline(
        station_id,
        source,
        stages=[Stage(OrderTagStage(station_id, reader), workers=tag_workers, queue_size=32)],
        segmenter=Segmenter(
            OrderKey(),
            timeout=order_timeout,
            max_duration=max_order_seconds,
            label="order",
            clock=clock,
        ),
        sinks=[
            FrameStore(
                frames,
                template=frame_template,
                workers=store_workers,
                select_best=best_frames,
                score_key="tag_sharpness",
                selected_prefix=selected_prefix,
                selected_store=selected,
                spool=None if spool is None else _station_spool(spool, station_id),
            )
        ],
        stall_timeout=stall_timeout,
        max_restarts=max_restarts,
        backoff=backoff or Backoff(2.0, 2.0, 60.0, 0.0),
        after_restarts=after_restarts,
        retry_delay=retry_delay,
    )


def _station_spool(
    spool: ObjectStore | str | os.PathLike[str], station_id: str
) -> ObjectStore | Path:
    """Each station keeps its frames in a folder of its own below a folder ``spool``."""
    return spool if isinstance(spool, ObjectStore) else Path(spool) / station_id


_NEXT_PAIR = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_.-]*=)")


def split_pairs(text: str) -> list[str]:
    """``NAME=VALUE`` pairs written on one line, comma-separated (an environment variable),
    as a list: a comma separates pairs only where a ``NAME=`` follows it, so a value may hold
    commas (``headers=X-A: 1, 2``, an RTSP URL's query); blank items are dropped."""
    return [item.strip() for item in _NEXT_PAIR.split(text) if item.strip()]


def parse_stations(items: Sequence[str]) -> dict[str, str]:
    """``["station_1=video.mp4", ...]`` as a mapping; a clear error for a malformed item, and
    for a station id given twice (one of the two cameras would silently never run)."""
    stations: dict[str, str] = {}
    for item in items:
        station_id, sep, spec = item.partition("=")
        if not sep or not station_id.strip() or not spec.strip():
            raise ConfigError(f"station {item!r}: give STATION_ID=SOURCE, e.g. station_1=video.mp4")
        station_id = station_id.strip()
        if station_id in stations:
            raise ConfigError(f"station {station_id!r} is given twice: give each station id once")
        stations[station_id] = spec.strip()
    return stations
