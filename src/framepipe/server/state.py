"""What the service's routes share: :class:`ServiceState`, stored on ``app.state.service`` by
``create_app`` and reached through the :data:`Service` dependency (the token check is
:mod:`framepipe.server.access`'s).

Guarantees: the configuration part (settings, token, pipelines, hosted apps, detector hub) is
fixed when the app is made; the running part (stores, job client, feed, registry) exists only
between the start and the end of the app's lifespan, and a route that needs it outside that
span fails instead of acting on something closed. A route that needs the object store while
it cannot be opened answers 503 (:data:`OBJECTS_AWAY`); the others are served.
"""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated
from urllib.parse import unquote, urlsplit

from framepipe.app import App
from framepipe.backends.objects import ObjectStore
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.errors import MissingDependencyError
from framepipe.jobs.client import JobClient
from framepipe.jobs.pipeline import Pipeline
from framepipe.server.detector import DetectorHub
from framepipe.server.feed import EventFeed
from framepipe.server.object_access import ObjectAccess

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from framepipe.processors.fleet import ProcessorRegistry
    from framepipe.server.live import LiveHistory
    from framepipe.server.panels import AppDashboard
    from framepipe.server.thumbnails import ThumbnailCache

try:
    from fastapi import Depends, HTTPException
    from starlette.requests import HTTPConnection
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = [
    "OBJECTS_AWAY",
    "Running",
    "Service",
    "ServiceState",
    "service_state",
]

OBJECTS_AWAY = "the object store is unavailable (the server's log has the cause); try again later"
"""The detail of a route's 503 while the object store cannot be opened."""


@dataclass(frozen=True)
class Running:
    """What the service opened (or was given) for its lifespan."""

    store: StateStore
    objects: ObjectAccess
    """The object store, which may not be open (see :mod:`framepipe.server.object_access`)."""
    jobs: JobClient
    feed: EventFeed
    registry: "ProcessorRegistry | None"
    """Processors registered on the broker's Redis; None without a Redis broker or when it
    did not start."""
    objects_url: str
    """The object store's URL as it was when the service started (hidden in error details)."""
    started: float = field(default_factory=time.time)


@dataclass
class ServiceState:
    """The service: its configuration, and what runs while its lifespan does."""

    settings: Settings
    token: str | None
    """The bearer token; ``None`` or ``""`` for none."""
    pipelines: dict[str, Pipeline]
    """The pipelines that may be submitted, by name (validated)."""
    apps: dict[str, App]
    """The live apps run inside the service, by name."""
    hub: DetectorHub
    running: Running | None = None
    metrics: "CollectorRegistry | None" = None
    """The Prometheus registry, made at the first scrape."""
    boards: "dict[str, AppDashboard]" = field(default_factory=dict)
    """What the apps served here add to the dashboard, by app name."""
    live: "LiveHistory | None" = None
    """The recent history of the live sources (samples, segments, markers)."""
    thumbnails: "ThumbnailCache | None" = None
    """Downscaled stored frames, kept for the segments view."""

    def _live(self) -> Running:
        if self.running is None:
            raise RuntimeError("the service is not running (its lifespan has not started)")
        return self.running

    @property
    def store(self) -> StateStore:
        """The state store (while running)."""
        return self._live().store

    @property
    def objects(self) -> ObjectStore:
        """The object store (while running); a 503 while it cannot be opened."""
        store = self._live().objects.store
        if store is None:
            raise HTTPException(503, OBJECTS_AWAY, headers={"Retry-After": "5"})
        return store

    @property
    def object_access(self) -> ObjectAccess:
        """The object store, open or not, and whether it answers (while running)."""
        return self._live().objects

    @property
    def jobs(self) -> JobClient:
        """The job client, with its engine (while running)."""
        return self._live().jobs

    @property
    def feed(self) -> EventFeed:
        """The feed of committed events (while running)."""
        return self._live().feed

    @property
    def registry(self) -> "ProcessorRegistry | None":
        """The processor registry; None when there is none or the service is not running."""
        return self.running.registry if self.running is not None else None

    def public(self, text: str) -> str:
        """``text`` without the server's own paths: its object store's URL and, for a local
        store, its folder; its home (as configured and resolved). A safety net: errors whose
        text the service does not make (an object store's) are not shown at all."""
        objects_url = self.running.objects_url if self.running is not None else None
        objects_root = None
        if objects_url and objects_url.startswith("file:"):
            objects_root = unquote(urlsplit(objects_url).path).rstrip("/")
        home = self.settings.home
        for private, shown in (
            (objects_url, "the object store"),
            (objects_root, "the object store"),
            (str(home.resolve()), "<home>"),
            (str(home.absolute()), "<home>"),
        ):
            if private and private != "/":
                text = text.replace(private, shown)
        return text


def service_state(connection: HTTPConnection) -> ServiceState:
    """The :class:`ServiceState` of the app serving ``connection`` (a request or a
    WebSocket)."""
    state: ServiceState = connection.app.state.service
    return state


Service = Annotated[ServiceState, Depends(service_state)]
"""A route's parameter of this type receives the service's state."""
