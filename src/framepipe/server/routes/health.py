"""``GET /health`` (no token) and ``GET /metrics`` (Prometheus text, behind the token)."""

import asyncio
import time

from framepipe import __version__
from framepipe.errors import MissingDependencyError
from framepipe.server.access import check_token
from framepipe.server.responses import SafeJSONResponse
from framepipe.server.state import Service

try:
    from fastapi import APIRouter, Depends
    from fastapi.responses import Response
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["router"]

router = APIRouter(tags=["health"])
"""``/health`` and ``/metrics``, at the root."""


_OBJECTS_AWAY = "unavailable (the server's log has the cause)"


@router.get("/health")
async def health(service: Service) -> Response:
    """Liveness, whether the state database can be read and written and whether the object
    store answers; needs no token. ``status`` is ``degraded`` when either fails. The state
    database failing is a 503 with the reason (nothing can be served without it); the object
    store is reported as ``unavailable`` with a 200 (the routes that do not need it are
    served; its cause, which may show endpoints or paths, is logged only)."""
    problem = await asyncio.to_thread(service.store.check_writable)
    objects_problem = await asyncio.to_thread(service.object_access.check)
    database = "ok" if problem is None else service.public(problem)
    started = service.running.started if service.running is not None else time.time()
    body = {
        "status": "ok" if problem is None and objects_problem is None else "degraded",
        "database": database,
        "objects": "ok" if objects_problem is None else _OBJECTS_AWAY,
        "version": __version__,
        "uptime": time.time() - started,
        "jobs": "workers" if service.settings.distributed_jobs else "local",
    }
    return SafeJSONResponse(body, status_code=200 if problem is None else 503)


@router.get(
    "/metrics",
    dependencies=[Depends(check_token)],
    responses={200: {"content": {"text/plain": {}}}},
)
async def metrics(service: Service) -> Response:
    """Prometheus text: executions and steps by status, step run times, failures and
    crashes, workers, the job broker's backlog, and the live pipelines of the apps served
    here (per stage fps, latency, queue depth, drops; per source restarts) and their event
    sinks (written, dropped, pending). A URL in a label is shown with its secrets masked
    (:mod:`framepipe.server.public`)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from framepipe.server.metrics import jobs_registry
    from framepipe.telemetry import event_sink_metrics

    registry = service.metrics
    if registry is None:
        apps = service.apps
        registry = service.metrics = jobs_registry(
            service.store,
            service.settings,
            lambda: [p for a in apps.values() for p in a.pipelines.values()],
            lambda: [s for a in apps.values() for s in event_sink_metrics(a.registry).sinks],
        )
    body = await asyncio.to_thread(generate_latest, registry)
    # every label value is masked where it is made (framepipe.telemetry.label_value)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
