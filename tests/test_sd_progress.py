"""An SD import's progress bar moves with the work, from the start to the end.

What the user watching an import expects: the bar says how much of the import is done. The
import's ``plan`` knows every file it will copy and render, so every step it will run exists
from then on and the bar is the share of all of them: it cannot reach most of the way while
only the QR clips are copied and read, then stand still while the videos are copied and
rendered (the engine's bar never goes back, so work added late holds it).

Real components: the service on uvicorn (SQLite, local object store) with the ``sd_import``
pipeline, the detector as its own process, a WebSocket client reading ``pipeline:progress``,
clips encoded with PyAV and QR codes from segno.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import need_modules
from test_example_sd_import import (
    CardMaker,
    Detector,
    ended,
    insert,
    sqlite_settings,
    wait_for,
    world,
)
from test_server import AUTH

__all__ = ["sqlite_settings", "world"]  # the fixtures, shared with the example's tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")


def test_the_progress_bar_counts_the_videos_from_the_plan_on(world: dict[str, Any]) -> None:
    server, watcher = world["server"], world["watcher"]
    maker = CardMaker(world["cards"] / "BAR")
    maker.qr("B7101;Rut Rask")
    for _ in range(4):
        maker.video()
    detector = Detector(server.url, world["watch"], world["shared"], world["tmp"] / "det.log")
    world["detectors"].append(detector.start())
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        insert(maker.folder, world["watch"])
        done = wait_for("the import", lambda: ended(client, "BAR"), detector=detector)
        assert done["status"] == "completed", done.get("error")
        assert done["data"]["summary"]["status"] == "imported"

    def progress() -> list[dict[str, Any]]:
        return [m for m in watcher.of("pipeline:progress") if m["execution_id"] == done["id"]]

    wait_for("the last progress", lambda: [m for m in progress() if m["step_key"] is None])
    reports = progress()
    overall = [m["progress"] for m in reports if m["progress"] is not None]
    assert overall == sorted(overall) and overall[-1] == 100.0
    first_render = next(
        n for n, m in enumerate(reports) if (m["step_key"] or "").startswith("render:")
    )
    before = max(m["progress"] or 0 for m in reports[:first_render])
    # The QR clip read and one video copied: a small share of the work, not most of the bar.
    assert before < 50, [(m["step_key"], m["progress"]) for m in reports[: first_render + 1]]
