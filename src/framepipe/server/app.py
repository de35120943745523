"""The FastAPI application: executions, pipelines, events and objects over REST, live events
over a WebSocket, health without a token.

Guarantees:

* before any route runs, :class:`~framepipe.server.browser_guard.BrowserGuard` refuses a foreign
  ``Host`` (DNS rebinding), a foreign ``Origin`` (another site's page, also on WebSockets) and
  a tokenless ``POST`` that is not JSON, with or without a token configured;
* every route but ``/health``, the dashboard's page and files and the API's schema and docs
  (``/openapi.json``, ``/docs``, ``/redoc``: the same for every installation) needs
  ``Authorization: Bearer <token>`` when a token is set (a WebSocket presents it as a
  subprotocol, a header, or ``?token=``, see :mod:`framepipe.server.guard`); a wrong or
  missing one is a 401 (WebSocket close code 1008) before anything is read or written;
* bad input is a 4xx whose ``detail`` says what is wrong and never shows the server's paths
  (unknown pipeline 404, invalid body or inputs 422 naming the field, a state that forbids the
  call 409, a key escaping the store 400, inputs or an upload over the limit 413), and nothing
  is half-created: an execution exists only once it was committed, an object only once its
  upload arrived whole; a state database that fails is a 503 naming the cause;
* no stored value can make a response fail: text that cannot be encoded (a lone surrogate
  stored by an older version) is sent as its JSON escape; listings carry no inputs;
* a WebSocket subscriber gets the current state first (``snapshot``), then every event
  committed after it, in order (the jobs' events, and those of the live apps served here:
  segments, sources, pipelines); one that falls too far behind is told so (``lagged``) and
  closed, to reconnect. A step's progress or completion, and an execution's completion, are
  also summed up as ``pipeline:progress`` (step and execution progress; the execution's never
  decreases within one socket);
* host-side detectors (the SD-card import) connect to ``/ws/detector``
  (:mod:`framepipe.server.detector`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

from framepipe import __version__
from framepipe.app import App, preview_dir, read_snapshots
from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.objects.base import validate_key
from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import (
    ExecutionNotFoundError,
    ExecutionStateError,
    FramepipeError,
    InputTooLargeError,
    InvalidInputError,
    InvalidKeyError,
    MissingDependencyError,
    ObjectNotFoundError,
    PipelineDefinitionError,
    StateStoreError,
)
from framepipe.event_sinks import StoreEventSink
from framepipe.events import Event
from framepipe.jobs.client import ExecutionSummary, JobClient
from framepipe.jobs.pipeline import Pipeline
from framepipe.logs import get_logger
from framepipe.redis import is_redis_url
from framepipe.server.browser_guard import BrowserGuard
from framepipe.server.dashboard import mount_dashboard
from framepipe.server.detector import DetectorHub, mount_detector
from framepipe.server.feed import EventFeed
from framepipe.server.guard import (
    admit_websocket,
    bearer_token,
    hide_tokens_in_access_log,
    token_matches,
)
from framepipe.untrusted import dumps

try:
    from fastapi import (
        APIRouter,
        Depends,
        FastAPI,
        HTTPException,
        Query,
        Request,
        WebSocket,
        WebSocketDisconnect,
    )
    from fastapi import (
        Path as Path_,
    )
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import BaseModel, ConfigDict, Field
    from sqlalchemy.exc import SQLAlchemyError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["create_app"]

_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$"  # an app or pipeline name; never '..'

_log = get_logger("server")


async def _open_registry(settings: Settings) -> Any:
    """A processor registry on the broker's Redis, or None (no Redis broker, or down)."""
    if not is_redis_url(settings.broker_url):
        return None
    try:
        from framepipe.processors.registry import ProcessorRegistry

        registry = ProcessorRegistry(settings.broker_url, f"{settings.broker_namespace}:",
                                     connect_retries=0)
        await registry.start()
    except Exception as exc:
        _log.warning("processors are not listed: the registry on %s did not start (%s)",
                     settings.broker_url, exc)
        return None
    return registry


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate stored before it was refused at the
    boundary is sent as its ``\\uXXXX`` escape instead of failing the whole response."""

    def render(self, content: Any) -> bytes:
        return dumps(content).encode("utf-8")


class SubmitBody(BaseModel):
    """``POST /api/executions``."""

    model_config = ConfigDict(extra="forbid")
    pipeline: str = Field(min_length=1, max_length=200, description="A registered pipeline.")
    inputs: dict[str, Any] = Field(default_factory=dict, description="The execution's inputs.")


class Submitted(BaseModel):
    """The created execution."""

    id: str
    pipeline: str
    status: str


def _summaries(rows: Sequence[ExecutionSummary]) -> list[dict[str, Any]]:
    """A listing as the API shows it (read without inputs: each carries no inputs, steps or
    data, so its size does not depend on what clients submitted)."""
    return [row.to_dict() for row in rows]


def _pipeline_progress(event: Event) -> dict[str, Any]:
    """The seed's ``pipeline:progress`` message: a step's progress and its execution's
    (``progress``, never decreasing within one WebSocket: the sender keeps the highest)."""
    data = event.data
    if event.type == "execution.completed":
        return {"type": "pipeline:progress", "execution_id": event.execution_id,
                "step_key": None, "step_progress": None, "progress": data.get("progress"),
                "message": "completed"}
    return {"type": "pipeline:progress", "execution_id": event.execution_id,
            "step_key": event.step_key,
            "step_progress": 100.0 if event.type == "step.completed" else data.get("progress"),
            "progress": data.get("execution_progress"), "message": data.get("message")}


def create_app(settings: Settings | None = None, *, pipelines: Sequence[Pipeline] = (),
               token: str | None = None, store: StateStore | None = None,
               objects: ObjectStore | None = None, apps: Sequence[App] = (),
               detector_hub: DetectorHub | None = None) -> FastAPI:
    """The service over ``settings``' state store and object store.

    ``pipelines`` may be submitted by name; ``token`` (default: setting ``api_token``; ``""``
    for none) is the bearer token. ``apps`` (live apps) run inside the service, which can
    then stop and start their sources; apps of other processes of this home are listed, not
    controlled.
    ``detector_hub`` serves host-side detectors at ``/ws/detector`` (default: a hub without
    handlers, which only tracks them; see :mod:`framepipe.server.detector`).
    Executions run in an engine inside the service process, or on workers when the settings
    say so (``jobs_mode``)."""
    settings = settings or load_settings()
    token = token if token is not None else settings.api_token
    if token and (not token.strip() or not token.isascii() or not token.isprintable()):
        raise ValueError("the API token must be printable ASCII and not blank")
    known: dict[str, Pipeline] = {}
    for p in pipelines:
        p.validate()
        known[p.name] = p
    state: dict[str, Any] = {}
    hosted = {a.name: a for a in apps}
    hub = detector_hub or DetectorHub()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        hide_tokens_in_access_log()
        own_store = store is None
        st = store or StateStore(settings.resolved_database_url,
                                 sqlite_synchronous=settings.sqlite_synchronous)
        obj = objects or open_object_store(settings.resolved_objects_url)
        jobs = JobClient(st, settings=settings, objects=obj, pipelines=known.values())
        await jobs.start(engine=True)  # the hub's handlers submit through the engine
        feed = EventFeed(st)
        await feed.start()
        registry = await _open_registry(settings)
        await hub.start(jobs.engine, st, settings)
        state.update(store=st, objects=obj, jobs=jobs, engine=jobs.engine, feed=feed,
                     started=time.time(), registry=registry, objects_url=obj.url)
        sinks = []
        for live_app in hosted.values():  # the apps' events join the feed like the jobs'
            sink = StoreEventSink(st, live_app.name,
                                  retention_days=settings.events_retention_days)
            sinks.append(sink)
            live_app.on("*", sink)
            await live_app.start()
        try:
            yield
        finally:
            await hub.close()
            for live_app in hosted.values():
                await live_app.stop()
            for sink in sinks:
                await sink.aclose()
            if registry is not None:
                await registry.stop()
            await feed.stop()
            await jobs.close()
            if objects is None:
                obj.close()
            if own_store:
                st.close()

    app = FastAPI(title="framepipe", version=__version__, lifespan=lifespan,
                  default_response_class=SafeJSONResponse,
                  description="Executions of job pipelines, their steps and events.")
    app.add_middleware(BrowserGuard, allowed_hosts=settings.allowed_hosts,
                       allowed_origins=settings.allowed_origins,
                       max_json_bytes=settings.max_inputs_bytes + 64 * 1024)

    def check_token(request: Request) -> None:
        if not token:
            return
        if not token_matches(bearer_token(request.headers.get("authorization")), token):
            raise HTTPException(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                                headers={"WWW-Authenticate": "Bearer"})

    api = APIRouter(prefix="/api", dependencies=[Depends(check_token)])

    def public(text: str) -> str:
        """``text`` without the server's own paths (its home and object store)."""
        for private, shown in ((state.get("objects_url"), "the object store"),
                               (str(settings.home.resolve()), "<home>")):
            if private:
                text = text.replace(private, shown)
        return text

    @app.exception_handler(FramepipeError)
    async def _framepipe_error(_request: Request, exc: FramepipeError) -> JSONResponse:
        status = 400
        if isinstance(exc, ObjectNotFoundError) and exc.key is not None:
            return SafeJSONResponse({"detail": f"no object {exc.key!r}"}, status_code=404)
        if isinstance(exc, ExecutionNotFoundError):
            status = 404
        elif isinstance(exc, ExecutionStateError):
            status = 409
        elif isinstance(exc, InputTooLargeError):
            status = 413
        elif isinstance(exc, (PipelineDefinitionError, InvalidInputError)):
            status = 422
        elif isinstance(exc, InvalidKeyError):
            status = 400
        elif isinstance(exc, StateStoreError):
            _log.error("state database error: %s", exc)
            status = 503
        return SafeJSONResponse({"detail": public(str(exc))}, status_code=status)

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(_request: Request, exc: SQLAlchemyError) -> JSONResponse:
        _log.error("state database error: %s", exc)
        reason = str(getattr(exc, "orig", None) or type(exc).__name__)
        return SafeJSONResponse({"detail": public(f"the state database failed: {reason}")},
                                status_code=503)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (204, 304):
            return Response(status_code=exc.status_code, headers=exc.headers)
        return SafeJSONResponse({"detail": exc.detail}, status_code=exc.status_code,
                                headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Not the input itself: it can be megabytes (and it is the client's own).
        errors = [{k: v for k, v in err.items() if k in ("type", "loc", "msg")}
                  for err in exc.errors()]
        return SafeJSONResponse({"detail": errors}, status_code=422)

    def _store() -> StateStore:
        return state["store"]  # type: ignore[no-any-return]

    def _jobs() -> JobClient:
        return state["jobs"]  # type: ignore[no-any-return]

    # -- health ------------------------------------------------------------------------------

    @app.get("/health", tags=["health"])
    async def health() -> Response:
        """Liveness and whether the state database can be read and written; needs no token.
        503 (``status: degraded``) when it cannot, with the reason."""
        problem = await asyncio.to_thread(_store().check_writable)
        database = "ok" if problem is None else public(problem)
        body = {"status": "ok" if problem is None else "degraded", "database": database,
                "version": __version__,
                "uptime": time.time() - state.get("started", time.time()),
                "jobs": "workers" if settings.distributed_jobs else "local"}
        return SafeJSONResponse(body, status_code=200 if problem is None else 503)

    # -- pipelines and executions ----------------------------------------------------------

    @api.get("/pipelines", tags=["pipelines"])
    async def pipelines_list() -> list[dict[str, Any]]:
        """The pipelines this service may start."""
        return [{"name": p.name, "ref": p.ref, "description": p.description,
                 "steps": [{"name": s.name, "depends_on": list(s.depends_on),
                            "params": list(s.params), "retries": s.retries, "weight": s.weight}
                           for s in p.steps.values()]} for p in known.values()]

    @api.post("/executions", status_code=201, tags=["executions"])
    async def executions_submit(body: SubmitBody) -> Submitted:
        """Start an execution of a registered pipeline."""
        pipeline = known.get(body.pipeline)
        if pipeline is None:
            raise HTTPException(404, f"unknown pipeline {body.pipeline!r} (known: "
                                     f"{', '.join(sorted(known)) or 'none'})")
        execution_id = await _jobs().submit(pipeline, body.inputs,
                                            input_roots=settings.input_roots)
        return Submitted(id=execution_id, pipeline=pipeline.name, status="running")

    @api.get("/executions", tags=["executions"])
    async def executions_list(
            limit: Annotated[int, Query(ge=1, le=500)] = 50,
            status: Annotated[list[str] | None, Query()] = None,
            pipeline: Annotated[str | None, Query(max_length=200)] = None,
    ) -> list[dict[str, Any]]:
        """Newest executions first, each with its completed and total step counts (without
        inputs, steps or data: ``GET /api/executions/{id}`` has them)."""
        return _summaries(await _jobs().list(status=status, pipeline=pipeline, limit=limit))

    @api.get("/executions/{execution_id}", tags=["executions"])
    async def executions_show(execution_id: str) -> dict[str, Any]:
        """An execution (id or unique prefix) with its steps and data."""
        return (await _jobs().get(execution_id)).to_dict()

    @api.post("/executions/{execution_id}/retry", status_code=202, tags=["executions"])
    async def executions_retry(execution_id: str) -> dict[str, Any]:
        """Resume a failed, cancelled or interrupted execution from where it stopped."""
        info = await _jobs().get(execution_id, with_steps=False)
        pipeline = known.get(info.pipeline)
        if pipeline is None:
            raise HTTPException(409, f"execution {info.id[:12]} is of pipeline "
                                     f"'{info.pipeline}', which this service does not know")
        full_id = await _jobs().retry(info.id, pipeline)
        return {"id": full_id, "status": "running"}

    @api.post("/executions/{execution_id}/cancel", status_code=202, tags=["executions"])
    async def executions_cancel(execution_id: str) -> dict[str, Any]:
        """Cancel an execution (at once, or through the process running it)."""
        result = await _jobs().cancel(execution_id)
        return {"id": result.execution_id, "status": "cancelling"}

    # -- events ---------------------------------------------------------------------------

    @api.get("/events", tags=["events"])
    async def events_page(
            execution_id: Annotated[str | None, Query(max_length=64)] = None,
            after: Annotated[int, Query(ge=0, le=2**62)] = 0,
            limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> dict[str, Any]:
        """Stored events after id ``after``, oldest first; ``next`` is the id to pass next."""
        page = await _jobs().events(execution_id, after=after, limit=limit)
        return page.to_dict()

    @app.websocket("/ws")
    async def live(websocket: WebSocket, execution_id: str | None = None,
                   token_param: Annotated[str | None, Query(alias="token")] = None) -> None:
        """The current state, then every event as it is committed."""
        if not await admit_websocket(websocket, token):
            return
        feed: EventFeed = state["feed"]
        async with feed.subscribe(execution_id) as stream:
            after = feed.last_id
            try:
                if execution_id is not None:
                    info = await _jobs().get(execution_id)
                    snapshot: Any = {"execution": info.to_dict()}
                else:
                    snapshot = {"executions": _summaries(await _jobs().list(limit=50))}
            except ExecutionNotFoundError as exc:
                await websocket.send_text(dumps({"type": "error", "detail": str(exc)}))
                await websocket.close(code=1008)
                return
            await websocket.send_text(dumps({"type": "snapshot", "after": after, **snapshot}))

            async def forward() -> None:
                # Coalesced progress events of one commit may carry execution progress out of
                # order; the highest seen so far is what a browser should show.
                highest: dict[str | None, float] = {}
                async for event in stream:
                    if event is None:
                        await websocket.send_text(dumps({"type": "lagged"}))
                        return
                    await websocket.send_text(dumps({"type": "event", "event": event.to_dict()}))
                    if event.type in ("step.progress", "step.completed", "execution.completed"):
                        message = _pipeline_progress(event)
                        if message["progress"] is not None:
                            message["progress"] = highest[event.execution_id] = max(
                                float(message["progress"]),
                                highest.get(event.execution_id, 0.0))
                        await websocket.send_text(dumps(message))

            async def until_closed() -> None:
                # The client sends nothing; this returns when it goes away (or the server
                # shuts down), so an idle subscription never holds the server up.
                with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                    while True:
                        message = await websocket.receive()
                        if message["type"] == "websocket.disconnect":
                            return

            sender = asyncio.create_task(forward())
            watcher = asyncio.create_task(until_closed())
            try:
                await asyncio.wait([sender, watcher], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sender, watcher):
                    task.cancel()
                for task in (sender, watcher):
                    with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect,
                                             RuntimeError):
                        await task
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close()

    # -- metrics -----------------------------------------------------------------------------

    @app.get("/metrics", tags=["health"], dependencies=[Depends(check_token)],
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus text: executions and steps by status, step run times, failures and
        crashes, workers, the job broker's backlog, and the live pipelines of the apps served
        here (per stage fps, latency, queue depth, drops; per source restarts)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        from framepipe.server.metrics import jobs_registry

        registry = state.get("metrics")
        if registry is None:
            registry = state["metrics"] = jobs_registry(
                _store(), settings,
                lambda: [p for a in hosted.values() for p in a.pipelines.values()])
        body = await asyncio.to_thread(generate_latest, registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- sources and processors -------------------------------------------------------------

    @api.get("/sources", tags=["sources"])
    async def sources_list() -> list[dict[str, Any]]:
        """Sources of the live apps of this home (from their health snapshots)."""
        snapshots = await asyncio.to_thread(read_snapshots, settings)
        out = []
        for snap in snapshots:
            for name, status in snap.get("pipeline_status", {}).items():
                src = status.get("source") or {}
                uptime = src.get("uptime") or 0.0
                has_frame = (preview_dir(settings, snap["name"]) / f"{name}.jpg").is_file()
                out.append({
                    "app": snap["name"], "pipeline": name,
                    "source": status.get("source_description", ""),
                    "state": "dead" if snap["state"] == "dead" else status.get("state"),
                    "fps": (src.get("frames", 0) / uptime) if uptime else None,
                    "frames": status.get("frames_captured", 0),
                    "restarts": src.get("restarts", 0), "last_error": status.get("last_error"),
                    "frame_url": f"/api/sources/{snap['name']}/{name}/frame" if has_frame
                    else None})
        return out

    @api.get("/sources/{app_name}/{pipeline}/frame", tags=["sources"],
             responses={200: {"content": {"image/jpeg": {}}}})
    async def sources_frame(
            app_name: Annotated[str, Path_(pattern=_NAME)],
            pipeline: Annotated[str, Path_(pattern=_NAME)]) -> Response:
        """The latest frame of a source, as a JPEG (at most 640 pixels wide)."""
        path = preview_dir(settings, app_name) / f"{pipeline}.jpg"
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            raise HTTPException(404, f"no frame of {app_name}/{pipeline} yet") from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    async def _control(app_name: str, pipeline: str, start: bool) -> dict[str, Any]:
        live_app = hosted.get(app_name)
        if live_app is None:
            known_apps = {snap["name"] for snap in await asyncio.to_thread(read_snapshots,
                                                                           settings)}
            if app_name in known_apps:
                raise HTTPException(409, f"app {app_name!r} runs in another process; only "
                                         "apps served by this service can be controlled")
            raise HTTPException(404, f"no app {app_name!r}")
        if pipeline not in live_app.pipelines:
            raise HTTPException(404, f"app {app_name!r} has no pipeline {pipeline!r} "
                                     f"(it has: {', '.join(live_app.pipelines)})")
        if start:
            await live_app.resume(pipeline)
        else:
            await live_app.pause(pipeline)
        return {"app": app_name, "pipeline": pipeline,
                "state": live_app.health().pipeline_status[pipeline]["state"]}

    @api.post("/sources/{app_name}/{pipeline}/stop", status_code=202, tags=["sources"])
    async def sources_stop(app_name: Annotated[str, Path_(pattern=_NAME)],
                           pipeline: Annotated[str, Path_(pattern=_NAME)]) -> dict[str, Any]:
        """Stop a source of an app served here (kept, not recovered, until started)."""
        return await _control(app_name, pipeline, start=False)

    @api.post("/sources/{app_name}/{pipeline}/start", status_code=202, tags=["sources"])
    async def sources_start(app_name: Annotated[str, Path_(pattern=_NAME)],
                            pipeline: Annotated[str, Path_(pattern=_NAME)]) -> dict[str, Any]:
        """Start a stopped source of an app served here again."""
        return await _control(app_name, pipeline, start=True)

    @api.get("/processors", tags=["processors"])
    async def processors_list() -> list[dict[str, Any]]:
        """Processors registered on the broker's Redis, with capacity and health."""
        registry = state.get("registry")
        if registry is None:
            return []
        return [p.to_dict() | {"healthy": p.state == "ready" and p.circuit == "closed"}
                for p in registry.processors(include_departed=False)]

    # -- objects ------------------------------------------------------------------------------

    @api.put("/objects/{key:path}", status_code=201, tags=["objects"])
    async def objects_put(key: str, request: Request) -> dict[str, Any]:
        """Store the request body under ``key`` (at most ``max_upload_bytes``). The body is
        streamed to a temporary file, never held in memory, and stored only once complete:
        an upload cut short or over the limit stores nothing."""
        limit = settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"upload of {declared} bytes is over the limit of {limit} "
                                     "(FRAMEPIPE_MAX_UPLOAD_BYTES)")
        obj: ObjectStore = state["objects"]
        validate_key(key)
        fd, tmp = tempfile.mkstemp(prefix="framepipe-upload-")
        try:
            with os.fdopen(fd, "wb") as file:
                size = 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise HTTPException(413, f"upload is over the limit of {limit} bytes "
                                                 "(FRAMEPIPE_MAX_UPLOAD_BYTES)")
                    file.write(chunk)
            info = await asyncio.to_thread(obj.put_file, key, tmp)
        finally:
            os.unlink(tmp)
        return {"key": info.key, "size": info.size}

    @api.get("/objects/{key:path}", tags=["objects"])
    async def objects_get(key: str) -> Response:
        """The object stored under ``key``."""
        obj: ObjectStore = state["objects"]
        data = await asyncio.to_thread(obj.get, key)
        return Response(data, media_type="application/octet-stream")

    app.include_router(api)
    mount_detector(app, hub, token, check_token)
    mount_dashboard(app)
    app.state.detector_hub = hub
    app.state.framepipe = state
    app.state.pipelines = known
    return app
