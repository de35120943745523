"""Symbolic links in the SD import's shared folder and on the card (issue 14, hole 5).

Whoever can write into the shared folder (the detector's machine, anyone on the share) can
plant links in it; a ``--card`` folder can hold links too. Nothing on either side may follow
one out of its root:

* the backend (``sd_share.py``) reads copies through ``open_beneath``: a link where a copy
  should be (``shared/CARD/DCIM -> /elsewhere``) is refused naming it, and the file is reported,
  not read, nor its size told; the card's other files import;
* the detector (``detector.py``) creates its temporary ``.NAME.part`` exclusively and never
  writes through a planted link (a stale regular ``.part`` is replaced), opens the card's file
  without following links, and answers ``sd:file_copied`` ``ok: false`` with the reason.

Real files and links, the service on uvicorn, the real detector process, and a WebSocket client
playing a detector that claims copies it never made.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from conftest import need_modules
from framepipe.config import Settings
from framepipe.jobs.ledger import file_fingerprint
from media import make_qr_clip
from test_example_sd_import import (
    EXAMPLE,
    CardMaker,
    Detector,
    copy_in,
    ended,
    insert,
    jump_clip,
    ledger_paths,
    running_world,
    sd_settings,
    wait_for,
)
from test_server import AUTH

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")

sys.path.insert(0, str(EXAMPLE))
import detector as sd_detector  # noqa: E402  (examples/sd_import/detector.py)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return sd_settings(tmp_path)


def entry_of(path: Path, rel: str, mtime: float) -> dict[str, Any]:
    return {
        "path": rel,
        "size": path.stat().st_size,
        "mtime": mtime,
        "fingerprint": file_fingerprint(path),
    }


class ClaimingDetector(threading.Thread):
    """A detector over a real WebSocket that announces a card, copies what it is asked for
    honestly, except the paths in ``claim_only``: those it says it copied without writing
    anything (what a hostile detector, or one on a share someone else tampered with, does)."""

    def __init__(
        self, url: str, card: Path, shared: Path, files: list[dict[str, Any]], claim_only: set[str]
    ) -> None:
        super().__init__(daemon=True)
        self.url = f"{url.replace('http', 'ws')}/ws/detector"
        self.card, self.shared, self.files, self.claim_only = card, shared, files, claim_only
        self.received: list[dict[str, Any]] = []
        self.stop = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        with ws_connect(self.url, additional_headers=AUTH) as ws:
            ws.send(json.dumps({"type": "detector:hello", "detector_id": "claimer"}))
            assert json.loads(ws.recv(10))["type"] == "detector:welcome"
            ws.send(
                json.dumps(
                    {
                        "type": "detector:sd_inserted",
                        "session_id": "claim-1",
                        "card_id": "LINKED-1",
                        "label": "LINKED",
                    }
                )
            )
            ws.send(
                json.dumps(
                    {
                        "type": "sd:file_list",
                        "session_id": "claim-1",
                        "card_id": "LINKED-1",
                        "label": "LINKED",
                        "files": self.files,
                    }
                )
            )
            self.ready.set()
            while not self.stop.is_set():
                try:
                    message = json.loads(ws.recv(timeout=0.1))
                except TimeoutError:
                    continue
                self.received.append(message)
                if message["type"] != "sd:copy_request":
                    continue
                if message["path"] not in self.claim_only:
                    target = self.shared.joinpath(*message["dest"].split("/"))
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self.card / message["path"], target)
                ws.send(
                    json.dumps(
                        {
                            "type": "sd:file_copied",
                            "request_id": message["request_id"],
                            "session_id": "claim-1",
                            "path": message["path"],
                            "ok": True,
                            "dest": message["dest"],
                            "size": message["size"],
                            "fingerprint": message["fingerprint"],
                        }
                    )
                )


def test_the_backend_reads_no_copy_through_a_link_in_the_share(
    tmp_path: Path, settings: Settings
) -> None:
    """``shared/LINKED-1/DCIM -> elsewhere``: the backend neither QR-scans the file outside the
    share nor tells its size; the card's other files import."""
    with running_world(tmp_path, settings) as world:
        server, shared = world["server"], world["shared"]
        elsewhere = tmp_path / "elsewhere"  # the backend machine's private files
        (elsewhere / "100GOPRO").mkdir(parents=True)
        secret = make_qr_clip(
            elsewhere / "100GOPRO" / "GX000001.MP4", [("SECRET;Mallory", 8)], size=(320, 288)
        )
        private = elsewhere / "100GOPRO" / "GX000004.MP4"
        private.write_bytes(b"p" * 4242)
        (shared / "LINKED-1").mkdir()
        (shared / "LINKED-1" / "DCIM").symlink_to(elsewhere, target_is_directory=True)

        card = world["cards"] / "LINKED"
        (card / "MISC").mkdir(parents=True)
        qr = make_qr_clip(card / "MISC" / "GX000002.MP4", [("B8001;Olga Ode", 8)], size=(320, 288))
        video = jump_clip(card / "MISC" / "GX000003.MP4", seed=3)
        files = [
            entry_of(secret, "DCIM/100GOPRO/GX000001.MP4", 100.0),  # as it is outside
            entry_of(qr, "MISC/GX000002.MP4", 200.0),
            entry_of(video, "MISC/GX000003.MP4", 300.0),
            {**entry_of(private, "DCIM/100GOPRO/GX000004.MP4", 400.0), "size": 5000},
        ]
        claimer = ClaimingDetector(
            server.url,
            card,
            shared,
            files,
            {"DCIM/100GOPRO/GX000001.MP4", "DCIM/100GOPRO/GX000004.MP4"},
        )
        claimer.start()
        try:
            assert claimer.ready.wait(30)
            with httpx.Client(base_url=server.url, headers=AUTH) as client:
                done = wait_for("the import", lambda: ended(client, "LINKED"), timeout=90)
        finally:
            claimer.stop.set()
            claimer.join(10)
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        text = json.dumps(done)
        assert "SECRET" not in text and "Mallory" not in text  # the outside clip was not read
        assert "4242" not in "\n".join(summary["problems"])  # nor its size told
        assert summary["status"] == "needs_attention"
        assert summary["bookings"]["B8001"]["videos"] == ["MISC/GX000003.MP4"]
        assert len(summary["bookings"]["B8001"]["outputs"]) == 1
        for rel in ("DCIM/100GOPRO/GX000001.MP4", "DCIM/100GOPRO/GX000004.MP4"):
            problem = next(p for p in summary["problems"] if p.startswith(rel))
            assert "'LINKED-1/DCIM' is a symbolic link" in problem, problem
            assert str(tmp_path) not in problem  # no server path in what is reported
            assert done["data"][f"copied/{rel}"]["status"] == "refused"
        copies = {s["params"]["path"]: s for s in done["steps"] if s["name"] == "copy"}
        assert copies["DCIM/100GOPRO/GX000001.MP4"]["attempt"] == 1  # refused, not retried
        assert not [k for k in done["data"] if k.startswith("qr/DCIM")]  # nothing was scanned
        assert set(ledger_paths(settings)) == {"MISC/GX000002.MP4", "MISC/GX000003.MP4"}


def test_the_detector_writes_through_no_planted_link_and_says_why(
    tmp_path: Path, settings: Settings
) -> None:
    """A ``.NAME.part`` link planted in the share before the card comes: the real detector
    does not overwrite what it points to, answers ``ok: false`` naming it, and the rest of the
    card imports; a stale regular ``.part`` (an interrupted copy) is replaced."""
    with running_world(tmp_path, settings) as world:
        server, shared = world["server"], world["shared"]
        maker = CardMaker(world["cards"] / "PLANTED")
        qr = maker.qr("B8101;Per Pan")
        planted, stale = maker.video(), maker.video()
        card_id = sd_detector.card_id_of("PLANTED", sd_detector.list_card(maker.folder))
        victim = tmp_path / "victim.txt"
        victim.write_text("precious")
        folder = shared / card_id / "DCIM" / "100GOPRO"
        folder.mkdir(parents=True)
        planted_copy = shared / copy_in(card_id, maker.folder, planted)
        stale_copy = shared / copy_in(card_id, maker.folder, stale)
        assert planted_copy.parent == stale_copy.parent == folder
        link = folder / f".{planted_copy.name}.part"
        link.symlink_to(victim)
        (folder / f".{stale_copy.name}.part").write_bytes(b"half a copy")
        detector = Detector(server.url, world["watch"], shared, tmp_path / "det.log")
        world["detectors"].append(detector.start())
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            insert(maker.folder, world["watch"])
            done = wait_for(
                "the import", lambda: ended(client, "PLANTED"), timeout=90, detector=detector
            )
        assert victim.read_text() == "precious"
        assert link.is_symlink()  # left for a person to look at, not written through
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        assert summary["status"] == "needs_attention"
        assert summary["bookings"]["B8101"]["videos"] == [stale]
        problem = next(p for p in summary["problems"] if p.startswith(planted))
        assert f"'{card_id}/{Path(planted).parent}/.{planted_copy.name}.part'" in problem
        assert "symbolic link" in problem
        assert done["data"][f"copied/{planted}"]["status"] == "refused"
        assert stale_copy.read_bytes() == (maker.folder / stale).read_bytes()
        assert not (folder / f".{stale_copy.name}.part").exists()
        assert set(ledger_paths(settings)) == {qr, stale}


# -- the detector's copy, file by file (no service) -------------------------------------------


@pytest.fixture
def card(tmp_path: Path) -> sd_detector.Card:
    root = tmp_path / "CARD"
    (root / "DCIM").mkdir(parents=True)
    (root / "DCIM" / "a.MP4").write_bytes(b"a" * 300_000)
    files = sd_detector.list_card(root)
    return sd_detector.Card(root, "CARD", sd_detector.card_id_of("CARD", files), files)


def copy(
    card: sd_detector.Card, shared: Path, rel: str = "DCIM/a.MP4", dest: str = "C/DCIM/a.MP4"
) -> dict[str, Any]:
    source = card.root / "DCIM" / "a.MP4"
    result: dict[str, Any] = sd_detector.copy_file(
        card, rel, shared, dest, size=source.stat().st_size, fingerprint=file_fingerprint(source)
    )
    return result


def test_a_planted_part_link_is_never_written_through(
    tmp_path: Path, card: sd_detector.Card
) -> None:
    shared = tmp_path / "shared"
    (shared / "C" / "DCIM").mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (shared / "C" / "DCIM" / ".a.MP4.part").symlink_to(victim)
    result = copy(card, shared)
    assert result["ok"] is False and result["code"] == "refused", result
    assert "'C/DCIM/.a.MP4.part' is a symbolic link" in result["error"]
    assert str(tmp_path) not in result["error"]
    assert victim.read_bytes() == b"keep me"
    assert not (shared / "C" / "DCIM" / "a.MP4").exists()
    # A dangling link (to a file that does not exist yet) is not created through either.
    (shared / "C" / "DCIM" / ".a.MP4.part").unlink()
    (shared / "C" / "DCIM" / ".a.MP4.part").symlink_to(tmp_path / "would-be-created")
    assert copy(card, shared)["code"] == "refused"
    assert not (tmp_path / "would-be-created").exists()


def test_a_stale_part_file_is_replaced(tmp_path: Path, card: sd_detector.Card) -> None:
    shared = tmp_path / "shared"
    (shared / "C" / "DCIM").mkdir(parents=True)
    (shared / "C" / "DCIM" / ".a.MP4.part").write_bytes(b"x" * 10)
    result = copy(card, shared)
    assert result["ok"] is True, result
    assert (shared / "C" / "DCIM" / "a.MP4").read_bytes() == b"a" * 300_000
    assert not (shared / "C" / "DCIM" / ".a.MP4.part").exists()


def test_links_in_the_share_on_the_way_or_at_the_target_are_refused(
    tmp_path: Path, card: sd_detector.Card
) -> None:
    shared, elsewhere = tmp_path / "shared", tmp_path / "elsewhere"
    (elsewhere / "DCIM").mkdir(parents=True)
    shared.mkdir()
    (shared / "C").symlink_to(elsewhere, target_is_directory=True)
    result = copy(card, shared)
    assert result["code"] == "refused" and "'C' is a symbolic link" in result["error"]
    assert list(elsewhere.rglob("*")) == [elsewhere / "DCIM"]  # nothing written there
    (shared / "C").unlink()
    (shared / "C" / "DCIM").mkdir(parents=True)
    outside = elsewhere / "DCIM" / "a.MP4"
    outside.write_bytes(b"a" * 300_000)  # even a matching file: the link is not followed
    (shared / "C" / "DCIM" / "a.MP4").symlink_to(outside)
    result = copy(card, shared)
    assert result["code"] == "refused" and "'C/DCIM/a.MP4'" in result["error"], result
    assert (shared / "C" / "DCIM" / "a.MP4").is_symlink()


def test_the_card_side_follows_no_link_out_of_the_card(
    tmp_path: Path, card: sd_detector.Card
) -> None:
    shared = tmp_path / "shared"
    secret = tmp_path / "secret.mp4"
    secret.write_bytes(b"s" * 1000)
    (card.root / "DCIM" / "s.mp4").symlink_to(secret)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "o.mp4").write_bytes(b"o" * 1000)
    (card.root / "LINKED").symlink_to(tmp_path / "outside", target_is_directory=True)
    # Not listed ...
    assert [f["path"] for f in sd_detector.list_card(card.root)] == ["DCIM/a.MP4"]
    # ... and not copied when asked for all the same.
    for rel in ("DCIM/s.mp4", "LINKED/o.mp4"):
        result = sd_detector.copy_file(
            card, rel, shared, f"C/{rel}", size=1000, fingerprint=file_fingerprint(secret)
        )
        assert result["code"] == "refused", (rel, result)
        assert "symbolic link" in result["error"] and str(tmp_path) not in result["error"]
    assert not list(shared.rglob("*.mp4"))
    # A fifo where a file is expected is refused at once (not waited on).
    os.mkfifo(card.root / "DCIM" / "f.mp4")
    started = time.monotonic()
    result = sd_detector.copy_file(
        card, "DCIM/f.mp4", shared, "C/DCIM/f.mp4", size=1, fingerprint="0123456789"
    )
    assert result["code"] == "refused" and time.monotonic() - started < 5, result


def test_open_dir_beneath_and_fd_path(tmp_path: Path) -> None:
    """The two building blocks both sides use (``framepipe.confined``)."""
    from framepipe.confined import LinkRefusedError, fd_path, open_beneath, open_dir_beneath
    from framepipe.errors import InvalidInputError

    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "a").mkdir(parents=True)
    (root / "a" / "link").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(LinkRefusedError, match="'a/link' is a symbolic link"):
        open_dir_beneath(root, ("a", "link", "x"), make_dirs=True)
    assert list(elsewhere.iterdir()) == []
    for bad in (("..",), ("a", "."), ("a/b",), ("",)):
        with pytest.raises(InvalidInputError):
            open_dir_beneath(root, bad)
    fd = open_dir_beneath(root, ("a", "new", "deeper"), make_dirs=True)
    try:
        os.mkdir("made-here", dir_fd=fd)
        # Renaming the folder away does not move where the descriptor works.
        (root / "a" / "new").rename(root / "a" / "moved")
        assert (root / "a" / "moved" / "deeper" / "made-here").is_dir()
        os.rename("made-here", "renamed", src_dir_fd=fd, dst_dir_fd=fd)
        assert (root / "a" / "moved" / "deeper" / "renamed").is_dir()
    finally:
        os.close(fd)

    (root / "f.mp4").write_bytes(b"the real one")
    fd = open_beneath(root, ("f.mp4",))
    try:
        (root / "f.mp4").unlink()
        (elsewhere / "secret").write_bytes(b"secret")
        (root / "f.mp4").symlink_to(elsewhere / "secret")  # swapped after it was opened
        assert Path(fd_path(fd)).read_bytes() == b"the real one"
    finally:
        os.close(fd)
