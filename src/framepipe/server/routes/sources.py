"""``/api/sources``: the sources of this home's live apps, their latest frames, and stopping
and starting the sources of the apps run inside the service.

Guarantees: app and pipeline names in paths match a fixed pattern (never ``..``), and a frame
is read without following a symbolic link below the run folder's ``apps`` folder (an app's
previews folder or a preview that is a link, or not a regular file, is a 404 saying so), so a
frame is only ever a file of the previews folder, whatever a neighbour with write access to
the run folder links there; only apps served by this service can be controlled (another
process's app is a 409, an unknown one a 404).
"""

import asyncio
import os
import re
from typing import Annotated, Any

from framepipe.app import preview_path, read_snapshots
from framepipe.config import Settings
from framepipe.confined import LinkRefusedError, open_beneath
from framepipe.errors import MissingDependencyError
from framepipe.server.state import Service, ServiceState
from framepipe.snapshots import capture_fps, capture_source

try:
    from fastapi import APIRouter, HTTPException
    from fastapi import Path as Path_
    from fastapi.responses import Response
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["router"]

_NAME = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$"  # an app or pipeline name; never '..'

Name = Annotated[str, Path_(pattern=_NAME)]

router = APIRouter(tags=["sources"])
"""Included under ``/api``."""


def _row(
    settings: Settings, app: str, dead: bool, name: str, status: dict[str, Any]
) -> dict[str, Any]:
    """One source of a snapshot as ``/api/sources`` lists it."""
    src = capture_source(status)
    served = re.match(_NAME, app) and re.match(_NAME, name)  # else the frame route refuses it
    return {
        "app": app,
        "pipeline": name,
        "source": status.get("source_description", ""),
        "state": "dead" if dead else status.get("state"),
        "fps": capture_fps(status),
        "frames": status.get("frames_captured", 0),
        "restarts": src.get("restarts", 0),
        "last_error": status.get("last_error"),
        "frame_url": f"/api/sources/{app}/{name}/frame"
        if served and preview_path(settings, app, name).is_file()
        else None,
    }


@router.get("/sources")
async def sources_list(service: Service) -> list[dict[str, Any]]:
    """Sources of the live apps of this home (from their health snapshots; one that is not of
    the shape apps write is left out by :func:`~framepipe.snapshots.read_snapshots`, so one
    file of another version or a neighbour's cannot break the listing); ``frame_url`` is set
    when the source has a preview the frame route serves."""
    settings = service.settings
    snapshots = await asyncio.to_thread(read_snapshots, settings)
    out = []
    for snap in snapshots:  # of the shape apps write (read_snapshots leaves out the rest)
        dead = snap["state"] == "dead"
        for name, status in snap["pipeline_status"].items():
            out.append(_row(settings, snap["name"], dead, name, status))
    return out


def _read_preview(settings: Settings, app_name: str, pipeline: str) -> bytes:
    """The bytes of the preview of ``app_name``'s ``pipeline``, opened below the folder of the
    apps' previews without following a link (:func:`framepipe.confined.open_beneath`)."""
    path = preview_path(settings, app_name, pipeline)
    fd = open_beneath(path.parent.parent, path.parts[-2:], where=f"{app_name}/{pipeline}")
    with os.fdopen(fd, "rb") as file:
        return file.read()


@router.get(
    "/sources/{app_name}/{pipeline}/frame", responses={200: {"content": {"image/jpeg": {}}}}
)
async def sources_frame(app_name: Name, pipeline: Name, service: Service) -> Response:
    """The latest frame of a source, as a JPEG (at most 640 pixels wide)."""
    try:
        data = await asyncio.to_thread(_read_preview, service.settings, app_name, pipeline)
    except (FileNotFoundError, NotADirectoryError):
        raise HTTPException(404, f"no frame of {app_name}/{pipeline} yet") from None
    except LinkRefusedError:
        raise HTTPException(
            404,
            f"no frame of {app_name}/{pipeline}: its preview is a link or not a regular file, "
            "which the service does not follow",
        ) from None
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-store"})


async def _control(
    service: ServiceState, app_name: str, pipeline: str, start: bool
) -> dict[str, Any]:
    live_app = service.apps.get(app_name)
    if live_app is None:
        known_apps = {
            snap["name"] for snap in await asyncio.to_thread(read_snapshots, service.settings)
        }
        if app_name in known_apps:
            raise HTTPException(
                409,
                f"app {app_name!r} runs in another process; only "
                "apps served by this service can be controlled",
            )
        raise HTTPException(404, f"no app {app_name!r}")
    if pipeline not in live_app.pipelines:
        raise HTTPException(
            404,
            f"app {app_name!r} has no pipeline {pipeline!r} "
            f"(it has: {', '.join(live_app.pipelines)})",
        )
    if start:
        await live_app.resume(pipeline)
    else:
        await live_app.pause(pipeline)
    return {
        "app": app_name,
        "pipeline": pipeline,
        "state": live_app.health().pipeline_status[pipeline]["state"],
    }


@router.post("/sources/{app_name}/{pipeline}/stop", status_code=202)
async def sources_stop(app_name: Name, pipeline: Name, service: Service) -> dict[str, Any]:
    """Stop a source of an app served here (kept, not recovered, until started)."""
    return await _control(service, app_name, pipeline, start=False)


@router.post("/sources/{app_name}/{pipeline}/start", status_code=202)
async def sources_start(app_name: Name, pipeline: Name, service: Service) -> dict[str, Any]:
    """Start a stopped source of an app served here again."""
    return await _control(service, app_name, pipeline, start=True)
