"""The stations as an app that ``framepipe serve`` runs, so the service's API, WebSocket and
dashboard show them live: each station's state and latest frame, stop/start buttons, and every
``order.completed`` as it happens.

    ORDER_STATIONS='station_1=counter.mp4,station_2=rtsp://10.0.0.12/stream1' \\
        framepipe serve --app examples/order_accuracy/service.py:app

Settings, read when the service loads this file:

- ``ORDER_STATIONS``: ``ID=SOURCE`` pairs, comma-separated;
- ``ORDER_STATIONS_FILE``: or a JSON file of them, as for ``run.py --stations-file``;
- ``ORDER_TIMEOUT`` (default 10), ``ORDER_BEST_FRAMES`` (3), ``ORDER_SELECTED`` (``selected/``);
- ``ORDER_CAPTURE`` (``ffmpeg``, ``gst`` or ``av``), ``ORDER_LOOP=1`` to play files forever.

The service commits the app's events to its state store itself.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from orders import OrderAccuracy, parse_stations
from run import read_stations_file

from framepipe.errors import ConfigError

__all__ = ["app", "service"]


def _stations() -> dict[str, str]:
    listed = os.environ.get("ORDER_STATIONS", "")
    stations = parse_stations([s for s in listed.split(",") if s.strip()])
    path = os.environ.get("ORDER_STATIONS_FILE")
    if path:
        stations.update(read_stations_file(Path(path)))
    if not stations:
        raise ConfigError(
            "no station: set ORDER_STATIONS='station_1=video.mp4,...' or ORDER_STATIONS_FILE"
        )
    return stations


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return default if raw in (None, "") else float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None


capture = os.environ.get("ORDER_CAPTURE", "ffmpeg")
if capture not in ("ffmpeg", "gst", "av"):
    raise ConfigError(f"ORDER_CAPTURE={capture!r}: use ffmpeg, gst or av")
service = OrderAccuracy(
    order_timeout=_float("ORDER_TIMEOUT", 10.0),
    best_frames=int(_float("ORDER_BEST_FRAMES", 3)),
    selected=os.environ.get("ORDER_SELECTED", "selected/"),
    capture=capture,  # type: ignore[arg-type]
    loop=os.environ.get("ORDER_LOOP", "") in ("1", "true", "yes"),
    store_events=False,
)
for _station, _spec in _stations().items():
    service.add_station_before_start(_station, _spec)
app = service.app
