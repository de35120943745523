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
    their open orders): ``{}`` is how every station is stopped."""
    seen: tuple[int, int] | None = None
    while not stop.is_set():
        try:
            stat = await asyncio.to_thread(path.stat)
            mark: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            mark = None
        if mark != seen:
            seen = mark
            error: ConfigError | None = None
            stations: dict[str, str] | None = None
            if mark is None:
                error = ConfigError(
                    f"stations file {path} is gone (write {{}} in it to stop every station)"
                )
            else:
                try:
                    stations = read_stations_file(path)
                except ConfigError as exc:
                    error = exc
            if error is not None:
                log.error("%s; stations unchanged", error)
            elif stations is not None:
                await service.apply(stations)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
