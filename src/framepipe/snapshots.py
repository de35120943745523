"""What a running :class:`~framepipe.app.App` leaves for other processes, and how they read it.

An app writes its health snapshot to ``<run>/apps/<app>.json`` and each pipeline's latest frame
as a small JPEG beside it (:func:`preview_path`: ``<run>/apps/<app>/<pipeline>.jpg``, the
pipeline's name made a safe file name by :func:`preview_file_name`); ``framepipe health``,
``framepipe sources`` and the dashboard read them (:func:`read_snapshots`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2

from framepipe.config import Settings
from framepipe.confined import open_beneath
from framepipe.errors import ConfigError, FramepipeError
from framepipe.frames import Frame, encode_jpeg
from framepipe.liveness import owner_is_dead, this_host

__all__ = [
    "MAX_APP_NAME_BYTES",
    "MAX_SNAPSHOT_BYTES",
    "PREVIEW_QUALITY",
    "capture_fps",
    "capture_source",
    "check_app_name",
    "preview_dir",
    "preview_file_name",
    "preview_jpeg",
    "preview_path",
    "read_snapshots",
    "snapshot_path",
]


MAX_APP_NAME_BYTES = 200
"""The longest app name, in UTF-8 bytes: its snapshot's file name (``<name>.json``) and the
temporary file written before it (``<name>.<pid>.tmp``) stay under the 255 bytes a file
name may have."""


def check_app_name(name: object) -> str:
    """``name`` if it can name an app, else a :class:`~framepipe.errors.ConfigError` naming
    it. The name is made the file of the app's snapshot (``<name>.json``) and the folder of its
    previews, in ``<run>/apps``, so it must be text naming one entry of that folder: not empty,
    ``.`` or ``..`` (the folder itself or the one above), without ``/`` (a folder elsewhere), a
    NUL or malformed Unicode (a lone surrogate, which no file name or snapshot holds), at most
    :data:`MAX_APP_NAME_BYTES` long. Any other name is kept as it is: spaces, dots
    (``cam-2.left``, ``...``), any script."""
    if not isinstance(name, str):
        raise ConfigError(f"app name {name!r}: must be text")
    problem = None
    if name in ("", ".", ".."):
        problem = "names no folder of its own"
    elif "/" in name:
        problem = "has a '/'"
    elif "\0" in name:
        problem = "has a NUL"
    else:
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            problem = "has malformed Unicode (a lone surrogate)"
        else:
            if size > MAX_APP_NAME_BYTES:
                problem = f"is {size} bytes long, over {MAX_APP_NAME_BYTES} (UTF-8)"
    if problem is not None:
        raise ConfigError(
            f"app name {name!r} {problem}: the name makes the app's health snapshot "
            "(<name>.json) and previews folder under <run>/apps"
        )
    return name


def snapshot_path(settings: Settings, app: str) -> Path:
    """Where app ``app`` writes its health snapshot: ``<run>/apps/<app>.json``."""
    return settings.run_dir / "apps" / f"{app}.json"


def preview_dir(settings: Settings, app: str) -> Path:
    """Where an app writes its pipelines' latest-frame previews."""
    return settings.run_dir / "apps" / app


def preview_path(settings: Settings, app: str, pipeline: str) -> Path:
    """The latest-frame preview of ``app``'s pipeline ``pipeline``:
    ``<run>/apps/<app>/<preview_file_name(pipeline)>``."""
    return preview_dir(settings, app) / preview_file_name(pipeline)


_PREVIEW_NAME_MAX = 200


def preview_file_name(pipeline: str) -> str:
    """The preview's file name for pipeline ``pipeline``: the name percent-quoted as UTF-8
    (every byte but ASCII letters, digits and ``-_.~`` becomes ``%XX``; a lone surrogate is
    quoted as the three bytes Python's ``surrogatepass`` gives it), plus ``.jpg``. A plain
    name (``station_1``, ``cam-2.left``) stays as it is, ``gate/1`` is ``gate%2F1.jpg`` and
    ``../x`` is ``..%2Fx.jpg``, so the file is always in the previews folder. A quoted name
    longer than 200 characters is cut to 184 and gets ``~`` and 16 hex digits of its SHA-256
    (201 characters: longer than any name not cut, so two names never share a file)."""
    quoted = quote(pipeline.encode("utf-8", "surrogatepass"), safe="-_.~")
    if len(quoted) > _PREVIEW_NAME_MAX:
        digest = hashlib.sha256(quoted.encode()).hexdigest()[:16]
        quoted = f"{quoted[:184]}~{digest}"
    return f"{quoted}.jpg"


MAX_SNAPSHOT_BYTES = 4 * 1024 * 1024
"""The largest health snapshot read back (an app's is a few kilobytes per pipeline)."""


_STALE_AFTER = 120.0
"""Seconds after which the snapshot of an app of another host or container (its pid means
nothing here) that was not rewritten is taken for a dead app's."""


def read_snapshots(settings: Settings) -> list[dict[str, Any]]:
    """Health snapshots of the apps of this home; a snapshot of a dead process says so.

    Only what an app writes is read: a regular file of the apps folder reached without
    following a link, at most :data:`MAX_SNAPSHOT_BYTES`, holding a JSON object with a
    ``name`` and a ``state`` that are text and a ``pipeline_status`` object (of which only the
    pipelines whose status is an object are kept). Anything else found there (a link, a FIFO,
    a folder, a huge file, malformed text or JSON, another shape) is left out, so one bad file
    never hides the other apps nor breaks a reader (the routes, ``framepipe sources``)."""
    folder = settings.run_dir / "apps"
    snapshots = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        data = _read_snapshot(folder, path.name)
        if data is None:
            continue
        host = data.get("host") if isinstance(data.get("host"), str) else this_host()
        owner = f"{host}:{data.get('pid')}:app"
        beat = data.get("updated_at")
        beat = float(beat) if isinstance(beat, (int, float)) else None
        if data.get("state") not in ("stopped",) and owner_is_dead(owner, beat, _STALE_AFTER):
            data["state"] = "dead"
        snapshots.append(data)
    return snapshots


def _read_snapshot(folder: Path, name: str) -> dict[str, Any] | None:
    try:
        fd = open_beneath(folder, [name], where=name)
    except (OSError, FramepipeError):
        return None
    with os.fdopen(fd, "rb") as file:
        raw = file.read(MAX_SNAPSHOT_BYTES + 1)
    if len(raw) > MAX_SNAPSHOT_BYTES:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return _shaped(data)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def capture_source(status: dict[str, Any]) -> dict[str, Any]:
    """The ``source`` part of a pipeline's status in a snapshot (its capture's counters), or
    ``{}`` when it has none or another shape."""
    src = status.get("source")
    return src if isinstance(src, dict) else {}


def capture_fps(status: dict[str, Any]) -> float | None:
    """The frame rate of a pipeline's capture as its status in a snapshot tells it: its
    ``capture_fps``, else (a snapshot of an older version) its frames over its uptime; None
    when neither is a number."""
    if "capture_fps" in status:
        return _number(status["capture_fps"])
    src = capture_source(status)
    uptime, frames = _number(src.get("uptime")), _number(src.get("frames"))
    return frames / uptime if uptime and frames is not None else None


def _shaped(data: object) -> dict[str, Any] | None:
    """``data`` if it has the shape an app writes (a ``name`` and a ``state`` that are text,
    ``pipeline_status`` an object), with only the pipelines whose status is an object; else
    None (another version's file, a neighbour's)."""
    if not isinstance(data, dict):
        return None
    statuses = data.get("pipeline_status")
    if (
        not isinstance(data.get("name"), str)
        or not isinstance(data.get("state"), str)
        or not isinstance(statuses, dict)
    ):
        return None
    data["pipeline_status"] = {
        str(name): status for name, status in statuses.items() if isinstance(status, dict)
    }
    return data


PREVIEW_QUALITY = 80
"""The JPEG quality of the previews."""


def preview_jpeg(frame: Frame) -> bytes:
    """The frame at most 640 pixels wide as JPEG, without taking the frame over."""
    image: Any = frame.peek()
    if image.shape[1] > 640:
        height = max(2, round(image.shape[0] * 640 / image.shape[1]))
        image = cv2.resize(image, (640, height), interpolation=cv2.INTER_AREA)
    return encode_jpeg(image, PREVIEW_QUALITY)
