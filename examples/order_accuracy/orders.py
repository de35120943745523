"""The order-accuracy station on framepipe: one persistent capture per station,
orders read from order tickets (QR tags, or printed order numbers read by OCR), frames stored
per station and order.

Per station, one :class:`~framepipe.stream.StreamPipeline`::

    capture (gst-launch-1.0 / ffmpeg subprocess, or PyAV)   one process per station, for good
      -> order_tags  (OrderTagStage, N workers, source order kept; reader "qr" or "ocr")
      -> segmenter   (an order = a segment keyed by the order id; closes after order_timeout s
                      without its tag, or when another order's tag shows up)
      -> frame_store (frames/{station_id}/{order_id}/frame_{ts_ms}_{n}.jpg, best frames of each
                      order copied to the `selected` prefix or bucket)

:class:`OrderAccuracy` runs the stations in one :class:`~framepipe.App`: stations can be added
and removed while it runs, each fails alone, and every order ends with the log line
``Order ORDER_123 completed: latency=0.4s frames=80`` and an ``order.completed`` event.

What an order holds, and what happens to odd tags:

* An order opens at the first frame showing its tag and takes every frame after it until it
  closes, also frames where the tag is hidden for a moment (a hand over the ticket).
* A tag that is seen but does not decode is reported (``tag.unreadable``, at most once per
  ``report_every`` seconds per station, with the count); the frame stays with the open order.
* Two different order tags in one frame (``tag.conflict``): the frame stays with the order
  being seen, if it is one of them; otherwise it belongs to no new order.
* A decoded text that is not an order id (``ORDER_PATTERN``; ids become storage keys) is
  reported as ``tag.invalid`` and ignored.
* A tag that reappears after its order closed opens a new order: its frames go under
  ``<order_id>.2`` (``.3`` ...), its event has ``order_id`` and ``repeat``; stored frames never
  mix.
* A capture that dies is restarted (2, 4, 8 ... 60 s); the open order closes on its timeout
  meanwhile, with all its frames. After ``max_restarts`` failures in a row the station emits
  ``station.failed`` (``retrying: true``) once and its capture is retried every
  ``retry_delay`` seconds (the backoff's cap, 60 s) until the camera is back
  (``station.recovered``): a camera outage needs nobody. The other stations go on.
* A recording's end ends its station (a finite file); a camera's end is a death.
* The first time a station's capture runs, the original station's start-up lines are logged
  (``Frame monitor thread started`` ... ``All components started, entering main loop``), which
  its operators' checks look for.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import numpy as np

from framepipe import (
    App,
    Backoff,
    CommandSource,
    Frame,
    FrameStore,
    LocalObjectStore,
    ObjectStore,
    Processor,
    RedisEventSink,
    Segmenter,
    Settings,
    Source,
    Stage,
    StateStore,
    StoreEventSink,
    StreamPipeline,
    get_logger,
    load_settings,
    open_object_store,
)
from framepipe.errors import ConfigError, MissingDependencyError
from framepipe.pixels import REDUCTIONS
from framepipe.sources import Capture, capture_source
from framepipe.urls import safe_text, safe_url

__all__ = [
    "FRAME_TEMPLATE",
    "ORDER_PATTERN",
    "READERS",
    "OrderAccuracy",
    "OrderKey",
    "OrderTagStage",
    "QrTagReader",
    "TagReader",
    "TagReading",
    "build_station",
    "station_source",
    "tag_reader",
]

FRAME_TEMPLATE = "frames/{station_id}/{segment_id}/frame_{ts_ms}_{seq}.jpg"
ORDER_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
STATION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
AfterRestarts = Literal["fail", "keep_trying"]


# -- reading tags -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TagReading:
    """One tag in a frame: its text (None: seen but not decodable) and how sharp it is there
    (the variance of the Laplacian over the tag's box: higher is sharper)."""

    text: str | None
    sharpness: float
    error: str | None = None


class TagReader(Protocol):
    """Finds order tags in an image. :class:`QrTagReader` reads QR codes;
    ``ocr.OcrTagReader`` reads printed order numbers (``ORDER #123`` -> ``ORDER_123``).

    A reader with a ``colour`` attribute set to False is given the frame's grey image (for a
    decoded frame, its luma plane at no cost), at 1/``reduce`` of the size when it has a
    ``reduce`` attribute above 1 (``frame.small_gray``); otherwise the BGR image."""

    def read(self, image: np.ndarray) -> list[TagReading]:
        """Every tag in ``image`` (BGR, or grey for a ``colour = False`` reader)."""
        ...


class QrTagReader:
    """QR order tags, read with zxing-cpp (``pip install 'framepipe[qr]'``), in the grey
    image (``colour = False``: a decoded frame's luma plane, no colour conversion).

    ``reduce`` (1, 2, 4 or 8) reads the tags in the grey image at that fraction of the size: a
    ticket whose QR modules are at least 4 pixels wide in the camera's picture reads as well at
    half size (on the example's 640x360 station video, the same frames are read), for about a
    quarter of the reading cost; a captured JPEG is then decoded already scaled. Sharpness is
    measured in the image read, so compare it only between frames read the same way."""

    colour = False

    def __init__(self, reduce: int = 1) -> None:
        if reduce not in REDUCTIONS:
            raise ConfigError(f"QR tag reduce must be one of {REDUCTIONS}, not {reduce!r}")
        self.reduce = reduce
        try:
            import zxingcpp
        except ImportError as exc:
            raise MissingDependencyError("zxing-cpp", "qr", "reading QR order tags") from exc
        self._zxing = zxingcpp

    def read(self, image: np.ndarray) -> list[TagReading]:
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        # one format, as every release takes it (its stubs ask for a BarcodeFormats set)
        fmt: Any = self._zxing.BarcodeFormat.QRCode
        try:
            found = self._zxing.read_barcodes(gray, formats=fmt, return_errors=True)
        except TypeError:  # zxing-cpp < 2.3 reports readable codes only
            found = self._zxing.read_barcodes(gray, formats=fmt)
        readings = []
        for code in found:
            error = getattr(code, "error", None)
            sharpness = _sharpness(gray, code.position)
            if error or not code.valid:
                readings.append(TagReading(None, sharpness, str(error) or "not decodable"))
            else:
                readings.append(TagReading(code.text, sharpness))
        return readings


READERS = ("qr", "ocr")


def tag_reader(reader: TagReader | str | None) -> TagReader:
    """``reader`` as a :class:`TagReader`: ``"qr"`` (or None) is a :class:`QrTagReader`,
    ``"ocr"`` an ``ocr.OcrTagReader`` with its defaults (imported only then), an instance is
    returned as it is. An unknown name is a :class:`ConfigError`; a reader whose package is
    not installed a :class:`MissingDependencyError` with the pip command."""
    if reader is None or reader == "qr":
        return QrTagReader()
    if reader == "ocr":
        from ocr import OcrTagReader

        return OcrTagReader()
    if isinstance(reader, str):
        raise ConfigError(f"tag reader must be one of {', '.join(READERS)}, not {reader!r}")
    return reader


def _sharpness(gray: np.ndarray, position: Any) -> float:
    points = [position.top_left, position.top_right, position.bottom_right, position.bottom_left]
    xs = [p.x for p in points]
    ys = [p.y for p in points]
    h, w = gray.shape[:2]
    x0, x1 = max(0, min(xs)), min(w, max(xs) + 1)
    y0, y1 = max(0, min(ys)), min(h, max(ys) + 1)
    if x1 - x0 < 3 or y1 - y0 < 3:
        return 0.0
    return float(cv2.Laplacian(gray[y0:y1, x0:x1], cv2.CV_64F).var())


class OrderTagStage(Processor):
    """Reads the order tag of each frame of one station.

    Sets ``frame.meta``: ``station_id`` always; ``order_id`` and ``tag_sharpness`` when exactly
    one order tag was read; ``order_tags`` (sorted) when several different ones were;
    ``tag_error`` when a tag was seen but none decoded. Reports ``tag.unreadable``,
    ``tag.conflict`` and ``tag.invalid`` events (each at most once per ``report_every``
    seconds, with the number of frames since the last report) and ``station.first_frame``
    once per start. Thread-safe: run it with several workers. ``reader`` is a
    :class:`TagReader` or a name for :func:`tag_reader` (``"qr"``, ``"ocr"``); None reads QR
    tags with a reader made at setup."""

    name = "order_tags"

    def __init__(
        self,
        station_id: str,
        reader: TagReader | str | None = None,
        *,
        pattern: str = ORDER_PATTERN,
        report_every: float = 5.0,
    ) -> None:
        self.station_id = station_id
        self.reader = tag_reader(reader) if isinstance(reader, str) else reader
        self.pattern = re.compile(pattern)
        self.report_every = report_every
        self.added_at = time.time()
        self._first = True
        self._lock = threading.Lock()
        self._reports: dict[str, tuple[float, int]] = {}
        self._log = get_logger(station_id)

    def setup(self) -> None:
        if self.reader is None:
            self.reader = QrTagReader()
        self._first = True

    def process(self, item: Any) -> Any:
        frame: Frame = item
        assert self.reader is not None
        frame.meta["station_id"] = self.station_id
        if self._first:
            self._first_frame()
        if getattr(self.reader, "colour", True):
            image = frame.image
        else:
            image = frame.small_gray(getattr(self.reader, "reduce", 1))
        readings = self.reader.read(image)
        orders: dict[str, float] = {}
        unreadable: list[str] = []
        invalid: list[str] = []
        for reading in readings:
            if reading.text is None:
                unreadable.append(reading.error or "not decodable")
            elif self.pattern.fullmatch(reading.text) is None:
                invalid.append(reading.text)
            else:
                orders[reading.text] = max(orders.get(reading.text, 0.0), reading.sharpness)
        if len(orders) == 1:
            ((order_id, sharpness),) = orders.items()
            frame.meta["order_id"] = order_id
            frame.meta["tag_sharpness"] = round(sharpness, 3)
        elif orders:
            frame.meta["order_tags"] = sorted(orders)
            frame.meta["tag_sharpness"] = round(max(orders.values()), 3)
            self._report("tag.conflict", frame, "order tags %s in one frame", tags=sorted(orders))
        if unreadable and not orders:
            frame.meta["tag_error"] = unreadable[0]
            self._report(
                "tag.unreadable",
                frame,
                "an order tag that does not decode (%s)",
                error=unreadable[0],
            )
        if invalid:
            self._report(
                "tag.invalid", frame, "a code that is not an order id: %r", texts=invalid[:5]
            )
        return frame

    def _first_frame(self) -> None:
        with self._lock:
            if not self._first:
                return
            self._first = False
        seconds = time.time() - self.added_at
        self._log.info("first frame processed %.2fs after the station was started", seconds)
        self.emit("station.first_frame", station_id=self.station_id, seconds=round(seconds, 3))

    def _report(self, event: str, frame: Frame, message: str, **data: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, count = self._reports.get(event, (float("-inf"), 0))
            count += 1
            if now - last < self.report_every:
                self._reports[event] = (last, count)
                return
            self._reports[event] = (now, 0)
        detail = next(iter(data.values()))
        self._log.warning(
            f"frame %d: {message} (%d frame(s) since the last report)", frame.seq, detail, count
        )
        self.emit(
            event,
            station_id=self.station_id,
            seq=frame.seq,
            ts_ms=frame.ts_ms,
            frames=count,
            **data,
        )


class OrderKey:
    """The segmenter's key for one station: the frame's ``order_id``. On a conflict (several
    order tags) the order seen last stays, if it is among them; otherwise the frame opens no
    order. Called in frame order (by the segmenter)."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, frame: Frame) -> str | None:
        order_id = frame.meta.get("order_id")
        if order_id:
            self.last = str(order_id)
            return self.last
        tags = frame.meta.get("order_tags")
        if tags and self.last in tags:
            return self.last
        return None


# -- capture ------------------------------------------------------------------------------------


_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


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
    if order_timeout <= 0:
        raise ConfigError(f"order_timeout must be > 0 seconds, got {order_timeout}")
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


# -- the service --------------------------------------------------------------------------------


OrderCallback = Callable[[dict[str, Any]], Any]


class OrderAccuracy:
    """Every station of a site in one app (see the module docstring).

    ``frames`` is the object store of the frames (default: the settings' store,
    ``FRAMEPIPE_OBJECTS_URL``, a local folder under ``.framepipe/`` when unset). ``selected``
    is where the best frames of each order go: a key prefix in that store (default
    ``selected/``) or an object store URL of its own (``s3://selected?endpoint=...``).
    Events are committed to the state store (``FRAMEPIPE_DATABASE_URL``: SQLite by default,
    PostgreSQL when set) where ``framepipe serve`` shows them, and appended to the Redis
    Stream ``<namespace>:events:order_accuracy`` when ``FRAMEPIPE_BROKER_URL`` is Redis.
    ``reader`` reads the tickets of every station: ``"qr"`` (the default), ``"ocr"`` or a
    :class:`TagReader`; one reader serves all stations (both built-in readers are
    thread-safe), made here so a missing package fails at once."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        frames: ObjectStore | None = None,
        selected: str | ObjectStore = "selected/",
        order_timeout: float = 10.0,
        max_order_seconds: float | None = None,
        best_frames: int = 3,
        capture: Capture = "auto",
        fps: float | None = None,
        loop: bool = False,
        realtime: bool = True,
        tag_workers: int = 2,
        max_restarts: int = 5,
        stall_timeout: float | None = 10.0,
        backoff: Backoff | None = None,
        store_events: bool = True,
        name: str = "order_accuracy",
        reader: TagReader | str | None = None,
        frame_template: str = FRAME_TEMPLATE,
        after_restarts: AfterRestarts = "keep_trying",
        retry_delay: float | None = None,
        decode_threads: int | None = 1,
        input_options: Mapping[str, str] | None = None,
        spool: str | os.PathLike[str] | None = None,
    ) -> None:
        self.settings = settings or load_settings()
        if spool is not None:  # a folder it cannot make is refused now, not at a station
            LocalObjectStore(spool).close()
        self.frames = frames or open_object_store(self.settings.resolved_objects_url)
        if isinstance(selected, str) and _URL.match(selected):
            self.selected: ObjectStore | None = open_object_store(selected)
            self.selected_prefix = ""
        elif isinstance(selected, str):
            self.selected, self.selected_prefix = None, selected
        else:
            self.selected, self.selected_prefix = selected, ""
        self.options: dict[str, Any] = dict(
            order_timeout=order_timeout,
            max_order_seconds=max_order_seconds,
            best_frames=best_frames,
            tag_workers=tag_workers,
            max_restarts=max_restarts,
            stall_timeout=stall_timeout,
            backoff=backoff,
            reader=tag_reader(reader) if isinstance(reader, str) else reader,
            frame_template=frame_template,
            after_restarts=after_restarts,
            retry_delay=retry_delay,
            # footage read faster than real time keeps its own clock: an order times out
            # after order_timeout seconds of the recording, as it would have live
            clock="wall" if realtime else "stream",
            spool=spool,
        )
        self.capture_options: dict[str, Any] = dict(
            capture=capture,
            fps=fps,
            loop=loop,
            realtime=realtime,
            decode_threads=decode_threads,
            input_options=dict(input_options or {}),
        )
        self.app = App(name, settings=self.settings, auto_recovery=False)
        self.specs: dict[str, str] = {}
        self.orders_completed = 0
        self._sinks: list[StoreEventSink | RedisEventSink] = []
        self._store: StateStore | None = None
        self._store_events = store_events
        self.app.on("segment.started", self._order_started)
        self.app.on("segment.completed", self._order_completed)
        self.app.on("source.failed", self._station_failed)
        self.app.on("source.retrying", self._station_retrying)
        self.app.on("source.recovered", self._station_recovered)
        self.app.on("source.started", self._capture_started)
        self._announced: set[str] = set()
        self.invalid: set[str] = set()
        """Stations whose source can never be played (``station.invalid``): not a failure
        of the run, as a station refused at its start is not."""

    # -- stations -------------------------------------------------------------------------------

    def station_pipeline(self, station_id: str, spec: str) -> StreamPipeline:
        """The pipeline of station ``station_id`` capturing ``spec`` with this app's options
        (not yet added)."""
        source = station_source(station_id, spec, **self.capture_options)
        return build_station(
            station_id,
            source,
            frames=self.frames,
            selected=self.selected,
            selected_prefix=self.selected_prefix,
            **self.options,
        )

    def add_station_before_start(self, station_id: str, spec: str) -> None:
        """Configure a station before :meth:`start`."""
        self.app.add_pipeline(self.station_pipeline(station_id, spec))
        self.specs[station_id] = spec

    async def add_station(self, station_id: str, spec: str) -> None:
        """Add a station; when the app runs its capture starts now. Its ``station.added``
        event shows the source with its secrets masked (a camera URL's password, a
        ``?token=``; those of the URLs in a ``cmd:`` command line): the events are stored,
        streamed and printed."""
        if station_id in self.app.pipelines:
            raise ConfigError(f"station {station_id} exists already")
        # Choosing the capture may probe the file with gst-launch (a fraction of a second):
        # off the loop, so the running stations' frames are not held up.
        pipeline = await asyncio.to_thread(self.station_pipeline, station_id, spec)
        self.specs[station_id] = spec
        await self.app.add(pipeline)
        shown = safe_text(spec) if spec.startswith("cmd:") else safe_url(spec)
        self.app.emit("station.added", {"station_id": station_id, "source": shown})

    async def remove_station(self, station_id: str) -> None:
        """Stop a station (its open order closes with all its frames) and forget it."""
        await self.app.remove(station_id)
        self.specs.pop(station_id, None)
        self._announced.discard(station_id)
        self.invalid.discard(station_id)
        self.app.emit("station.removed", {"station_id": station_id})

    async def apply(self, stations: Mapping[str, str]) -> None:
        """Make the running stations those of ``stations`` (id -> source): add the new,
        remove the missing, restart those whose source changed. One bad station is reported
        and skipped; the others are applied."""
        for station_id in [s for s in self.specs if s not in stations]:
            await self.remove_station(station_id)
        for station_id, spec in stations.items():
            try:
                if station_id in self.specs and self.specs[station_id] != spec:
                    await self.remove_station(station_id)
                if station_id not in self.specs:
                    await self.add_station(station_id, spec)
            except ConfigError as exc:
                get_logger(station_id).error("station not started: %s", exc)
                self.app.emit("station.invalid", {"station_id": station_id, "error": str(exc)})

    # -- orders ---------------------------------------------------------------------------------

    def on_order(self, callback: OrderCallback) -> None:
        """Call ``callback(order)`` (sync or async) with each completed order's data (an
        ``order.completed`` callback of the app: one that raises is logged and ignored)."""
        self.app.on("order.completed", lambda _event, order: callback(order))

    def _order_started(self, _event: str, data: dict[str, Any]) -> None:
        self.app.emit(
            "order.started",
            {
                "order_id": data.get("key"),
                "segment_id": data.get("segment_id"),
                "station_id": data.get("source_id"),
                "first_ts_ms": data.get("first_ts_ms"),
            },
        )

    def _order_completed(self, _event: str, data: dict[str, Any]) -> None:
        segment_id = str(data["segment_id"])
        order_id = data.get("key") or segment_id
        repeat = int(segment_id.rsplit(".", 1)[1]) if "." in segment_id else 1
        order = {
            "order_id": order_id,
            "segment_id": segment_id,
            "repeat": repeat,
            "station_id": data.get("source_id"),
            "frames": data.get("frames"),
            "first_ts_ms": data.get("first_ts_ms"),
            "last_ts_ms": data.get("last_ts_ms"),
            "latency_s": data.get("latency_s"),
            "reason": data.get("reason"),
            "stored": data.get("stored", []),
            "spooled": data.get("spooled", []),
            "selected": data.get("selected", []),
        }
        # every frame of an order is stored as it comes, or kept locally while the store is
        # down (``spooled``, uploaded under its key later); a frame the store refused
        # (reported as a frame_store ``processor.error``) or a stop's cut drain left out is in
        # neither
        frames = int(order["frames"] or 0)
        order["not_stored"] = max(0, frames - len(order["stored"]) - len(order["spooled"]))
        if order["not_stored"]:
            get_logger(str(order["station_id"])).warning(
                "Order %s: %d of its %d frame(s) not stored (refused by the object store: see "
                "the frame_store warnings; or cut off by a stop)",
                segment_id,
                order["not_stored"],
                frames,
            )
        self.orders_completed += 1
        self.app.emit("order.completed", order)

    def _station_failed(self, _event: str, data: dict[str, Any]) -> None:
        station_id = str(data.get("source_id"))
        if data.get("permanent"):  # a file that can never be played: no restart would help
            self.invalid.add(station_id)
            get_logger(station_id).error("station's source cannot be played: %s", data["error"])
            self.app.emit("station.invalid", {"station_id": station_id, "error": data["error"]})
            return
        get_logger(station_id).error("Station failed for good: %s", data.get("error"))
        self.app.emit(
            "station.failed",
            {
                "station_id": station_id,
                "error": data.get("error"),
                "attempts": data.get("attempts"),
            },
        )

    def _station_retrying(self, _event: str, data: dict[str, Any]) -> None:
        station_id = str(data.get("source_id"))
        get_logger(station_id).error(
            "Station failed: %s; retrying every %gs until it is back",
            data.get("error"),
            data.get("delay"),
        )
        self.app.emit(
            "station.failed",
            {
                "station_id": station_id,
                "error": data.get("error"),
                "attempts": data.get("attempts"),
                "retrying": True,
                "next_attempt_at": data.get("next_attempt_at"),
            },
        )

    def _station_recovered(self, _event: str, data: dict[str, Any]) -> None:
        station_id = str(data.get("source_id"))
        get_logger(station_id).info("Station recovered after %s attempts", data.get("attempts"))
        self.app.emit(
            "station.recovered",
            {
                "station_id": station_id,
                "attempts": data.get("attempts"),
                "down_seconds": data.get("down_seconds"),
            },
        )

    def _capture_started(self, _event: str, data: dict[str, Any]) -> None:
        station_id = str(data.get("source_id"))
        if station_id in self._announced:
            return
        self._announced.add(station_id)
        station_log = get_logger(station_id)
        station_log.info("Frame monitor thread started")  # the tag stage's workers
        station_log.info("Health monitor thread started")  # the capture's supervisor
        station_log.info("All components started, entering main loop")

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the event sinks and start every station. A sink's wrong setting (Redis
        refusing the broker URL's credentials) fails it with :class:`ConfigError` before any
        station starts, instead of queueing the events for a writer that never gets in."""
        if self._store_events:
            self._store = StateStore(
                self.settings.resolved_database_url,
                sqlite_synchronous=self.settings.sqlite_synchronous,
            )
            self._sinks.append(
                StoreEventSink(
                    self._store, self.app.name, retention_days=self.settings.events_retention_days
                )
            )
        if self.settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
            stream = f"{self.settings.broker_namespace}:events:{self.app.name}"
            self._sinks.append(RedisEventSink(self.settings.broker_url, stream))
        try:
            for sink in self._sinks:
                await sink.start()
        except BaseException:
            await self._close_sinks()
            raise
        for sink in self._sinks:
            sink.attach(self.app)
        await self.app.start()

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop every station (open orders close with their frames), then flush the events."""
        await self.app.stop(timeout)
        await self._close_sinks()

    async def _close_sinks(self) -> None:
        """Write what the sinks hold, close them and the state store they wrote to."""
        for sink in self._sinks:
            await sink.aclose()
        self._sinks.clear()
        if self._store is not None:
            self._store.close()
            self._store = None

    async def __aenter__(self) -> OrderAccuracy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def health(self) -> dict[str, Any]:
        """The app's health with ``orders_completed``."""
        health = self.app.health().to_dict()
        health["orders_completed"] = self.orders_completed
        return health


_NEXT_PAIR = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_.-]*=)")


def split_pairs(text: str) -> list[str]:
    """``NAME=VALUE`` pairs written on one line, comma-separated (an environment variable),
    as a list: a comma separates pairs only where a ``NAME=`` follows it, so a value may hold
    commas (``headers=X-A: 1, 2``, an RTSP URL's query); blank items are dropped."""
    return [item.strip() for item in _NEXT_PAIR.split(text) if item.strip()]


def parse_stations(items: Sequence[str]) -> dict[str, str]:
    """``["station_1=video.mp4", ...]`` as a mapping; a clear error for a malformed item."""
    stations: dict[str, str] = {}
    for item in items:
        station_id, sep, spec = item.partition("=")
        if not sep or not station_id.strip() or not spec.strip():
            raise ConfigError(f"station {item!r}: give STATION_ID=SOURCE, e.g. station_1=video.mp4")
        stations[station_id.strip()] = spec.strip()
    return stations
