"""``framepipe demo --live``: the service with its dashboard, a live order station and a batch
import, on embedded defaults, until Ctrl-C.

What runs, all in this process, under the settings' home (SQLite state, local objects):

* the HTTP service and dashboard (``framepipe serve``'s application) on one loopback port;
* the app ``demo`` with one live pipeline, ``order_station``: a generated clip of a counter
  where QR order tickets come and go (:mod:`framepipe.demo_media`), played at its own pace in
  a loop by :class:`~framepipe.sources.VideoSource`, its tags read by
  :class:`~framepipe.demo_media.OrderTagReader` (2 workers), segmented into orders (an order
  closes 1.5 s after its ticket left; a ticket seen again on the next pass of the loop opens
  ``ORDER_101.2``, ``.3`` ...) and stored by a
  :class:`~framepipe.stream.sinks.FrameStore` under ``frames/order_station/<order>/`` with the
  3 sharpest frames of each order copied under ``selected/``;
* one execution of the batch demo's ``demo_import`` pipeline on a generated SD card, submitted
  once the service is up.

Guarantees: the dashboard's link is printed only once the service answers and the import was
submitted; SIGINT or SIGTERM (or ``duration`` running out) stops the service, the live
pipeline (capture stopped, frames drained, the open order closed) and the engine (an import
still running ends ``interrupted``, resumable), then returns normally; a second signal
changes nothing (the stop is bounded: ``shutdown_grace`` for open connections, 10 s for the
station's drain). Frames accumulate while it runs (about 0.1 MB/s):
delete the home to reclaim them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from framepipe import listening
from framepipe.app import App
from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.config import Settings
from framepipe.demo import REF, prepare_card
from framepipe.demo import pipeline as import_pipeline
from framepipe.demo_media import OrderTagReader, make_station_clip
from framepipe.errors import (
    FramepipeError,
    MissingDependencyError,
    StateStoreError,
)
from framepipe.jobs.client import JobClient
from framepipe.jobs.models import ExecutionStatus
from framepipe.logs import get_logger
from framepipe.sources.av import VideoSource
from framepipe.stream.pipeline import StreamPipeline
from framepipe.stream.segment import Segmenter
from framepipe.stream.sinks import FrameStore
from framepipe.stream.stage import Stage

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = [
    "APP",
    "STATION",
    "LiveDemo",
    "listen",
    "require_server_extra",
    "sigterm_interrupts",
    "station_app",
]

APP = "demo"
STATION = "order_station"

_log = get_logger("demo")


def require_server_extra() -> None:
    """Raise :class:`MissingDependencyError` (with the pip command) unless FastAPI and uvicorn
    can be imported."""
    for module in ("fastapi", "uvicorn"):
        try:
            __import__(module)
        except ImportError as exc:
            missing = exc.name or module  # what is missing may be one of theirs
            raise MissingDependencyError(missing, "server", "framepipe demo --live") from exc


def listen(host: str, port: int, *, exact: bool) -> socket.socket:
    """A socket bound to ``host:port``. When that port is in use and not ``exact``, one bound
    to a free port the system picks instead (``sock.getsockname()`` says which); otherwise a
    :class:`ConfigError` naming the address."""
    return listening.listen(
        host, port, exact=exact, busy_hint="leave out --port to take a free one"
    )


def station_app(settings: Settings, clip: Path, objects: ObjectStore) -> App:
    """The app ``demo`` with its one live pipeline ``order_station`` on ``clip`` (see the
    module docstring), its frames stored in ``objects``."""
    app = App(APP, settings=settings, health_interval=1.0)
    app.add_pipeline(
        StreamPipeline(
            STATION,
            VideoSource(clip, STATION, realtime=True, loop=True),
            stages=[Stage(OrderTagReader(), workers=2)],
            segmenter=Segmenter("order", timeout=1.5, label="order"),
            sinks=[FrameStore(objects, select_best=3)],
        )
    )
    return app


class LiveDemo:
    """One run of the live demo on ``settings``; see the module docstring.

    ``token`` is the service's bearer token; ``say(line)`` prints a line for the user."""

    def __init__(
        self,
        settings: Settings,
        *,
        token: str,
        say: Any,
        duration: float | None = None,
    ) -> None:
        self.settings = settings
        self.token = token
        self.say = say
        self.duration = duration
        self.folder = settings.home / "demo-live"
        self.card = (settings.home / "demo-card").resolve()

    def prepare(self) -> Path:
        """Make the station's clip (again, at every start: a second or two) and the card's
        clips (kept when there); returns the clip."""
        clip = self.folder / "order-station.mp4"
        make_station_clip(clip)
        prepare_card(self.card, 3)
        return clip

    def run(self, sock: socket.socket, link: str) -> None:
        """Serve on ``sock`` (closed at the end) until a signal or the duration; print ``link``
        once it answers. A SIGINT or SIGTERM before the service runs raises KeyboardInterrupt
        (see :func:`sigterm_interrupts`)."""
        import uvicorn

        from framepipe.backends.state import StateStore
        from framepipe.server import create_app

        settings = self.settings
        with contextlib.ExitStack() as stack:
            stack.callback(sock.close)
            clip = self.prepare()
            store = StateStore(
                settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous
            )
            stack.callback(store.close)
            problem = store.check_writable()
            if problem is not None:
                raise StateStoreError(f"the state database {store.safe_url} is {problem}")
            objects = open_object_store(settings.resolved_objects_url)
            stack.callback(objects.close)
            application = create_app(
                settings,
                pipelines=[import_pipeline],
                apps=[station_app(settings, clip, objects)],
                store=store,
                objects=objects,
                token=self.token,
            )
            server = _quiet_server(uvicorn, application, settings)
            if not asyncio.run(self._serve(server, application, sock, link)):
                raise FramepipeError("the service did not start: see the lines above")

    async def _serve(
        self, server: Any, application: FastAPI, sock: socket.socket, link: str
    ) -> bool:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if serving.done():
                await serving
                return False
            await asyncio.sleep(0.05)
        running = application.state.service.running
        execution_id = await running.jobs.submit(import_pipeline, {"card": str(self.card)}, ref=REF)
        self.say(f"Batch import {execution_id} of the card {self.card} submitted.")
        self.say(f"Dashboard: {link}")
        self.say("Ctrl-C stops the demo.")
        watch = asyncio.create_task(self._report(running.jobs, execution_id))
        if self.duration is not None:
            asyncio.get_running_loop().call_later(self.duration, _stop, server)
        try:
            await serving
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        self.say("Demo stopped.")
        return True

    async def _report(self, jobs: JobClient, execution_id: str) -> None:
        """Say how the import ended (nothing when the demo stops first)."""
        try:
            info = await jobs.wait(execution_id, raise_on_failure=False)
        except FramepipeError:
            return
        if info.status is not ExecutionStatus.COMPLETED:
            self.say(
                f"Batch import {execution_id}: {info.error or info.status.value} "
                f"('framepipe --home {self.settings.home} jobs retry {execution_id}' resumes it)."
            )
            return
        imported = info.data.get("imported", [])
        if not imported:
            self.say(
                f"Batch import {execution_id} completed: nothing new on the card "
                "(the ledger remembers the clips an earlier run imported)."
            )
            return
        self.say(
            f"Batch import {execution_id} completed: {len(imported)} new clip(s) in "
            f"{self.settings.resolved_objects_url} (imports/, thumbnails/, reports/)."
        )


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, as SIGINT does (in the main thread; the
    service takes both over while it runs)."""
    try:
        previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop(server: Any) -> None:
    server.should_exit = True


def _quiet_server(uvicorn: Any, application: FastAPI, settings: Settings) -> Any:
    """A uvicorn server for ``application`` without access log, that takes SIGINT and SIGTERM
    as "stop" (a second one too: uvicorn's forced exit would skip the lifespan's end, which
    stops the station and the engine) and, unlike ``uvicorn.run``, does not raise the signal
    again once stopped (the demo then exits 0)."""

    class Server(uvicorn.Server):  # type: ignore[misc]
        def handle_exit(self, sig: int, frame: Any) -> None:
            self.should_exit = True  # never force_exit: that would skip stopping the station

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        application,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)),
    )
    return Server(config)
