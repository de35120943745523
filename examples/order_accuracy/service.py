"""The stations as an app that ``framepipe serve`` runs, so the service's API, WebSocket and
dashboard show them live: each station's state and latest frame, stop/start buttons, and every
``order.completed`` as it happens.

    ORDER_STATIONS='station_1=counter.mp4,station_2=rtsp://10.0.0.12/stream1' \\
        framepipe serve --app examples/order_accuracy/service.py:app

Settings, read when the service loads this file:

- ``ORDER_STATIONS``: ``ID=SOURCE`` pairs, comma-separated;
- ``ORDER_STATIONS_FILE``: or a JSON file of them, as for ``run.py --stations-file``, read
  once when the service loads this file (``run.py --stations-file`` watches it; here, restart
  the service, or stop and start a station from the API); a station id in both is refused;
- ``ORDER_TIMEOUT`` (default 10), ``ORDER_BEST_FRAMES`` (3), ``ORDER_SELECTED`` (``selected/``);
- ``ORDER_CAPTURE`` (``auto``, the default: gst-launch-1.0 where GStreamer can play the source,
  else ffmpeg; or ``gst``, ``ffmpeg``, ``av``), ``ORDER_LOOP=1`` to play files forever,
  ``ORDER_FAST=1`` to read files at machine speed;
- ``ORDER_RETRY_CAP`` (default 60): the longest restart delay, and the retry period of a
  station whose camera failed 5 restarts in a row;
- ``ORDER_READER`` (``qr``, the default, or ``ocr``);
- ``ORDER_INPUT_OPTIONS``: FFmpeg options for opening every station's input, ``NAME=VALUE``
  pairs, comma-separated (``input_format=mjpeg,video_size=1280x720`` asks USB cameras for
  MJPEG), as ``run.py --input-option``; a comma not followed by ``NAME=`` belongs to the
  value (as in ``ORDER_STATIONS``).

With ``FRAMEPIPE_OBJECTS_URL='s3://frames?endpoint=...'`` frames are stored under
``station_1/ORDER_123/...`` in the ``frames`` bucket and the best ones in the ``selected``
bucket (unless ``ORDER_SELECTED`` says otherwise), as in ``run.py``.

A value that is not what its setting takes (``ORDER_TIMEOUT=nan``, ``ORDER_BEST_FRAMES=2.5``,
``ORDER_LOOP=maybe``) is a :class:`~framepipe.errors.ConfigError` naming the variable, and the
service does not start.

The service commits the app's events to its state store itself.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from orders import READERS, parse_stations, split_pairs
from run import Stations, input_options, selected_bucket_url
from stations_file import read_stations_file

from framepipe.backoff import Backoff
from framepipe.config import load_settings
from framepipe.errors import ConfigError
from framepipe.sources.capture import CAPTURES

__all__ = ["app", "service"]

C = TypeVar("C", bound=str)


def _stations() -> dict[str, str]:
    listed = os.environ.get("ORDER_STATIONS", "")
    stations = parse_stations(split_pairs(listed))
    path = os.environ.get("ORDER_STATIONS_FILE")
    if path:
        in_file = read_stations_file(Path(path))
        both = sorted(set(stations) & set(in_file))
        if both:
            raise ConfigError(
                f"station {both[0]!r} is in both ORDER_STATIONS and ORDER_STATIONS_FILE: "
                "give each station id once"
            )
        stations.update(in_file)
    if not stations:
        raise ConfigError(
            "no station: set ORDER_STATIONS='station_1=video.mp4,...' or ORDER_STATIONS_FILE"
        )
    return stations


def _seconds(name: str, default: float) -> float:
    """``name``'s value, a finite number of seconds > 0, or ``default`` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds") from None
    if not 0 < value < math.inf:  # also refuses NaN, which no comparison holds for
        raise ConfigError(f"{name}={raw!r}: use a number of seconds > 0")
    return value


def _count(name: str, default: int) -> int:
    """``name``'s value, a whole number >= 0, or ``default`` when unset."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if value < 0:
        raise ConfigError(f"{name}={raw!r}: use a whole number >= 0")
    return value


_YES = ("1", "true", "yes", "on")
_NO = ("", "0", "false", "no", "off")


def _flag(name: str) -> bool:
    """``name`` set to 1/true/yes/on (True) or 0/false/no/off or unset (False); any other
    value is refused rather than read as False."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in _YES:
        return True
    if raw in _NO:
        return False
    raise ConfigError(f"{name}={os.environ[name]!r}: use 1 or 0 (true/false, yes/no, on/off)")


def _choice(name: str, default: C, choices: tuple[C, ...]) -> C:
    value = os.environ.get(name) or default
    for choice in choices:
        if value == choice:
            return choice
    raise ConfigError(f"{name}={value!r}: use {', '.join(choices)}")


settings = load_settings()
retry_cap = _seconds("ORDER_RETRY_CAP", 60.0)
service = Stations(
    settings,
    order_timeout=_seconds("ORDER_TIMEOUT", 10.0),
    best_frames=_count("ORDER_BEST_FRAMES", 3),
    selected=os.environ.get("ORDER_SELECTED")
    or selected_bucket_url(settings.resolved_objects_url)
    or "selected/",
    capture=_choice("ORDER_CAPTURE", "auto", CAPTURES),
    loop=_flag("ORDER_LOOP"),
    realtime=not _flag("ORDER_FAST"),
    backoff=Backoff(2.0, 2.0, retry_cap, 0.0),
    retry_delay=retry_cap,
    reader=_choice("ORDER_READER", "qr", READERS),
    input_options=input_options(
        split_pairs(os.environ.get("ORDER_INPUT_OPTIONS", "")),
        "ORDER_INPUT_OPTIONS",
    ),
    store_events=False,
)
for _station, _spec in _stations().items():
    service.add_station_before_start(_station, _spec)
app = service.app
