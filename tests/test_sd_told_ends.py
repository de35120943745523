"""An import that ends badly is told to the person at the reader: the backend sends the card's
detector ``sd:status`` ``failed`` or ``cancelled`` with the error (the import's ``summary``
step, which tells it otherwise, never runs), and the detector logs it, saying the card's next
insertion resumes it. Real components: ``backend.py`` and the detector as processes."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from conftest import need_modules
from test_example_sd_import import CLI_TOKEN, CardMaker, Detector, ended, imports_of, insert
from test_sd_resume import AUTH, a_video_copied, setup
from waiting import wait_until

__all__ = ["setup"]  # the fixture, shared with the resume tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")


def test_a_cancelled_import_is_told_to_the_cards_detector(setup: dict[str, Any]) -> None:
    tmp, watch, shared, backend = setup["tmp"], setup["watch"], setup["shared"], setup["backend"]
    maker = CardMaker(tmp / "cards" / "GONE")
    maker.qr("B7301;Ada Vex")
    for _ in range(4):
        maker.video()
    backend.start()
    log = tmp / "det.log"
    detector = Detector(backend.url, watch, shared, log, "--max-rate", "250000", token=CLI_TOKEN)
    setup["detectors"].append(detector.start())
    with httpx.Client(base_url=backend.url, headers=AUTH) as client:
        insert(maker.folder, watch)
        wait_until("a video's copy", lambda: a_video_copied(client, "GONE"), 60)
        [running] = imports_of(client, "GONE")
        assert client.post(f"/api/executions/{running['id']}/cancel").status_code == 202
        stopped = wait_until("the import to end", lambda: ended(client, "GONE"), 60)
        assert stopped["status"] == "cancelled"
    told = f": the import {running['id']} cancelled: cancelled by request; "
    said = wait_until(
        "the detector to say the import was cancelled",
        lambda: next((line for line in log.read_text().splitlines() if told in line), None),
        30,
    )
    assert "WARNING" in said and "card GONE-" in said
    assert said.endswith("insert the card again to resume it")
