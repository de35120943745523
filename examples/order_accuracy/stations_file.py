"""The stations file of ``run.py --stations-file``: a JSON object of ``"station_id":
"source"`` strings (:func:`read_stations_file`), applied to the running stations each time it
changes (:func:`watch_stations`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from orders import OrderAccuracy

from framepipe.errors import ConfigError
from framepipe.logs import get_logger

__all__ = ["read_stations_file", "watch_stations"]

log = get_logger("order_accuracy")


def read_stations_file(path: Path) -> dict[str, str]:
    """``{"station_id": "source", ...}`` from ``path``; a clear error when it is not that, or
    when a station id is in it twice (JSON keeps the last one: the other camera would silently
    never run)."""

    def no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        twice = sorted({key for key in keys if keys.count(key) > 1})
        if twice:
            raise ConfigError(f"stations file {path}: station {twice[0]!r} is in it twice")
        return dict(pairs)

    try:
        data = json.loads(path.read_text(), object_pairs_hook=no_twice)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"stations file {path}: {exc}") from exc
    except RecursionError:
        raise ConfigError(f"stations file {path}: JSON nested too deeply to be read") from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise ConfigError(
            f'stations file {path}: expected a JSON object of "station_id": "source" strings'
        )
    return data


async def watch_stations(
    service: OrderAccuracy, path: Path, stop: asyncio.Event, interval: float = 0.5
) -> None:
    """Apply ``path`` now and each time it changes, until ``stop``. A bad edit is logged and
    the stations keep running as they are; so is the file's removal (a deploy or an editor
    that deletes it before writing it again would otherwise stop every station and split
    their open orders): ``{}`` is how every station is stopped. A file that cannot be looked
    at (a symlink loop, a parent that is not a directory, no permission) is logged once and
    changes nothing either, and so does applying one that raises: the watch goes on until
    ``stop`` whatever the file holds, and the next change is applied.

    A change is a new inode, modification time or size: a file moved over it (``mv``, an
    atomic write) is a change even with the same size and a preserved modification time."""
    seen: tuple[int, int, int] | str | None = None
    while not stop.is_set():
        mark, problem = await _look(path)
        if mark != seen:
            seen = mark
            stations: dict[str, str] | None = None
            if problem is None:
                try:
                    stations = read_stations_file(path)
                except ConfigError as exc:
                    problem = str(exc)
            if problem is not None:
                log.error("%s; stations unchanged", problem)
            elif stations is not None:
                try:
                    await service.apply(stations)
                except Exception:
                    log.exception("stations file %s: applying it failed", path)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def _look(path: Path) -> tuple[tuple[int, int, int] | str, str | None]:
    """The change mark of ``path`` (inode, modification time, size), or a text naming why it
    cannot be looked at, and then that problem as a sentence."""
    try:
        stat = await asyncio.to_thread(path.stat)
    except FileNotFoundError:
        return "gone", f"stations file {path} is gone (write {{}} in it to stop every station)"
    except OSError as exc:
        why = exc.strerror or str(exc)
        return f"unreadable: {why}", f"stations file {path} cannot be looked at: {why}"
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size), None
