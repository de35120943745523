"""Run order-accuracy stations until Ctrl-C / SIGTERM (graceful: open orders close and are
stored before it exits).

    # no camera: generate a station video with QR order tags and run two stations on it
    python examples/order_accuracy/run.py --demo --duration 30

    # real stations: a file, an RTSP camera, a capture command of your own
    python examples/order_accuracy/run.py --station station_1=counter.mp4 \\
        --station station_2=rtsp://10.0.0.12/stream1 \\
        --station 'station_3=cmd:gst-launch-1.0 -q v4l2src ! videoconvert ! jpegenc ! fdsink fd=1'

    # re-process stored footage at machine speed; exits 0 once every file ended
    python examples/order_accuracy/run.py --station station_1=recorded.mp4 --fast

    # stations from a JSON file ({"station_1": "counter.mp4", ...}), re-read when it changes:
    # add a line and that station starts; remove it and it stops
    python examples/order_accuracy/run.py --stations-file stations.json

Each station's capture is one gst-launch-1.0 process where GStreamer can play the source, else
one ffmpeg process (``--capture`` forces one, or PyAV). A file is played once and its end ends
the station; ``--loop`` plays it forever. A camera that dies is restarted with backoff, and
after ``--max-restarts`` failures in a row it is retried every ``--retry-cap`` seconds until it
is back. The runner exits once no station can run any more (every file ended), or on
Ctrl-C / SIGTERM / ``--duration``: 0, or 1 when a station failed (a stage that crashed);
2 for bad settings, or a store that cannot be opened at start (a bucket that does not
exist, MinIO or PostgreSQL not reachable), said in one ``error: ...`` line.

Embedded by default (frames under .framepipe/objects/, events in .framepipe/state.db). Set
FRAMEPIPE_OBJECTS_URL / FRAMEPIPE_DATABASE_URL / FRAMEPIPE_BROKER_URL for S3 (MinIO),
PostgreSQL and Redis; the code is the same. With the frames in a bucket named ``frames``
(``FRAMEPIPE_OBJECTS_URL='s3://frames?endpoint=...'``) the keys are the original station's,
``station_1/ORDER_123/frame_<ms>_<n>.jpg``, and the best frames go to the ``selected`` bucket.
``--json`` prints every event as a JSON line on stdout (logs go to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_video import default_schedule, make_station_video
from orders import FRAME_TEMPLATE, READERS, OrderAccuracy, QrTagReader, parse_stations
from stations_file import read_stations_file, watch_stations

from framepipe import ObjectStore, Settings
from framepipe.backoff import Backoff
from framepipe.config import load_settings
from framepipe.errors import (
    ConfigError,
    MissingDependencyError,
    ObjectStoreError,
    StateStoreError,
)
from framepipe.logs import configure_logging, get_logger
from framepipe.pixels import REDUCTIONS

log = get_logger("order_accuracy")

STATION_TEMPLATE = FRAME_TEMPLATE.removeprefix("frames/")
"""The original station's keys, for a store that is the ``frames`` bucket itself."""
FrameKeys = Literal["auto", "station", "prefixed"]
START_ERRORS = (ObjectStoreError, StateStoreError, MissingDependencyError)
"""What stops the runner before any station starts: a bucket that does not exist, MinIO or
PostgreSQL not reachable, a reader's package not installed. Reported like bad settings."""


def frames_bucket(store: ObjectStore) -> bool:
    """True when ``store`` is a bucket (or folder) named ``frames`` with nothing before it."""
    parts = urlsplit(store.url)
    if parts.scheme == "s3":
        return parts.netloc == "frames" and parts.path.strip("/") == ""
    return Path(parts.path or store.url).name == "frames"


def selected_bucket_url(objects_url: str) -> str | None:
    """``s3://selected?...`` on the same endpoint as an ``s3://frames?...`` objects URL."""
    parts = urlsplit(objects_url)
    if parts.scheme != "s3" or parts.netloc != "frames" or parts.path.strip("/"):
        return None
    return urlunsplit(parts._replace(netloc="selected"))


class Stations(OrderAccuracy):
    """:class:`OrderAccuracy` with the runner's choice of frame keys: ``station`` writes
    ``station_1/ORDER_123/frame_<ms>_<n>.jpg`` (the original layout, for a store that is the
    ``frames`` bucket), ``prefixed`` writes ``frames/station_1/...`` (one store holding more
    than frames); ``auto`` picks ``station`` for a store named ``frames``. Captures, the end of
    a recording, retrying a camera at the cap and the start-up lines are
    :class:`OrderAccuracy`'s."""

    def __init__(self, *args: Any, frame_keys: FrameKeys = "auto", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        station_keys = frame_keys == "station" or (
            frame_keys == "auto" and frames_bucket(self.frames)
        )
        self.options["frame_template"] = STATION_TEMPLATE if station_keys else FRAME_TEMPLATE


def demo_video(home: Path) -> Path:
    """The generated station video of ``--demo`` (made once)."""
    path = home / "order_accuracy" / "station.mp4"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        orders = ["ORDER_101", "ORDER_102", "ORDER_103", "ORDER_104"]
        make_station_video(path, default_schedule(orders, damaged=True, conflict=True))
        log.info("generated %s", path)
    return path


async def main_async(args: argparse.Namespace) -> int:
    settings = load_settings()
    stations = parse_stations(args.station or [])
    loop_files = args.loop
    order_timeout = 10.0 if args.order_timeout is None else args.order_timeout
    if args.demo:
        video = str(demo_video(settings.home))
        stations.setdefault("station_1", video)
        stations.setdefault("station_2", video)
        loop_files = True
        if args.order_timeout is None:  # the demo video's idle gaps are 2.5 s
            order_timeout = 2.0
    _check_stations(stations, args.stations_file)
    selected = args.selected
    if selected is None:
        selected = selected_bucket_url(settings.resolved_objects_url) or "selected/"
    service = _stations_service(args, settings, selected, order_timeout, loop_files)
    if args.json:

        def print_event(event: str, data: dict[str, Any]) -> None:
            print(json.dumps({"type": event, **data}, default=str), flush=True)

        service.app.on("*", print_event)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except START_ERRORS as exc:
        raise ConfigError(str(exc)) from exc
    if args.metrics_port is not None:
        from prometheus_client import start_http_server

        server, thread = start_http_server(
            args.metrics_port, "127.0.0.1", registry=service.app.registry
        )
        log.info("metrics on http://127.0.0.1:%d/metrics", args.metrics_port)
    await service.apply(stations)  # a bad station is reported and skipped
    if not service.specs and args.stations_file is None:
        await service.stop()
        raise ConfigError("no station could be started")
    tasks = []
    if args.stations_file is not None:
        watch = watch_stations(service, args.stations_file, stop)
        tasks.append(asyncio.create_task(watch, name="the stations file's watch"))
    else:  # no station can be added: the run is over once every station ended
        ended = _stop_when_all_ended(service, stop)
        tasks.append(asyncio.create_task(ended, name="the watch for every station's end"))
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
    finally:
        stop.set()
        try:
            await _finish(tasks)
        finally:  # (the open orders are completed whatever the tasks did)
            await service.stop()
            if args.metrics_port is not None:
                server.shutdown()
                thread.join(5)
    health = service.health()
    for name, pipeline in service.app.pipelines.items():
        read = pipeline.stats[0].frames_out if pipeline.stats else 0
        get_logger(name).info(
            "%d frame(s) captured, %d read for order tags", pipeline.frames_captured, read
        )
    log.info("stopped: %d order(s) completed", health["orders_completed"])
    failed = [
        name
        for name, p in service.app.pipelines.items()
        if p.state.value == "failed" and name not in service.invalid
    ]
    return 1 if failed else 0


async def _finish(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Wait for ``tasks`` (told to stop) to end; one that failed is logged, never raised: the
    service is stopped after them either way."""
    ended = await asyncio.gather(*tasks, return_exceptions=True)
    for task, outcome in zip(tasks, ended, strict=True):
        if isinstance(outcome, BaseException):
            log.error("%s failed", task.get_name(), exc_info=outcome)


def _check_stations(stations: dict[str, str], stations_file: Path | None) -> None:
    """A :class:`ConfigError` when there is no station to run, or when the stations file is
    missing or malformed at the start (later, a bad edit is logged and changes nothing)."""
    if stations_file is not None:
        read_stations_file(stations_file)
    elif not stations:
        raise ConfigError("no station: give --station ID=SOURCE, --stations-file or --demo")


def _stations_service(
    args: argparse.Namespace,
    settings: Settings,
    selected: str,
    order_timeout: float,
    loop_files: bool,
) -> Stations:
    """The stations of ``args``. It opens the object stores: a missing bucket, an unreachable
    endpoint or a reader's missing package is a :class:`ConfigError` with the reason."""
    try:
        return Stations(
            settings,
            selected=selected,
            order_timeout=order_timeout,
            max_order_seconds=args.max_order_seconds,
            best_frames=args.best_frames,
            capture=args.capture,
            fps=args.fps,
            loop=loop_files,
            tag_workers=args.tag_workers,
            max_restarts=args.max_restarts,
            stall_timeout=args.stall_timeout,
            backoff=Backoff(args.restart_delay, 2.0, args.retry_cap, 0.0),
            retry_delay=args.retry_cap,
            realtime=not args.fast,
            frame_keys=args.frame_keys,
            reader=QrTagReader(reduce=args.tag_reduce) if args.reader == "qr" else args.reader,
            input_options=input_options(args.input_option or []),
            spool=args.spool,
        )
    except START_ERRORS as exc:
        raise ConfigError(str(exc)) from exc


async def _stop_when_all_ended(service: OrderAccuracy, stop: asyncio.Event) -> None:
    """Set ``stop`` once every station ended (its file played to the end, or failed)."""
    waiting = asyncio.create_task(service.app.wait())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if waiting.done() and not stop.is_set():
        log.info("every station ended: stopping")
        stop.set()
    waiting.cancel()
    stopping.cancel()


def input_options(items: Sequence[str], setting: str = "--input-option") -> dict[str, str]:
    """``NAME=VALUE`` items (of ``setting``, named in the error) as a dict; the names and
    values are checked by the capture."""
    options: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"{setting} {item!r}: use NAME=VALUE")
        options[name] = value
    return options


def _number(kind: type[float] | type[int], minimum: float, *, strict: bool = False) -> Any:
    """An argparse type: a finite number >= ``minimum`` (> with ``strict``), or a clear
    error."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):  # nan passes every comparison below
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum:g}, got {text}"
            )
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Order-accuracy stations on framepipe (one persistent capture per station).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "--station",
        action="append",
        metavar="ID=SOURCE",
        help="a station and its video file, stream URL or cmd:COMMAND (repeat for more stations)",
    )
    parser.add_argument(
        "--stations-file",
        type=Path,
        metavar="FILE",
        help="a JSON object of stations, re-read when it changes",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="generate a station video and run station_1 and station_2 on it",
    )
    parser.add_argument(
        "--capture",
        choices=["auto", "gst", "ffmpeg", "av"],
        default="auto",
        help="how files and URLs are captured (default auto: a gst-launch-1.0 subprocess per "
        "station where GStreamer can play the source, else ffmpeg; av: PyAV in this process)",
    )
    parser.add_argument(
        "--input-option",
        action="append",
        metavar="NAME=VALUE",
        help="an FFmpeg option for opening every station's camera (repeat for more), e.g. "
        "input_format=mjpeg to ask USB cameras for their JPEG pictures; captures with ffmpeg "
        "(or av)",
    )
    parser.add_argument("--loop", action="store_true", help="play video files forever")
    parser.add_argument(
        "--fast",
        action="store_true",
        help="read video files as fast as the machine decodes them instead of at their own "
        "rate (re-processing stored footage; no frame is skipped; order timeouts count the "
        "recording's own time)",
    )
    parser.add_argument(
        "--reader",
        choices=READERS,
        default="qr",
        help="how order tickets are read: qr (QR tags, the default) or ocr (printed numbers)",
    )
    parser.add_argument(
        "--tag-reduce",
        type=int,
        choices=REDUCTIONS,
        default=1,
        help="read QR tags at 1/N of the picture's size: 2 reads tickets whose QR modules are "
        "at least 4 pixels wide as well, for about a quarter of the reading cost (default 1)",
    )
    parser.add_argument(
        "--fps",
        type=_number(float, 0, strict=True),
        default=None,
        help="capture rate (default: the source's own)",
    )
    parser.add_argument(
        "--order-timeout",
        type=_number(float, 0, strict=True),
        default=None,
        metavar="SECONDS",
        help="an order closes after this long without its tag (default 10; "
        "2 with --demo, whose idle gaps are 2.5 s)",
    )
    parser.add_argument("--max-order-seconds", type=_number(float, 0, strict=True), default=None)
    parser.add_argument(
        "--best-frames",
        type=_number(int, 0),
        default=3,
        help="frames per order copied to --selected (sharpest tag)",
    )
    parser.add_argument(
        "--selected",
        default=None,
        help="a key prefix, or an object store URL (s3://selected?endpoint=...); default: "
        "the selected bucket beside a frames bucket, else the prefix selected/",
    )
    parser.add_argument(
        "--frame-keys",
        choices=["auto", "station", "prefixed"],
        default="auto",
        help="station: station_1/ORDER_123/frame_<ms>_<n>.jpg; prefixed: frames/station_1/...; "
        "auto (default): station in a store named frames, else prefixed",
    )
    parser.add_argument("--tag-workers", type=_number(int, 1), default=2)
    parser.add_argument(
        "--max-restarts",
        type=_number(int, 0),
        default=5,
        help="capture restarts before a station is reported failed and retried every "
        "--retry-cap seconds until it is back (default 5)",
    )
    parser.add_argument(
        "--restart-delay",
        type=_number(float, 0),
        default=2.0,
        help="first restart delay, doubled each time up to --retry-cap (default 2)",
    )
    parser.add_argument(
        "--retry-cap",
        type=_number(float, 0, strict=True),
        default=60.0,
        metavar="SECONDS",
        help="the longest restart delay, and the retry period of a failed station (default 60)",
    )
    parser.add_argument(
        "--stall-timeout",
        type=_number(float, 0, strict=True),
        default=10.0,
        help="a capture with no frame for this long is restarted",
    )
    parser.add_argument(
        "--duration",
        type=_number(float, 0, strict=True),
        default=None,
        help="stop after this many seconds (default: run until Ctrl-C)",
    )
    parser.add_argument(
        "--spool",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the frames the object store refuses (MinIO down) in DIR/<station>/ and "
        "upload them under their keys once it is back (default: such frames are lost, "
        "counted in order.completed's not_stored)",
    )
    parser.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    parser.add_argument(
        "--metrics-port",
        type=_number(int, 0),
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT/metrics: per station "
        "capture fps, restarts, stalls, stage latency and queue depth, "
        "orders completed and their latency",
    )
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        return asyncio.run(main_async(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
