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
from framepipe.jobs.ledger import LedgerEntry
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

# isort: split
from retention import DAY, RENDERED, Retention, due_copies  # examples/sd_import: on the path now

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


def _mirror_then_first_again(
    client: httpx.Client, detector: Detector, mirror: Path, first: Path, watch: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The mirror card (SLOTB) inserted and imported to completion, then the first card (SLOTA,
    whose import failed) inserted again and its import resumed to its end: both imports."""
    insert(mirror, watch)
    other = wait_for("SLOTB's import", lambda: ended(client, "SLOTB"), detector=detector)
    assert other["status"] == "completed", other.get("error")
    insert(first, watch)  # the first card back: its import resumes
    resumed = wait_for(
        "SLOTA resumed to its end",
        lambda: (e := ended(client, "SLOTA")) and e["status"] != "failed" and e,
        detector=detector,
    )
    return other, resumed


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
            other, resumed = _mirror_then_first_again(client, detector, mirror, maker.folder, watch)
            assert other["data"]["summary"]["bookings"]["B9302"]["videos"] == videos
            keys = other["data"]["summary"]["bookings"]["B9302"]["outputs"]
            assert len(keys) == len(videos)
            assert resumed["id"] == failed["id"] and len(imports_of(client, "SLOTA")) == 1
            assert resumed["status"] == "completed", resumed.get("error")
            summary = resumed["data"]["summary"]
            assert not [
                k for k, v in resumed["data"].items() if k.startswith("render/") and "key" in v
            ]
            assert set(summary["imported_elsewhere"]) == set(videos)
            assert set(summary["imported_elsewhere"].values()) == {other["id"]}
            assert sorted(summary["bookings"]["B9302"]["outputs"]) == sorted(keys)


def test_copies_of_a_failed_card_whose_videos_its_mirror_imported_go_as_rendered_ones(
    tmp_path: Path,
) -> None:
    """The first card's videos are copied, but its renders cannot upload (the object store's
    folder is a file) so its import fails; the mirror card then imports every video. When the
    first card comes back its import completes without rendering them, and its own copies in
    the shared folder go under delete-after-upload as rendered copies do, verified against
    the mirror's objects: they are not kept for ever."""
    settings = sd_settings(tmp_path)
    with running_world(tmp_path, settings, retention=Retention(after_upload=True)) as world:
        server, watch, shared = world["server"], world["watch"], world["shared"]
        maker = CardMaker(world["cards"] / "SLOTA")
        maker.qr("B9303;Ola Twice")
        videos = [maker.video(), maker.video()]
        mirror = world["cards"] / "SLOTB"
        shutil.copytree(maker.folder, mirror)
        store = settings.home / "objects"
        store.mkdir(parents=True, exist_ok=True)
        aside = store.with_name("objects-aside")
        store.rename(aside)
        store.write_bytes(b"not a folder")  # every upload fails: the renders fail
        detector = Detector(server.url, watch, shared, tmp_path / "det.log")
        world["detectors"].append(detector.start())
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            mounted = insert(maker.folder, watch)
            failed = wait_for("SLOTA's end", lambda: ended(client, "SLOTA"), detector=detector)
            assert failed["status"] == "failed", failed["status"]
            copies = [  # the first one at least: its render failed after its copy
                c["dest"]
                for v in videos
                if (c := failed["data"].get(f"copied/{v}", {})).get("status") == "copied"
            ]
            assert copies and all((shared / dest).is_file() for dest in copies), failed["data"]
            eject(mounted)
            store.unlink()
            aside.rename(store)
            other, resumed = _mirror_then_first_again(client, detector, mirror, maker.folder, watch)
            keys = other["data"]["summary"]["bookings"]["B9303"]["outputs"]
            assert len(keys) == len(videos)
            assert resumed["id"] == failed["id"]
            assert resumed["status"] == "completed", resumed.get("error")
            assert set(resumed["data"]["summary"]["imported_elsewhere"]) == set(videos)
            for dest in copies:  # its copies: removed, each verified against the mirror's object
                released = resumed["data"].get(f"released/{dest}", {})
                assert released.get("status") == "removed", (dest, released)
                assert released["object_key"] in keys
                assert not (shared / dest).exists(), dest


def test_a_copy_recorded_after_another_import_uploaded_its_video_ages_from_that_upload(
    tmp_path: Path,
) -> None:
    """Retention days count from the upload of the video (``uploaded_at``, the mirror's), not
    from when the resumed import recorded its own copy of it."""
    (tmp_path / "CARD").mkdir()
    (tmp_path / "CARD" / "GX000002-abc.MP4").write_bytes(b"x")
    now = 100 * DAY

    def entry(meta: dict[str, Any]) -> LedgerEntry:
        return LedgerEntry(RENDERED, "CARD/GX000002-abc.MP4", None, 1, meta, "e", "s", now)

    policy = Retention(days=7)
    assert due_copies([entry({"uploaded_at": now - 8 * DAY})], policy, tmp_path, now)
    assert not due_copies([entry({"uploaded_at": now - 6 * DAY})], policy, tmp_path, now)
    assert not due_copies([entry({})], policy, tmp_path, now)  # its own upload: just now
