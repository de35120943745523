"""The FastAPI application: executions, pipelines, events and objects over REST, live events
over a WebSocket, health without a token.

Guarantees:

* before any route runs, :class:`~framepipe.server.browser_guard.BrowserGuard` refuses a foreign
  ``Host`` (DNS rebinding), a foreign ``Origin`` (another site's page, also on WebSockets),
  another site's page embedding what the service serves (an image, a video, a frame: its
  ``Sec-Fetch-Site``) and a tokenless ``POST`` that is not JSON, with or without a token
  configured; every response says ``nosniff``, ``no-store``, a policy that runs and frames
  nothing (the dashboard's files have their own) and ``Cross-Origin-Resource-Policy:
  same-origin``; the pages of ``allowed_origins`` (only those) get CORS: their preflights are
  answered and every answer to them names their origin in ``Access-Control-Allow-Origin``;
* every route but ``/health``, the dashboard's page and files and the API's schema
  (``/openapi.json``, the same for every installation; FastAPI's ``/docs`` and ``/redoc``
  pages, which load their scripts from a CDN, are not served) needs
  ``Authorization: Bearer <token>`` when a token is set (a WebSocket presents it as a
  subprotocol, a header, or ``?token=``, see :mod:`framepipe.server.guard`); a wrong or
  missing one is a 401 (WebSocket close code 1008) before anything is read or written;
* bad input is a 4xx whose ``detail`` says what is wrong and never shows the server's paths
  (unknown pipeline 404, invalid body or inputs 422 naming the field, an execution id or a
  filter that cannot be one 422 naming the parameter before any database is asked
  (:mod:`framepipe.server.params`), a state that forbids the call 409, a key escaping the
  store 400, a body over ``max_inputs_bytes`` whatever its content type, or an upload over
  ``max_upload_bytes``, 413), and nothing is half-created: an execution exists only once it
  was committed, an object only once its upload arrived whole; a state database that fails is
  a 503 naming the cause, an object store that fails a 500 naming the key (its cause, which
  may hold paths, is logged only), one that cannot be opened a 503 (the service starts
  without it, ``/health`` says so, and it is opened again in the background);
* no stored value can make a response fail: text that cannot be encoded (a lone surrogate
  stored by an older version) is sent as its JSON escape; listings carry no inputs;
* a WebSocket subscriber gets the current state first (``snapshot``), then every event
  committed after it, in order (the jobs' events, and those of the live apps served here:
  segments, sources, pipelines); one that falls too far behind is told so (``lagged``) and
  closed, to reconnect. A step's progress or completion, and an execution's completion, are
  also summed up as ``pipeline:progress`` (step and execution progress; the execution's never
  decreases within one socket);
* host-side detectors (the SD-card import) connect to ``/ws/detector``
  (:mod:`framepipe.server.detector`);
* a hosted app may add panels, routes and images of its object store to the dashboard under
  ``/api/apps/{app}/`` (:mod:`framepipe.server.panels`), behind the same checks;
* the live apps' completed segments with thumbnails of their stored frames, and each source's
  recent history (frames per second, stage latency, restarts), are kept by the service
  (:mod:`framepipe.server.live`) and served under ``/api/segments`` and
  ``/api/sources/{app}/{pipeline}/history`` (:mod:`framepipe.server.routes.segments`).

The routes are in :mod:`framepipe.server.routes`, one module per resource; what they share is
the :class:`~framepipe.server.state.ServiceState` on ``app.state.service``, which this module
fills while the app's lifespan runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TYPE_CHECKING

from framepipe import __version__
from framepipe.app import App
from framepipe.backends.objects import ObjectStore
from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import FramepipeError, MissingDependencyError
from framepipe.event_sinks import StoreEventSink
from framepipe.jobs.client import JobClient
from framepipe.jobs.models import ExecutionStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.pruning import ObjectsAfter, check_objects_prefix, delete_objects
from framepipe.logs import get_logger
from framepipe.redis import is_redis_url, safe_url
from framepipe.server.access import check_token
from framepipe.server.browser_guard import BrowserGuard
from framepipe.server.dashboard import mount_dashboard
from framepipe.server.detector import DetectorHub, mount_detector
from framepipe.server.feed import EventFeed
from framepipe.server.guard import hide_tokens_in_access_log
from framepipe.server.live import LiveHistory
from framepipe.server.object_access import ObjectAccess
from framepipe.server.panels import mount_app_panels
from framepipe.server.responses import SafeJSONResponse, install_error_handlers
from framepipe.server.routes import (
    events,
    executions,
    health,
    objects,
    pipelines,
    processors,
    segments,
    sources,
    status,
)
from framepipe.server.state import Running, ServiceState
from framepipe.server.thumbnails import ThumbnailCache

if TYPE_CHECKING:
    from framepipe.processors.fleet import ProcessorRegistry

try:
    from fastapi import Depends, FastAPI
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["create_app"]

_log = get_logger("server")

_API_ROUTERS = (
    pipelines.router,
    executions.router,
    events.router,
    sources.router,
    segments.router,
    processors.router,
    objects.router,
    status.router,  # the job-status shape of a polling frontend: every execution, see its module
)
"""The routers under ``/api``, behind the token, in the order they are matched."""

_RAW_BODIES = (("PUT", "/api/objects/"),)
"""The routes that stream their request body themselves, under a limit of their own
(``objects_put``: ``max_upload_bytes``); every other body is capped by the browser guard at
``max_inputs_bytes`` (and a margin for the rest of the JSON around the inputs)."""


async def _open_registry(settings: Settings) -> ProcessorRegistry | None:
    """A processor registry on the broker's Redis, or None (no Redis broker, or down)."""
    if not is_redis_url(settings.broker_url):
        return None
    try:
        from framepipe.processors.fleet import ProcessorRegistry

        registry = ProcessorRegistry(
            settings.broker_url, settings.broker_namespace, connect_retries=0
        )
        await registry.start()
    except Exception as exc:
        _log.warning(
            "processors are not listed: the registry on %s did not start (%s)",
            safe_url(settings.broker_url),
            exc,
        )
        return None
    return registry


def _lifespan(
    service: ServiceState,
    store: StateStore | None,
    objects: ObjectStore | ObjectAccess | None,
) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """Open what ``service`` runs on (``store`` and ``objects`` when given, else its own, which
    it closes at the end; an object store that cannot be opened is opened again in the
    background meanwhile), start the hub and the hosted apps, whose events join the feed."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        hide_tokens_in_access_log()
        settings = service.settings
        st = store or StateStore(
            settings.resolved_database_url, sqlite_synchronous=settings.sqlite_synchronous
        )
        obj = (
            objects
            if isinstance(objects, ObjectAccess)
            else ObjectAccess(settings.resolved_objects_url, objects)
        )
        if not obj.tried:
            problem = await asyncio.to_thread(obj.open)
            if problem is not None:
                _log.warning("%s cannot be opened: %s; serving without it", obj.describe(), problem)
        # Without a store open, the engine opens its own when a step first needs one.
        jobs = JobClient(
            st, settings=settings, objects=obj.store, pipelines=service.pipelines.values()
        )
        await jobs.start(engine=True)  # the hub's handlers submit through the engine
        feed = EventFeed(st)
        await feed.start()
        registry = await _open_registry(settings)
        await service.hub.start(jobs.engine, st, settings)
        service.running = Running(
            store=st, objects=obj, jobs=jobs, feed=feed, registry=registry, objects_url=obj.url
        )
        live = service.live
        if live is not None:
            await live.start(st)  # before the apps: it listens to their events
        sinks = []
        for live_app in service.apps.values():  # the apps' events join the feed like the jobs'
            sink = StoreEventSink(st, live_app.name, retention_days=settings.events_retention_days)
            sinks.append(sink)
            sink.attach(live_app)
            await live_app.start()
        reopening = None if obj.store is not None else asyncio.create_task(obj.keep_opening())
        days = settings.executions_retention_days
        stop_pruning = _PruneStop()
        pruning = (
            None
            if days is None
            else asyncio.create_task(_prune_executions(jobs, days, obj, settings, stop_pruning))
        )
        try:
            yield
        finally:
            if pruning is not None:
                await _stop_pruning(pruning, stop_pruning)
            await service.hub.close()
            for live_app in service.apps.values():
                await live_app.stop()
            for sink in sinks:
                await sink.aclose()
            if live is not None:
                await live.stop()
            if registry is not None:
                await registry.stop()
            await feed.stop()
            await jobs.close()
            if reopening is not None:
                reopening.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reopening
            if not isinstance(objects, ObjectAccess):
                obj.close()
            if store is None:
                st.close()
            service.running = None

    return lifespan


PRUNE_EVERY = 3600.0
"""Seconds between two prunes of old executions by the service (``executions_retention_days``)."""
PRUNE_STOP_WAIT = 30.0
"""Seconds the service's shutdown waits for a prune under way to end."""


class _PruneStop:
    """Set when the service stops: seen by the prune's loop (``wait``) and by its thread
    (``event``, :func:`delete_objects`'s ``stop``)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._wake = asyncio.Event()

    def set(self) -> None:
        self.event.set()
        self._wake.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    async def wait(self, seconds: float) -> None:
        """Until set, at most ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)


async def _stop_pruning(pruning: asyncio.Task[None], stop: _PruneStop) -> None:
    """Have the prune end (between two objects, :func:`delete_objects`) and wait for it, so
    its thread no longer uses the stores when they close; cancelled after
    :data:`PRUNE_STOP_WAIT` seconds (its recorded prefixes stay for the next prune)."""
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(pruning), PRUNE_STOP_WAIT)
    except TimeoutError:
        _log.warning("the prune under way did not end in %gs; stopped", PRUNE_STOP_WAIT)
        pruning.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pruning
    except Exception:  # its failure is logged by the prune
        pass


async def _prune_executions(
    jobs: JobClient, days: float, access: ObjectAccess, settings: Settings, stop: _PruneStop
) -> None:
    """Every :data:`PRUNE_EVERY` seconds, the first at start: delete the executions that
    finished more than ``days`` days ago in one of ``executions_retention_statuses``
    (:meth:`JobClient.prune`) and, with the template ``executions_retention_objects``, their
    objects after them (:func:`~framepipe.jobs.pruning.delete_objects`). With a
    template, a turn is skipped while the object store is away or refuses the template, so
    no execution's records go while its objects cannot. A failure is logged and tried again
    at the next turn. ``stop`` set (the service stops): the prune under way finishes its
    batch of records (a transaction of its own) and takes no other, and stops deleting
    objects before the next one; the prefixes it did not reach are recorded for the next
    prune."""
    while not stop.is_set():
        try:
            await _prune_once(jobs, days, access, settings, stop)
        except FramepipeError as exc:
            _log.warning("pruning old executions failed (%s); next try in an hour", exc)
        except Exception:  # a bug must not end pruning for good, nor break the shutdown
            _log.exception("pruning old executions failed; next try in an hour")
        await stop.wait(PRUNE_EVERY)


async def _prune_once(
    jobs: JobClient, days: float, access: ObjectAccess, settings: Settings, stop: _PruneStop
) -> None:
    template = settings.executions_retention_objects
    statuses = {ExecutionStatus(s) for s in settings.executions_retention_statuses}
    store = access.store
    if template is not None:
        if store is None:
            _log.warning(
                "old executions are not pruned this hour: %s is not open, and their objects "
                "(%s) would be left behind",
                access.describe(),
                template,
            )
            return
        try:
            await asyncio.to_thread(check_objects_prefix, store, template)
        except ValueError as exc:
            _log.warning(
                "old executions are not pruned: FRAMEPIPE_EXECUTIONS_RETENTION_OBJECTS %s", exc
            )
            return
    after = None if template is None or store is None else ObjectsAfter(store, template)
    pruned = await jobs.prune(days * 86_400.0, statuses=statuses, objects=after, stop=stop.event)
    if template is None or store is None:
        if pruned:
            _log.info("pruned %d execution(s) that finished over %g day(s) ago", len(pruned), days)
        return
    gone = await asyncio.to_thread(
        functools.partial(
            delete_objects, store, template, pruned, store=jobs.store, stop=stop.event
        )
    )
    if pruned or gone.deleted:
        _log.info(
            "pruned %d execution(s) that finished over %g day(s) ago, and %d object(s)",
            len(pruned),
            days,
            gone.deleted,
        )
    for left in gone.left:
        _log.warning("objects left under %s (tried again in an hour): %s", left.prefix, left.error)


def create_app(
    settings: Settings | None = None,
    *,
    pipelines: Sequence[Pipeline] = (),
    token: str | None = None,
    store: StateStore | None = None,
    objects: ObjectStore | ObjectAccess | None = None,
    apps: Sequence[App] = (),
    detector_hub: DetectorHub | None = None,
) -> FastAPI:
    """The service over ``settings``' state store and object store.

    ``pipelines`` may be submitted by name; ``token`` (default: setting ``api_token``; ``""``
    for none) is the bearer token. ``apps`` (live apps) run inside the service, which can
    then stop and start their sources; apps of other processes of this home are listed, not
    controlled.
    ``objects`` is the object store (default: setting ``objects_url``'s, opened at start or,
    when it cannot be, in the background while the service serves the rest; see
    :mod:`framepipe.server.object_access`).
    ``detector_hub`` serves host-side detectors at ``/ws/detector`` (default: a hub without
    handlers, which only tracks them; see :mod:`framepipe.server.detector`).
    Executions run in an engine inside the service process, or on workers when the settings
    say so (``jobs_mode``). The service's state is ``app.state.service`` (a
    :class:`~framepipe.server.state.ServiceState`)."""
    settings = settings or load_settings()
    token = token if token is not None else settings.api_token
    if token and (not token.strip() or not token.isascii() or not token.isprintable()):
        raise ValueError("the API token must be printable ASCII and not blank")
    known: dict[str, Pipeline] = {}
    for p in pipelines:
        p.validate()
        known[p.name] = p
    hub = detector_hub or DetectorHub()
    hosted = {a.name: a for a in apps}
    service = ServiceState(
        settings=settings,
        token=token,
        pipelines=known,
        apps=hosted,
        hub=hub,
        live=LiveHistory(hosted, settings),
        thumbnails=ThumbnailCache(),
    )

    app = FastAPI(
        title="framepipe",
        version=__version__,
        lifespan=_lifespan(service, store, objects),
        default_response_class=SafeJSONResponse,
        description="Executions of job pipelines, their steps and events.",
        # FastAPI's /docs and /redoc pages load their scripts from a CDN into the service's
        # own origin, where the dashboard keeps its token: the schema is served, the pages not
        docs_url=None,
        redoc_url=None,
    )
    app.state.service = service
    app.add_middleware(
        BrowserGuard,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
        max_json_bytes=settings.max_inputs_bytes + 64 * 1024,
        raw_bodies=_RAW_BODIES,
    )
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(events.socket_router)
    for router in _API_ROUTERS:
        app.include_router(router, prefix="/api", dependencies=[Depends(check_token)])
    service.boards = mount_app_panels(app, service.apps, check_token)
    mount_detector(app, hub, token, check_token)
    mount_dashboard(app)
    app.state.detector_hub = hub
    app.state.pipelines = known
    return app
