"""The order-accuracy example refuses a malformed setting before any station runs, naming it.

The runner (``run.py``) and the service (``service.py``, loaded as ``framepipe serve`` loads
it) run as real processes; nothing is captured. A value no setting takes (``nan`` seconds, a
fraction of a frame, a flag that is neither yes nor no, a station id given twice) would
otherwise run the stations on something else than what the site meant: an order timeout
that never expires, one of two cameras silently never started.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from framepipe import LocalObjectStore
from framepipe.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "order_accuracy"
sys.path.insert(0, str(EXAMPLE))
from station import build_station, parse_stations, station_source  # noqa: E402
from stations_file import read_stations_file  # noqa: E402


def run_example(
    args: list[str], tmp_path: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        check=False,
        env={**os.environ, "FRAMEPIPE_HOME": str(tmp_path / "home"), **(env or {})},
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--order-timeout", "nan"),
        ("--order-timeout", "inf"),
        ("--fps", "nan"),
        ("--retry-cap", "nan"),
        ("--max-order-seconds", "nan"),
    ],
)
def test_the_runner_refuses_a_number_that_is_not_finite(
    option: str, value: str, tmp_path: Path
) -> None:
    """``nan`` passes every ``>`` and ``<`` check: an order timeout of nan never expires, an
    fps of nan crashed the runner with a traceback. Both are bad settings (exit 2, the option
    named)."""
    video = tmp_path / "counter.mp4"  # never opened: the settings are refused first
    result = run_example(
        [sys.executable, "run.py", "--station", f"station_1={video}", option, value], tmp_path
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"argument {option}: must be a finite number, got {value}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_station_given_twice_is_refused_not_one_of_them_dropped(tmp_path: Path) -> None:
    """Two ``--station`` items (or stations-file entries, or ``ORDER_STATIONS`` pairs) with
    one id: the first camera was silently replaced by the second and never ran."""
    result = run_example(
        [
            sys.executable,
            "run.py",
            *("--station", "station_1=rtsp://10.0.0.11/stream1"),
            *("--station", "station_1=rtsp://10.0.0.12/stream1"),
        ],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: station 'station_1' is given twice: give each station id once" in result.stderr

    with pytest.raises(ConfigError, match="'station_2' is given twice"):
        parse_stations(["station_2=a.mp4", " station_2 = b.mp4"])

    stations_file = tmp_path / "stations.json"
    stations_file.write_text('{"station_1": "a.mp4", "station_2": "b.mp4", "station_1": "c.mp4"}')
    with pytest.raises(ConfigError, match=r"station 'station_1' is in it twice"):
        read_stations_file(stations_file)
    stations_file.write_text(json.dumps({"station_1": "a.mp4", "station_2": "b.mp4"}))
    assert read_stations_file(stations_file) == {"station_1": "a.mp4", "station_2": "b.mp4"}


PROBE = (
    "import json, service; s = service.service; print(json.dumps(["
    "s.options['order_timeout'], s.options['best_frames'], s.capture_options['loop'], "
    "s.options['retry_delay'], sorted(s.specs)]))"
)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ORDER_TIMEOUT", "nan", "ORDER_TIMEOUT='nan': use a number of seconds > 0"),
        ("ORDER_TIMEOUT", "0", "ORDER_TIMEOUT='0': use a number of seconds > 0"),
        ("ORDER_RETRY_CAP", "inf", "ORDER_RETRY_CAP='inf': use a number of seconds > 0"),
        ("ORDER_BEST_FRAMES", "2.5", "ORDER_BEST_FRAMES='2.5' is not a whole number"),
        ("ORDER_BEST_FRAMES", "-1", "ORDER_BEST_FRAMES='-1': use a whole number >= 0"),
        ("ORDER_LOOP", "maybe", "ORDER_LOOP='maybe': use 1 or 0"),
        ("ORDER_STATIONS_FILE", "{stations}", "station 'station_1' is in both ORDER_STATIONS and"),
    ],
)
def test_the_service_refuses_a_malformed_setting_naming_it(
    name: str, value: str, message: str, tmp_path: Path
) -> None:
    """``framepipe serve`` loads ``service.py``: a value its variable does not take stops the
    load with a ``ConfigError`` naming the variable, instead of running with ``nan``, a
    truncated count, a flag read as off, or one of two cameras of one id."""
    stations = tmp_path / "stations.json"
    stations.write_text(json.dumps({"station_1": str(tmp_path / "b.mp4")}))
    env = {"ORDER_STATIONS": f"station_1={tmp_path / 'a.mp4'}"}
    env[name] = value.format(stations=stations)
    result = run_example([sys.executable, "-c", PROBE], tmp_path, env)
    assert result.returncode != 0
    assert "ConfigError: " + message in result.stderr, result.stderr[-2000:]


def test_the_service_reads_the_values_its_settings_take(tmp_path: Path) -> None:
    for name in ("a.mp4", "b.mp4"):  # the stations are built, not started
        (tmp_path / name).write_bytes(b"")
    stations = tmp_path / "stations.json"
    stations.write_text(json.dumps({"station_2": str(tmp_path / "b.mp4")}))
    env = {
        "ORDER_STATIONS": f"station_1={tmp_path / 'a.mp4'}",
        "ORDER_STATIONS_FILE": str(stations),
        "ORDER_TIMEOUT": " 2.5 ",
        "ORDER_BEST_FRAMES": "0",
        "ORDER_LOOP": "On",
        "ORDER_RETRY_CAP": "30",
    }
    result = run_example([sys.executable, "-c", PROBE], tmp_path, env)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [2.5, 0, True, 30.0, ["station_1", "station_2"]]


@pytest.mark.parametrize(
    "options",
    [
        {"order_timeout": math.nan},
        {"order_timeout": math.inf},
        {"max_order_seconds": math.nan},
        {"best_frames": -1},
    ],
)
def test_a_station_built_from_python_refuses_what_the_runner_refuses(
    options: dict[str, Any], tmp_path: Path
) -> None:
    """``build_station`` (and ``OrderAccuracy``, which builds each station with it) is the
    same gate for code that does not go through the runner's options."""
    source = station_source("station_1", "cmd:true")
    with LocalObjectStore(tmp_path / "objects") as frames, pytest.raises(ConfigError):
        build_station("station_1", source, frames=frames, **options)


def test_a_stations_file_missing_or_malformed_at_the_start_is_a_bad_setting(
    tmp_path: Path,
) -> None:
    """A mistyped ``--stations-file`` path left the runner waiting, with no station and no
    word, for a file that would never come; a file that is not a stations object at the start
    is refused the same way (exit 2), while a bad edit later is logged and changes nothing."""
    missing = tmp_path / "station.json"
    result = subprocess.run(
        [sys.executable, "run.py", "--stations-file", str(missing)],
        check=False,
        env={**os.environ, "FRAMEPIPE_HOME": str(tmp_path / "home")},
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"error: stations file {missing}: " in result.stderr
    assert "No such file" in result.stderr

    malformed = tmp_path / "stations.json"
    malformed.write_text('["station_1=counter.mp4"]')
    result = run_example([sys.executable, "run.py", "--stations-file", str(malformed)], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert 'expected a JSON object of "station_id": "source" strings' in result.stderr
