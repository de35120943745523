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

The pieces are in :mod:`tags` (reading the tags), :mod:`station` (one station's capture and
pipeline) and here (:class:`OrderAccuracy`, every station in one app); their names are
importable from here as well.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from station import (
    FRAME_TEMPLATE,
    AfterRestarts,
    build_station,
    parse_stations,
    split_pairs,
    station_source,
)
from tags import (
    ORDER_PATTERN,
    READERS,
    OrderKey,
    OrderTagStage,
    QrTagReader,
    TagReader,
    TagReading,
    tag_reader,
)

from framepipe import (
    App,
    Backoff,
    LocalObjectStore,
    ObjectStore,
    RedisEventSink,
    Settings,
    StateStore,
    StoreEventSink,
    StreamPipeline,
    get_logger,
    load_settings,
    open_object_store,
)
from framepipe.errors import ConfigError
from framepipe.sources import Capture
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
    "parse_stations",
    "split_pairs",
    "station_source",
    "tag_reader",
]

_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)


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
