"""A card used again: the same card (same label, same oldest file, so the same card id) comes
back with a file of the same name but new content (a camera that restarted its numbering, a
clip deleted and filmed again).

What the user of an import expects: the second import must not destroy the first import's
copy in the shared folder, nor its retention record (``sd_import.rendered``), which say what
was rendered from which copy and what may be removed when. Each copy's name carries the hash
of the file's identity (size and content fingerprint) as the object keys do
(``GX000002-<hash>.MP4``), so the new file's copy lands beside the earlier one; the same card
inserted again unchanged copies nothing again.

Real components: the service on uvicorn (SQLite, local object store) with the ``sd_import``
pipeline, the detector as its own process, clips encoded with PyAV and QR codes from segno.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_modules
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.jobs.ledger import Ledger, file_fingerprint
from test_example_sd_import import (
    EXAMPLE,
    CardMaker,
    Detector,
    eject,
    ended,
    insert,
    jump_clip,
    ledger_paths,
    sqlite_settings,
    wait_for,
    world,
)
from test_server import AUTH

__all__ = ["sqlite_settings", "world"]  # the fixtures, shared with the example's tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")

sys.path.insert(0, str(EXAMPLE))
from retention import RENDERED  # noqa: E402  (examples/sd_import/retention.py)


def shared_files(shared: Path) -> dict[str, os.stat_result]:
    """Every file of the shared folder (relative path -> its stat)."""
    return {p.relative_to(shared).as_posix(): p.stat() for p in shared.rglob("*") if p.is_file()}


def rendered(settings: Settings) -> dict[str, dict[str, Any]]:
    with StateStore(settings.resolved_database_url) as store:
        return {e.identity: dict(e.meta) for e in Ledger(store, RENDERED).entries()}


def test_a_reused_card_with_a_changed_file_keeps_the_first_import_copy_and_record(
    world: dict[str, Any],
) -> None:
    server, shared, settings = world["server"], world["shared"], world["settings"]
    maker = CardMaker(world["cards"] / "GOPRO1")
    stray = maker.video(small=True)  # no QR clip before it: held, copied at every insertion
    qr = maker.qr("B5001;Rut Ros")
    video = maker.video()  # DCIM/100GOPRO/GX000003.MP4
    first_bytes = (maker.folder / video).read_bytes()
    detector = Detector(server.url, world["watch"], shared, world["tmp"] / "det.log")
    world["detectors"].append(detector.start())

    with httpx.Client(base_url=server.url, headers=AUTH) as client:

        def import_of(n: int) -> dict[str, Any]:
            done: dict[str, Any] = wait_for(
                f"import {n}", lambda: ended(client, "GOPRO1", n), 120, detector
            )
            assert done["status"] == "completed", done.get("error")
            return done

        def removed(mounted: Path) -> None:
            eject(mounted)
            wait_for(
                "the card's removal",
                lambda: not any(d["sessions"] for d in client.get("/api/detectors").json()),
                detector=detector,
            )

        mounted = insert(maker.folder, world["watch"])
        first = import_of(1)
        summary = first["data"]["summary"]
        card_id = summary["card_id"]
        assert summary["bookings"]["B5001"]["videos"] == [video]
        assert summary["held"] == [{"path": stray, "reason": "no QR clip before it"}]
        first_dest = first["data"][f"copied/{video}"]["dest"]
        first_key = first["data"][f"render/{video}"]["key"]
        assert (shared / first_dest).read_bytes() == first_bytes
        after_first = shared_files(shared)

        # The clip deleted on the camera and filmed again under the same name.
        removed(mounted)
        jump_clip(maker.folder / video, seed=77)
        maker._stamp(maker.folder / video)
        second_bytes = (maker.folder / video).read_bytes()
        assert second_bytes != first_bytes
        mounted = insert(maker.folder, world["watch"])
        second = import_of(2)
        summary = second["data"]["summary"]
        assert summary["card_id"] == card_id  # the same card, by its id
        assert sorted(summary["copied"]) == sorted([stray, video])  # the held clip: asked again
        assert summary["status"] == "needs_attention"
        assert summary["bookings"]["B5001"]["videos"] == [video]
        second_dest = second["data"][f"copied/{video}"]["dest"]
        second_key = second["data"][f"render/{video}"]["key"]

        # The first import's copy is where it was, untouched; the new one is beside it.
        assert (shared / first_dest).read_bytes() == first_bytes
        assert second_dest != first_dest and second_key != first_key
        assert (shared / second_dest).read_bytes() == second_bytes
        for dest in (first_dest, second_dest):  # named by the card file and its content's hash
            assert re.fullmatch(rf"{card_id}/DCIM/100GOPRO/GX000003-[0-9a-f]{{12}}\.MP4", dest)
        assert (shared / second_dest).parent == (shared / first_dest).parent
        now = shared_files(shared)
        for name, st in after_first.items():  # nothing of the first import was rewritten
            assert (now[name].st_ino, now[name].st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
        assert set(now) == {*after_first, second_dest}

        # Both retention records, each for its own copy and object.
        records = rendered(settings)
        assert set(records) == {first_dest, second_dest}
        assert records[first_dest]["object_key"] == first_key
        assert records[first_dest]["fingerprint"] == file_fingerprint(shared / first_dest)
        assert records[second_dest]["object_key"] == second_key
        assert records[second_dest]["fingerprint"] == file_fingerprint(shared / second_dest)
        for key in (first_key, second_key):
            assert client.get(f"/api/objects/{key}").status_code == 200

        # The same card again, unchanged: nothing is copied again.
        removed(mounted)
        insert(maker.folder, world["watch"])
        third = import_of(3)
        summary = third["data"]["summary"]
        assert summary["bookings"] == {} and summary["held"] == [
            {"path": stray, "reason": "no QR clip before it"}
        ]
        copies = [s for s in third["steps"] if s["name"] == "copy"]
        assert [s["params"]["path"] for s in copies] == [stray]  # the held clip is asked for ...
        assert shared_files(shared) == now  # ... and found already there: nothing written
        for name, st in now.items():
            got = (shared / name).stat()
            assert (got.st_ino, got.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
        assert set(rendered(settings)) == {first_dest, second_dest}
        assert set(ledger_paths(settings)) == {qr, video}


def test_a_copy_name_carries_the_content_hash_and_fits_a_file_name() -> None:
    from card_paths import MAX_NAME_BYTES, copy_dest

    one = copy_dest("GOPRO1-3363ebe26b2d", "DCIM/100GOPRO/GX000002.MP4", 1000, "ab" * 16)
    assert re.fullmatch(r"GOPRO1-3363ebe26b2d/DCIM/100GOPRO/GX000002-[0-9a-f]{12}\.MP4", one)
    assert copy_dest("GOPRO1-3363ebe26b2d", "DCIM/100GOPRO/GX000002.MP4", 1000, "ab" * 16) == one
    assert copy_dest("GOPRO1-3363ebe26b2d", "DCIM/100GOPRO/GX000002.MP4", 1001, "ab" * 16) != one
    assert copy_dest("GOPRO1-3363ebe26b2d", "DCIM/100GOPRO/GX000002.MP4", 1000, "cd" * 16) != one
    long = copy_dest("C", "d/" + "\u00e9" * 200 + ".mp4", 1, "ab" * 16)
    name = long.rpartition("/")[2]
    assert len(name.encode()) <= MAX_NAME_BYTES and name.endswith(".mp4")
    assert re.search(r"-[0-9a-f]{12}\.mp4$", name)
