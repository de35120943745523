"""Links on an SD card are not followed, and the user is told which were left out.

What the user expects: a video that is a symbolic link on the card (or a folder that is one)
is not imported, since what it points to is not on the card, but it is said: the detector logs
each once, naming it, and the import's summary lists it as a problem (``needs_attention``);
nothing outside the card is read or copied; a link that would not be imported anyway (a
``.txt``) is not reported.

Real components: the real ``list_card`` on real links; end to end the service on uvicorn
(SQLite, local object store) with the ``sd_import`` pipeline and the detector as its own
process, clips encoded with PyAV and QR codes from segno.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_modules
from test_example_sd_import import (
    EXAMPLE,
    CardMaker,
    Detector,
    ended,
    ledger_paths,
    sqlite_settings,
    wait_for,
    world,
)
from test_server import AUTH

__all__ = ["sqlite_settings", "world"]  # the fixtures, shared with the example's tests

sys.path.insert(0, str(EXAMPLE))
import detector as sd_detector

pytestmark = [pytest.mark.timeout(240)]


def test_the_listing_names_each_link_it_leaves_out(tmp_path: Path) -> None:
    root = tmp_path / "CARD"
    (root / "DCIM" / "100GOPRO").mkdir(parents=True)
    (root / "DCIM" / "100GOPRO" / "GX01.MP4").write_bytes(b"a" * 1000)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.MP4").write_bytes(b"o" * 1000)
    (root / "DCIM" / "100GOPRO" / "GX02.MP4").symlink_to(outside / "o.MP4")
    (root / "DCIM" / "101GOPRO").symlink_to(outside, target_is_directory=True)
    (root / "DCIM" / "notes.txt").symlink_to(outside / "o.MP4")  # no video: not said
    (root / "DCIM" / ".hidden.MP4").symlink_to(outside / "o.MP4")  # hidden: not said
    listing = sd_detector.list_card(root)
    assert [f["path"] for f in listing] == ["DCIM/100GOPRO/GX01.MP4"]
    left = {s["path"]: s["reason"] for s in listing.skipped}
    assert set(left) == {"DCIM/100GOPRO/GX02.MP4", "DCIM/101GOPRO"}
    assert "symbolic link" in left["DCIM/100GOPRO/GX02.MP4"]
    assert "not followed" in left["DCIM/101GOPRO"]
    assert all(str(tmp_path) not in reason for reason in left.values())  # no host path told
    assert listing.unlogged == listing.skipped


@pytest.mark.slow
def test_a_linked_video_on_a_card_is_reported_once_and_not_imported(
    world: dict[str, Any],
) -> None:
    need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")
    server, shared, tmp = world["server"], world["shared"], world["tmp"]
    maker = CardMaker(world["cards"] / "LINKS")
    qr = maker.qr("B9401;Lina Link")
    video = maker.video()
    outside = tmp / "host-videos"
    outside.mkdir()
    elsewhere = CardMaker(outside / "cam")
    foreign = elsewhere.video()
    linked = f"{Path(video).parent}/GX000099.MP4"
    (maker.folder / linked).symlink_to(elsewhere.folder / foreign)
    (maker.folder / "DCIM" / "101GOPRO").symlink_to(elsewhere.folder, target_is_directory=True)
    log = tmp / "det.log"
    # Listed at least twice before it is announced (--settle): each link said once all the same.
    detector = Detector(server.url, world["watch"], shared, log, "--settle", "0.3")
    world["detectors"].append(detector.start())
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        staging = tmp / ".staging-LINKS"  # inserted in one rename, its links kept as links
        shutil.copytree(maker.folder, staging, symlinks=True)
        staging.rename(world["watch"] / "LINKS")
        done = wait_for("the import", lambda: ended(client, "LINKS"), detector=detector)
    assert done["status"] == "completed", done.get("error")
    summary = done["data"]["summary"]
    assert summary["status"] == "needs_attention"
    assert summary["bookings"]["B9401"]["videos"] == [video]
    for path in (linked, "DCIM/101GOPRO"):
        problem = next((p for p in summary["problems"] if p.startswith(f"{path}: ")), None)
        assert problem is not None, summary["problems"]
        assert "not imported" in problem and "symbolic link" in problem
        said = [line for line in log.read_text().splitlines() if f"skipped {path}: " in line]
        assert len(said) == 1, said
        assert "WARNING" in said[0] and "symbolic link" in said[0]
    assert set(ledger_paths(world["settings"])) == {qr, video}
    copies = [p.name for p in shared.rglob("*") if p.is_file()]
    assert len(copies) == 2 and not any(p.startswith("GX000099") for p in copies), copies
