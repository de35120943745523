"""The detector stopped the way a service manager stops it (SIGTERM, systemd's ``stop``):
it ends at once with status 0 and says nothing alarming. An operator reads an ``ERROR`` with
a ``RuntimeError`` in the detector's journal as a crash, and it hid the real ones.

Real components: the service on uvicorn (SQLite) with the ``sd_import`` hub, the detector as
its own process connected to it, with and without a card in its reader.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_modules
from test_example_sd_import import CardMaker, Detector, insert, running_world, sd_settings, wait_for
from test_server import AUTH

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # slow: the detector as a process

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")


@pytest.fixture
def world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with running_world(tmp_path, sd_settings(tmp_path)) as running:
        yield running


@pytest.mark.parametrize("with_card", [False, True])
def test_sigterm_stops_the_detector_cleanly(world: dict[str, Any], with_card: bool) -> None:
    server = world["server"]
    if with_card:
        maker = CardMaker(world["cards"] / "STOPPED")
        maker.qr("B9101;Sig Term")
        insert(maker.folder, world["watch"])
    log = world["tmp"] / "det.log"
    detector = Detector(server.url, world["watch"], world["shared"], log).start()
    world["detectors"].append(detector)
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        wait_for(
            "the detector's connection" + (" and its card" if with_card else ""),
            lambda: any(
                d["sessions"] or not with_card for d in client.get("/api/detectors").json()
            ),
            detector=detector,
        )
    assert detector.proc is not None
    detector.proc.send_signal(signal.SIGTERM)
    assert detector.proc.wait(timeout=10) == 0
    said = log.read_text()
    assert "connected to" in said
    for alarming in ("ERROR", "Traceback", "RuntimeError", "Task was destroyed"):
        assert alarming not in said, said
