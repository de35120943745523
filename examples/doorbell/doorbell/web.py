"""The doorbell's web interface, hosted by ``framepipe serve``.

:func:`hosted_app` builds the doorbell (an :class:`~doorbell.manager.OrchestratorManager` and
its orchestrator) around a :class:`DoorbellApp`: the framepipe App that ``framepipe serve
--app`` starts and stops on the service's own event loop. Its ``start()`` does what
``manager.start()`` does (loads the models and the known faces, builds the pipeline, starts
it, the health checks, the metrics collection and the log file); ``stop()`` drains like
``manager.stop()``. The service commits its events (``visitor.known``, ``visitor.unknown``,
``doorbell.pressed``, ...) to its event log, where ``/api/events``, the WebSocket and the
dashboard's recent events see them.

The dashboard gets four panels (framepipe's application panels,
:mod:`framepipe.server.panels`): the visitor events with their snapshots, the latest
snapshots, the known faces (the names from the known-faces folder, and the images that were
not usable) and the health (:class:`~doorbell.manager.HealthStatus`: state, performance score
and reason, restart attempts). Snapshots are read from the doorbell's own object store at
``/api/apps/doorbell/objects/{snapshot_key}`` (a key with ``..`` or a symlink out of the
store is refused).

The JSON routes of the original system's web interface are under ``/api/apps/doorbell/``,
behind the service's token: ``GET status`` (the legacy ``get_system_status()``),
``GET recent-events`` (``get_recent_captures()``, with ``image_url`` instead of a file path),
``GET faces/known`` (``names``, ``count``), ``POST faces/reload`` (``reload_known_faces()``:
the folder encoded again, answering ``names``, ``count`` and the ``rejected`` files, each by its
file name and why), ``POST trigger-doorbell`` (``trigger_doorbell()``) and ``GET health``
(``get_health_status()``). ``kill -HUP`` of the service reloads the known faces too (as for
``run.py``), where the service runs its loop in its main thread (``framepipe serve`` does).
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from doorbell.known_faces import Reloader
from doorbell.manager import HealthStatus, OrchestratorManager
from doorbell.orchestrator import PIPELINE, PipelineOrchestrator
from framepipe.app import App
from framepipe.config import Settings
from framepipe.server.panels import AppDashboard, Panel, PanelKind

try:
    from fastapi import APIRouter, Query
except ModuleNotFoundError as exc:  # pragma: no cover - the server extra
    from framepipe.errors import MissingDependencyError

    raise MissingDependencyError(exc.name or "fastapi", "server", "the doorbell's web") from exc

__all__ = ["PANELS", "DoorbellApp", "hosted_app"]

VISITOR_EVENTS = ("visitor.known", "visitor.unknown", "doorbell.pressed")

PANELS = (
    Panel("events", "Doorbell events", PanelKind.EVENTS, "panels/events", VISITOR_EVENTS, 10.0),
    Panel("snapshots", "Snapshots", PanelKind.IMAGES, "panels/snapshots", VISITOR_EVENTS, 10.0),
    Panel(
        "known-faces",
        "Known faces",
        PanelKind.NAMES,
        "panels/known-faces",
        ("known_face.rejected",),
        30.0,
    ),
    Panel(
        "health",
        "Doorbell health",
        PanelKind.STATUS,
        "panels/health",
        ("system_error", "performance_warning", "pipeline.recovered", "component.crashed"),
        3.0,
    ),
)
"""What the doorbell adds to ``framepipe serve``'s dashboard."""


class DoorbellApp(App):
    """The orchestrator's App when ``framepipe serve`` hosts the doorbell (see the module
    docstring); made by :func:`hosted_app`."""

    def __init__(self, orchestrator: PipelineOrchestrator, name: str, **options: Any) -> None:
        super().__init__(name, **options)
        self.orchestrator = orchestrator
        self.manager: OrchestratorManager | None = None
        self._reloader: Reloader | None = None

    def _listen_for_sighup(self) -> None:
        """SIGHUP reloads the known faces, as it does for ``run.py`` (it ended the service at
        once, without a stop: the open visit lost). Only where the loop runs in the main thread
        of a system that has SIGHUP (``framepipe serve``'s); elsewhere nothing changes."""
        if (
            not hasattr(signal, "SIGHUP")
            or threading.current_thread() is not threading.main_thread()
        ):
            return
        reloader = Reloader(self.orchestrator.reload_known_faces)
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, reloader.wanted.set)
        except (NotImplementedError, RuntimeError, ValueError):
            return
        reloader.start()
        self._reloader = reloader

    async def _stop_listening(self) -> None:
        reloader, self._reloader = self._reloader, None
        if reloader is not None:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            await asyncio.get_running_loop().run_in_executor(None, reloader.stop)

    async def start(self) -> None:
        """Load the models and known faces, build the pipeline, start it, then the health
        checks, the metrics collection and the log file."""
        if self.state.value != "stopped":
            raise RuntimeError(f"app {self.name!r} is {self.state.value}")
        manager = self.manager
        if manager is not None:
            manager.open_log()
        await self.orchestrator.prepare()
        await super().start()
        if manager is not None:
            manager.start_monitoring()
        self._listen_for_sighup()

    async def stop(self, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Stop the health checks, the pipeline (queued frames drain, the open visit closes),
        wait for the events being stored, close the log file."""
        await self._stop_listening()
        if self.manager is not None:
            await self.manager.stop_monitoring()
        await super().stop(timeout)
        await self.orchestrator.drain_notifications()
        if self.manager is not None:
            self.manager.close_log()

    def dashboard(self) -> AppDashboard:
        """The panels, routes and snapshots the doorbell adds to the service."""
        assert self.manager is not None, "made by hosted_app()"
        return AppDashboard(
            panels=PANELS,
            router=_router(self.manager, self.name),
            objects=lambda: self.orchestrator.objects,
        )


class _HostedOrchestrator(PipelineOrchestrator):
    def make_app(self) -> App:
        config = self.config
        return DoorbellApp(
            self,
            PIPELINE,
            settings=self.settings,
            auto_recovery=config.auto_recovery_enabled,
            max_restart_attempts=config.max_restart_attempts,
            restart_cooldown=config.restart_cooldown_seconds,
            health_interval=config.health_check_interval,
            performance_threshold=0.0,  # the doorbell judges performance itself
        )


def hosted_app(
    config: Mapping[str, Any] | None = None, *, settings: Settings | None = None
) -> DoorbellApp:
    """The doorbell configured by ``config`` (over the environment and the defaults, as
    ``OrchestratorManager(config)``), as an App for ``framepipe serve --app``. Its manager is
    ``app.manager`` (health, metrics, the legacy interface); do not also ``start()`` it."""
    manager = OrchestratorManager(config, settings=settings, orchestrator_class=_HostedOrchestrator)
    app = manager.orchestrator.app
    assert isinstance(app, DoorbellApp)
    app.manager = manager
    return app


# -- the routes ----------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _visitor_text(event: Mapping[str, Any]) -> str:
    if event["type"] == "doorbell.pressed":
        if not event.get("success", True):
            return f"pressed: {event.get('error')}"
        return f"pressed: {event.get('faces_detected', 0)} face(s) in view"
    who = event.get("name") if event.get("known") else "unknown visitor"
    parts = [str(who)]
    if event.get("distance") is not None:
        parts.append(f"distance {event['distance']:.3f}")
    if event.get("frames"):
        parts.append(f"{event['frames']} frames")
    parts.append("at the door" if event.get("trigger") == "visit" else "rang the bell")
    return ", ".join(parts)


def _health_fields(health: HealthStatus) -> list[dict[str, Any]]:
    return [
        {"label": "performance score", "value": health.performance_score},
        {"label": "performance", "value": health.performance_reason or "keeping up"},
        {
            "label": "restart attempts",
            "value": f"{health.restart_attempts} of {health.max_restart_attempts}",
        },
        {"label": "uptime", "value": f"{health.uptime:.0f} s"},
        {"label": "last error", "value": health.last_error},
        {"label": "known faces", "value": len(health.known_faces)},
        {"label": "CPU", "value": None if health.cpu_percent is None else f"{health.cpu_percent}%"},
        {
            "label": "memory",
            "value": None if health.memory_percent is None else f"{health.memory_percent}%",
        },
        {"label": "issues", "value": "; ".join(health.issues) or None},
    ]


def _router(manager: OrchestratorManager, app_name: str) -> APIRouter:
    """The doorbell's routes, under ``/api/apps/{app_name}/``: the panels' and the original
    web interface's. Each reads the orchestrator's state on the service's event loop, where the
    orchestrator runs."""
    router = APIRouter()
    _panel_routes(router, manager)
    _web_routes(router, manager, app_name)
    return router


def _visitor_events(orch: PipelineOrchestrator) -> list[dict[str, Any]]:
    """The visitor events and doorbell presses in memory, newest first."""
    return [e for e in reversed(list(orch.events)) if e.get("type") in VISITOR_EVENTS]


def _panel_routes(router: APIRouter, manager: OrchestratorManager) -> None:
    orch = manager.orchestrator

    @router.get("/panels/events")
    async def panel_events(limit: int = Query(50, ge=1, le=500)) -> list[dict[str, Any]]:
        return [
            {
                "ts": e.get("ts"),
                "type": e["type"],
                "text": _visitor_text(e),
                "image": e.get("snapshot_key"),
            }
            for e in _visitor_events(orch)[:limit]
        ]

    @router.get("/panels/snapshots")
    async def panel_snapshots(limit: int = Query(12, ge=1, le=100)) -> list[dict[str, Any]]:
        seen: set[str] = set()
        out = []
        for e in _visitor_events(orch):
            key = e.get("snapshot_key")
            if not key or key in seen:
                continue
            seen.add(key)
            who = e.get("name") or e.get("visitor") or "unknown"
            out.append({"key": key, "caption": str(who), "ts": e.get("ts")})
            if len(out) >= limit:
                break
        return out

    @router.get("/panels/known-faces")
    async def panel_known_faces() -> list[dict[str, Any]]:
        known = orch.known
        rows: list[dict[str, Any]] = [{"name": name, "text": None} for name in known.names]
        rows += [
            {"name": Path(str(r.source)).stem, "text": f"not used: {r.reason}"}
            for r in known.rejected
        ]
        return rows

    @router.get("/panels/health")
    async def panel_health() -> dict[str, Any]:
        health = manager.get_health_status()
        return {"state": health.state.value, "fields": _health_fields(health)}


def _web_routes(router: APIRouter, manager: OrchestratorManager, app_name: str) -> None:
    """The original web interface's routes."""
    orch = manager.orchestrator

    def image_url(key: str | None) -> str | None:
        return f"/api/apps/{app_name}/objects/{key}" if key else None

    @router.get("/health")
    async def health() -> dict[str, Any]:
        """``get_health_status()`` as JSON."""
        return manager.get_health_status().to_dict()

    @router.get("/status")
    async def status() -> dict[str, Any]:
        """The legacy ``get_system_status()``, with ``status`` and ``timestamp``."""
        system = manager.get_legacy_interface().get_system_status()
        return {"status": "online", "timestamp": _now(), **system}

    @router.get("/recent-events")
    async def recent_events(limit: int = Query(20, ge=1, le=500)) -> dict[str, Any]:
        """The latest visitor events, newest first (``get_recent_captures``), each with the
        ``image_url`` of its snapshot."""
        captures = manager.get_legacy_interface().get_recent_captures(limit)
        for capture in captures:
            capture.pop("image_path", None)  # a path on the server: not for its clients
            capture["image_url"] = image_url(capture.get("snapshot_key"))
        return {"status": "success", "events": captures}

    @router.get("/faces/known")
    async def known_faces() -> dict[str, Any]:
        """The known names."""
        names = orch.known.names
        return {"status": "success", "count": len(names), "names": names}

    @router.post("/faces/reload")
    async def reload_known_faces() -> dict[str, Any]:
        """Encode the known-faces folder again (in a worker thread: seconds of dlib); the
        pipeline uses the new faces from its next frame. Rejected files are named by their
        file name only (no path of the server)."""
        known = await asyncio.get_running_loop().run_in_executor(None, orch.reload_known_faces)
        return {
            "status": "success",
            "count": len(known.names),
            "names": known.names,
            "rejected": [{"file": Path(r.source).name, "error": r.reason} for r in known.rejected],
        }

    @router.post("/trigger-doorbell")
    async def trigger_doorbell(channel: int | None = None) -> dict[str, Any]:
        """Ring the doorbell: recognise whoever is in the camera's latest frame."""
        result = await orch.trigger(channel)
        return {
            "status": "success" if result.get("success") else "error",
            "message": "Doorbell triggered" if result.get("success") else result.get("error"),
            "timestamp": _now(),
            "result": {**result, "image_url": image_url(result.get("snapshot_key"))},
        }
