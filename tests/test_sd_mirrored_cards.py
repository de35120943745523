"""Two cards with the same clips in the readers at once (a camera recording to both of its
card slots, a card cloned as a backup): each video is copied and rendered once.

What the user expects: the passenger's booking gets one object per video, not two; the
second card's import leaves the clips the first is importing to it and says so
(``in_other_imports``), and both imports complete. The same clips inserted later are
``nothing_new`` (the ledger), which this does not change.

Real components: the service on uvicorn (SQLite, local object store) with the ``sd_import``
pipeline, the detector as its own process, clips encoded with PyAV and QR codes from segno.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_modules
from test_example_sd_import import (
    CardMaker,
    Detector,
    eject,
    ended,
    imports_of,
    insert,
    running_world,
    sd_settings,
    sqlite_settings,
    wait_for,
    world,
)
from test_server import AUTH

__all__ = ["sqlite_settings", "world"]  # the fixtures, shared with the example's tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")


def test_two_cards_with_the_same_clips_at_once_import_each_video_once(
    world: dict[str, Any],
) -> None:
    server = world["server"]
    maker = CardMaker(world["cards"] / "SLOTA")
    maker.qr("B9301;Mira Twin")
    videos = [maker.video(), maker.video()]
    mirror = world["cards"] / "SLOTB"
    shutil.copytree(maker.folder, mirror)  # copy2: the same names, content and times
    for card in (maker.folder, mirror):  # both in the readers before the detector's poll
        shutil.copytree(card, world["watch"] / card.name)
    log = world["tmp"] / "det.log"
    detector = Detector(server.url, world["watch"], world["shared"], log)
    world["detectors"].append(detector.start())
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        done = [
            wait_for(
                f"the import of {label}",
                lambda label=label: ended(client, label),
                detector=detector,
            )
            for label in ("SLOTA", "SLOTB")
        ]
        for execution in done:
            assert execution["status"] == "completed", execution.get("error")
        summaries = [e["data"]["summary"] for e in done]
        outputs = [
            key
            for s in summaries
            for booking in s["bookings"].values()
            for key in booking["outputs"]
        ]
        assert len(outputs) == len(videos), outputs  # one object per video, not one per card
        rendered = [
            k for e in done for k, v in e["data"].items() if k.startswith("render/") and "key" in v
        ]
        assert sorted(rendered) == sorted(f"render/{v}" for v in videos)
        copied_videos = [p for s in summaries for p in s["copied"] if p in videos]
        assert sorted(copied_videos) == sorted(videos)  # each copied once, from one card
        importing, leaving = sorted(summaries, key=lambda s: len(s["in_other_imports"]))
        assert importing["status"] == "imported"
        assert importing["bookings"]["B9301"]["videos"] == videos
        assert set(videos) <= set(leaving["in_other_imports"])


def test_a_failed_card_resumed_after_its_mirror_imported_renders_nothing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first card's import fails (the card pulled mid-import, no copy retries), the mirror
    card then imports every video, and the first card comes back: its import resumes and
    completes without copying or rendering those videos again (the ledger says they were
    imported, by which import), so each video still has one object."""
    monkeypatch.setenv("SD_IMPORT_COPY_RETRIES", "0")  # read when the pipeline loads
    with running_world(tmp_path, sd_settings(tmp_path)) as world:
        server, watch = world["server"], world["watch"]
        maker = CardMaker(world["cards"] / "SLOTA")
        maker.qr("B9302;Ola Once")
        videos = [maker.video(), maker.video()]
        mirror = world["cards"] / "SLOTB"
        shutil.copytree(maker.folder, mirror)
        log = tmp_path / "det.log"
        detector = Detector(server.url, watch, world["shared"], log, "--max-rate", "100000")
        world["detectors"].append(detector.start())
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            mounted = insert(maker.folder, watch)
            wait_for("the import of SLOTA", lambda: imports_of(client, "SLOTA"), detector=detector)
            eject(mounted)  # pulled while it copies: its next copy fails, not retried
            failed = wait_for("SLOTA's end", lambda: ended(client, "SLOTA"), detector=detector)
            assert failed["status"] == "failed", failed["status"]
            insert(mirror, watch)
            other = wait_for("SLOTB's import", lambda: ended(client, "SLOTB"), detector=detector)
            assert other["status"] == "completed", other.get("error")
            assert other["data"]["summary"]["bookings"]["B9302"]["videos"] == videos
            keys = other["data"]["summary"]["bookings"]["B9302"]["outputs"]
            assert len(keys) == len(videos)
            insert(maker.folder, watch)  # the first card back: its import resumes
            resumed = wait_for(
                "SLOTA resumed to its end",
                lambda: (e := ended(client, "SLOTA")) and e["status"] != "failed" and e,
                detector=detector,
            )
            assert resumed["id"] == failed["id"] and len(imports_of(client, "SLOTA")) == 1
            assert resumed["status"] == "completed", resumed.get("error")
            summary = resumed["data"]["summary"]
            assert not [
                k for k, v in resumed["data"].items() if k.startswith("render/") and "key" in v
            ]
            assert set(summary["imported_elsewhere"]) == set(videos)
            assert set(summary["imported_elsewhere"].values()) == {other["id"]}
            assert sorted(summary["bookings"]["B9302"]["outputs"]) == sorted(keys)
