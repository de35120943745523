"""A file on the card that is no video (a recording cut short, random bytes named like the
others) is a problem of that file: the import reports it and imports the rest of the card.

What the user expects: every other video of the jump is rendered and uploaded; the detector
gets the import's final status (``needs_attention``, naming the file and why, with the file's
name, not an internal path); the bad file is not recorded as imported, so a later insertion
considers it again, and nothing else is imported twice.

Real components: the service on uvicorn (SQLite, local object store) with the ``sd_import``
pipeline, the detector as its own process, clips encoded with PyAV and QR codes from segno.
"""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest

from conftest import need_modules
from test_example_sd_import import (
    CardMaker,
    Detector,
    eject,
    ended,
    insert,
    ledger_paths,
    sqlite_settings,
    wait_for,
    world,
)
from test_server import AUTH

__all__ = ["sqlite_settings", "world"]  # the fixtures, shared with the example's tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")


def test_a_file_that_is_no_video_is_reported_and_the_rest_of_the_card_imports(
    world: dict[str, Any],
) -> None:
    server = world["server"]
    maker = CardMaker(world["cards"] / "BADFILE")
    qr = maker.qr("B9001;Pat Quist")
    before = maker.video()
    broken = maker.not_a_video()
    after = [maker.video(), maker.video()]
    log = world["tmp"] / "det.log"
    detector = Detector(server.url, world["watch"], world["shared"], log)
    world["detectors"].append(detector.start())
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        mounted = insert(maker.folder, world["watch"])
        done = wait_for("the import", lambda: ended(client, "BADFILE"), detector=detector)
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        assert summary["status"] == "needs_attention"
        booking = summary["bookings"]["B9001"]
        assert booking["videos"] == [before, broken, *after]
        assert booking["not_rendered"] == [broken]
        assert len(booking["outputs"]) == 3  # every other video of the jump
        for key in booking["outputs"]:
            assert client.get(f"/api/objects/{key}").status_code == 200
        [problem] = summary["problems"]
        assert problem.startswith(f"{broken}: not imported: cannot be read as a video")
        assert "/proc/self/fd" not in json.dumps(done["data"])
        card_id = summary["card_id"]
        wait_for(
            "the final status at the detector",
            lambda: f"status of {card_id}: needs_attention {done['id']}" in log.read_text(),
            detector=detector,
        )
        # Imported: the QR clip and the videos rendered; the broken file is tried again.
        assert set(ledger_paths(world["settings"])) == {qr, before, *after}

        eject(mounted)
        wait_for(
            "the card's removal",
            lambda: not any(d["sessions"] for d in client.get("/api/detectors").json()),
            detector=detector,
        )
        insert(maker.folder, world["watch"])
        again = wait_for("the second import", lambda: ended(client, "BADFILE", 2))
        assert again["status"] == "completed", again.get("error")
        summary = again["data"]["summary"]
        assert summary["status"] == "needs_attention"
        assert summary["bookings"]["B9001"]["not_rendered"] == [broken]
        assert summary["bookings"]["B9001"]["outputs"] == []
        assert summary["copied"] == [broken]  # nothing that was imported is copied again
        uploaded = [k for k, v in again["data"].items() if k.startswith("render/") and "key" in v]
        assert uploaded == []  # nothing rendered twice


def test_a_small_file_that_is_no_video_is_reported_and_the_rest_of_the_card_imports(
    world: dict[str, Any],
) -> None:
    """A file below the QR-candidate limit that is no video (a recording cut short after a
    second is small) is scanned for a QR code like every small file: it holds none, so it is a
    video of its jump that cannot be read, reported as any other; the import does not fail."""
    server = world["server"]
    maker = CardMaker(world["cards"] / "SMALLBAD")
    qr = maker.qr("B9002;Lou Small")
    broken = maker.not_a_video(size=50_000)  # below SMALL_LIMIT: a QR candidate
    after = [maker.video(), maker.video()]
    log = world["tmp"] / "det.log"
    detector = Detector(server.url, world["watch"], world["shared"], log)
    world["detectors"].append(detector.start())
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        insert(maker.folder, world["watch"])
        done = wait_for("the import", lambda: ended(client, "SMALLBAD"), detector=detector)
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        assert summary["status"] == "needs_attention"
        booking = summary["bookings"]["B9002"]
        assert booking["videos"] == [broken, *after]
        assert booking["not_rendered"] == [broken]
        assert len(booking["outputs"]) == 2
        [problem] = summary["problems"]
        assert problem.startswith(f"{broken}: not imported: cannot be read as a video")
        assert "/proc/self/fd" not in json.dumps(done["data"])
        wait_for(
            "the final status at the detector",
            lambda: (
                f"status of {summary['card_id']}: needs_attention {done['id']}" in log.read_text()
            ),
            detector=detector,
        )
        assert set(ledger_paths(world["settings"])) == {qr, *after}


def test_a_video_the_detector_must_leave_out_is_reported_not_lost_silently(
    world: dict[str, Any],
) -> None:
    """A video whose name is not UTF-8 (a FAT card written by a camera or PC in another code
    page) cannot be sent to the backend, so the detector leaves it out; the import must not
    then call the card ``imported``: the file is named in the problems and the card needs
    attention, also when everything else on it was imported before."""
    server = world["server"]
    maker = CardMaker(world["cards"] / "NAMES")
    qr = maker.qr("B9003;Nell Names")
    good = maker.video()
    odd = maker.dcim / "GX000003.MP4"
    os.rename(maker.folder / maker.video(), os.fsencode(maker.dcim) + b"/GX\xff0003.MP4")
    assert not odd.exists()
    shown = "DCIM/100GOPRO/GX\ufffd0003.MP4"
    log = world["tmp"] / "det.log"
    detector = Detector(server.url, world["watch"], world["shared"], log)
    world["detectors"].append(detector.start())
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        mounted = insert(maker.folder, world["watch"])
        done = wait_for("the import", lambda: ended(client, "NAMES"), detector=detector)
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        assert summary["status"] == "needs_attention"
        assert summary["bookings"]["B9003"]["videos"] == [good]
        [problem] = summary["problems"]
        assert problem.startswith(f"{shown}: not imported: the detector left it out: ")
        assert "not valid Unicode" in problem
        wait_for(
            "the final status at the detector",
            lambda: f"status of {summary['card_id']}: needs_attention" in log.read_text(),
            detector=detector,
        )
        assert set(ledger_paths(world["settings"])) == {qr, good}

        eject(mounted)  # inserted again: nothing new to copy, the left-out file still said
        wait_for(
            "the card's removal",
            lambda: not any(d["sessions"] for d in client.get("/api/detectors").json()),
            detector=detector,
        )
        insert(maker.folder, world["watch"])
        again = wait_for("the second import", lambda: ended(client, "NAMES", 2))
        summary = again["data"]["summary"]
        assert summary["status"] == "needs_attention"
        assert summary["copied"] == []
        assert [p.split(": ")[0] for p in summary["problems"]] == [shown]
