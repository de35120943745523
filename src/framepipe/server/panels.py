"""Application panels: what a live app served by ``framepipe serve`` adds to the dashboard.

An :class:`~framepipe.app.App` that has a ``dashboard()`` method returning an
:class:`AppDashboard` (see :class:`ProvidesDashboard`) contributes

* **panels**: sections of the dashboard, each of a generic :class:`PanelKind` whose JSON shape
  the page knows (below), read from one of the app's endpoints every ``refresh`` seconds and
  at once when one of the app's ``events`` arrives over the live feed;
* **routes**: an ``APIRouter`` mounted under ``/api/apps/{app}/``, behind the same token and
  browser checks as the rest of ``/api`` and left out of the API's schema (which stays the same
  for every installation);
* **images** from the app's own object store at ``/api/apps/{app}/objects/{key}``, streamed
  (an object of any size costs a chunk of memory: :mod:`framepipe.server.downloads`): only keys
  that are plain paths inside the store (``..``, absolute paths and the like are a 400, and a
  local store never follows a symlink out of its root: also a 400), never a file elsewhere;
  the error names the key, never the store's path (a failure of the store itself is a 500).

``GET /api/apps`` lists the apps served here with their panels (apps without any have none).

An app may also name the fields of its segments' ``meta`` that the segments view shows
(``segment_fields``, :class:`SegmentField`); without them the view shows the ``label`` and
``who`` fields, else the first scalar fields of ``meta`` (see
:func:`framepipe.server.live.display_fields`).

The shapes a panel's endpoint returns, by kind:

* ``events``: ``[{"ts": float, "type": str, "text": str, "image": key | null}, ...]``, newest
  first (``image`` a key of the app's object store, shown as a thumbnail);
* ``images``: ``[{"key": str, "caption": str, "ts": float | null}, ...]``, newest first;
* ``names``: ``[{"name": str, "text": str | null}, ...]``;
* ``status``: ``{"state": str, "fields": [{"label": str, "value": str | number | null}]}``.
"""

from __future__ import annotations

import asyncio
import mimetypes
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, BinaryIO, Protocol, runtime_checkable

from framepipe.app import App
from framepipe.backends.objects import ObjectStore
from framepipe.backends.objects.base import validate_key
from framepipe.errors import InvalidKeyError, MissingDependencyError, ObjectNotFoundError
from framepipe.server.downloads import open_copy, streamed
from framepipe.server.path_keys import ObjectKey
from framepipe.server.store_errors import object_store_errors

try:
    from fastapi import APIRouter, Depends, FastAPI, HTTPException
    from fastapi.responses import Response
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = [
    "AppDashboard",
    "Panel",
    "PanelKind",
    "ProvidesDashboard",
    "SegmentField",
    "dashboards_of",
    "mount_app_panels",
]

_APP = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")  # as the sources' routes: never '..'
_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_ENDPOINT = re.compile(r"^[a-z0-9][a-z0-9/_-]{0,127}$")
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/webp", "image/gif"})


class PanelKind(StrEnum):
    """How the dashboard shows a panel (the JSON shape of its endpoint, in the module doc)."""

    EVENTS = "events"
    IMAGES = "images"
    NAMES = "names"
    STATUS = "status"


@dataclass(frozen=True)
class Panel:
    """One section an app adds to the dashboard.

    ``endpoint`` is a route of the app's router, relative to ``/api/apps/{app}/``; ``events``
    are event types of the app that make the page read the panel again at once."""

    id: str
    title: str
    kind: PanelKind
    endpoint: str
    events: tuple[str, ...] = ()
    refresh: float = 10.0

    def __post_init__(self) -> None:
        if not _ID.match(self.id):
            raise ValueError(f"panel id {self.id!r}: use 1-64 of a-z, 0-9, '_' and '-'")
        if not _ENDPOINT.match(self.endpoint) or ".." in self.endpoint:
            raise ValueError(
                f"panel {self.id!r}: endpoint {self.endpoint!r} must be a relative route "
                "(a-z, 0-9, '/', '_', '-')"
            )
        if not self.refresh > 0:
            raise ValueError(f"panel {self.id!r}: refresh must be > 0 seconds")

    def describe(self, app: str) -> dict[str, Any]:
        """What ``GET /api/apps`` says about it."""
        return {
            "id": self.id,
            "title": self.title,
            "kind": self.kind.value,
            "url": f"/api/apps/{app}/{self.endpoint}",
            "events": list(self.events),
            "refresh": self.refresh,
        }


@dataclass(frozen=True)
class SegmentField:
    """A field of a segment's ``meta`` shown in the segments view.

    ``path`` is its name in ``meta``, dotted for a nested one (``"visitor.name"``); with
    ``image`` its value is a key of the app's object store, shown as a picture."""

    label: str
    path: str
    image: bool = False

    def __post_init__(self) -> None:
        if not self.label or not self.path or any(not part for part in self.path.split(".")):
            raise ValueError(f"segment field {self.label!r}: needs a label and a path like 'a.b'")


@dataclass(frozen=True)
class AppDashboard:
    """An app's panels, routes and object store (read when the service is made)."""

    panels: Sequence[Panel] = ()
    router: APIRouter | None = None
    """Mounted under ``/api/apps/{app}`` behind the token (not in the API's schema)."""
    objects: Callable[[], ObjectStore | None] | None = None
    """The app's object store, asked at each request (None while it is not open: 503)."""
    segment_fields: Sequence[SegmentField] | None = None
    """The fields of its segments' ``meta`` the segments view shows (None: the default)."""

    def __post_init__(self) -> None:
        ids = [p.id for p in self.panels]
        if len(set(ids)) != len(ids):
            raise ValueError(f"panel ids must be unique: {ids}")


@runtime_checkable
class ProvidesDashboard(Protocol):
    """An app that adds to the dashboard."""

    def dashboard(self) -> AppDashboard: ...


def dashboards_of(apps: Mapping[str, App]) -> dict[str, AppDashboard]:
    """The dashboards of the apps that provide one, by app name."""
    return {
        name: app.dashboard() for name, app in apps.items() if isinstance(app, ProvidesDashboard)
    }


def _object_response(file: BinaryIO, key: str) -> Response:
    kind = mimetypes.guess_type(key)[0] or ""
    return streamed(
        file,
        kind if kind in _IMAGE_TYPES else "application/octet-stream",
        {"Cache-Control": "no-store"},
    )


def mount_app_panels(
    app: FastAPI, apps: Mapping[str, App], check_token: Callable[..., Awaitable[None]]
) -> dict[str, AppDashboard]:
    """Serve ``GET /api/apps``, each providing app's router and its objects on ``app``, all
    behind ``check_token``; returns the dashboards by app name."""
    boards = dashboards_of(apps)
    for name in boards:
        if not _APP.match(name):
            raise ValueError(
                f"app {name!r} adds to the dashboard, but its name cannot be part of a path: "
                "use letters, digits, '_', '-' and '.' (not starting with '.')"
            )
    guard = [Depends(check_token)]
    listing = APIRouter(tags=["apps"])

    @listing.get("/apps")
    async def apps_list() -> list[dict[str, Any]]:
        """The live apps served here and the panels they add to the dashboard."""
        return [
            {
                "app": name,
                "panels": [p.describe(name) for p in boards[name].panels] if name in boards else [],
            }
            for name in apps
        ]

    app.include_router(listing, prefix="/api", dependencies=guard)

    for name, board in boards.items():
        if board.router is not None:
            prefix = f"/api/apps/{name}"
            app.include_router(
                board.router, prefix=prefix, dependencies=guard, include_in_schema=False
            )
        if board.objects is not None:
            app.add_api_route(
                f"/api/apps/{name}/objects/{{key:objectkey}}",
                _objects_route(name, board.objects),
                methods=["GET"],
                dependencies=guard,
                include_in_schema=False,
            )
    return boards


def _objects_route(name: str, store_of: Callable[[], ObjectStore | None]) -> Callable[[str], Any]:
    async def app_object(key: ObjectKey) -> Response:
        store = store_of()
        if store is None:
            raise HTTPException(503, f"the object store of app {name!r} is not open yet")
        try:
            validate_key(key)
            with object_store_errors("read", key):
                file = await asyncio.to_thread(open_copy, store, key)
            return _object_response(file, key)
        except InvalidKeyError:
            raise HTTPException(
                400,
                f"the key {key!r} is refused: only a plain path inside the app's object "
                "store (no '..', no absolute path, no symlink out of the store)",
            ) from None
        except ObjectNotFoundError:
            raise HTTPException(404, f"no object {key!r} in app {name!r}'s store") from None

    return app_object
