"""A card folder swapped for a symbolic link (or another folder) after the detector saw it.

Whoever can write into the shared ``--watch`` folder (``/media/$USER`` of a shared machine, a
folder several users mount cards into) can, between the detector's check that a card is a
folder and the moment it lists or copies from it, rename the card's folder away and put a link
to any folder in its place (``/etc``, another user's home). The detector must then neither list
nor copy through it: the card's root is opened relative to the watch folder without following
a link, and must be the very folder (device and inode) the poll saw; every folder and file
below is reached from that open folder.

The swap is made deterministic by doing it at the exact point between the check and the open:
between the poll and the listing (a wrapper of ``list_card``), between the listing and a copy
(after the card was announced, and in the real import through a wrapper of ``copy_file``).
Real files, real links, the real detector code; the end-to-end test runs the service on
uvicorn with the ``sd_import`` pipeline and the detector's own loop in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import need_modules
from framepipe.jobs.ledger import file_fingerprint
from test_example_sd_import import (
    EXAMPLE,
    SMALL_LIMIT,
    CardMaker,
    ended,
    ledger_paths,
    running_world,
    sd_settings,
    wait_for,
)
from test_server import AUTH, TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")

sys.path.insert(0, str(EXAMPLE))
import detector as sd_detector  # noqa: E402  (examples/sd_import/detector.py)


def make_card(folder: Path) -> None:
    (folder / "DCIM" / "100GOPRO").mkdir(parents=True)
    (folder / "DCIM" / "100GOPRO" / "GX000001.MP4").write_bytes(b"a" * 300_000)
    (folder / "DCIM" / "100GOPRO" / "GX000002.MP4").write_bytes(b"b" * 200_000)


def detector_for(watch: Path, shared: Path, **options: Any) -> sd_detector.Detector:
    return sd_detector.Detector(
        backend="ws://127.0.0.1:9/unused",
        shared=shared,
        token=None,
        watch=[watch],
        cards=[],
        detector_id="t",
        interval=options.pop("interval", 0.01),
        settle=0,
        **options,
    )


def polls(detector: sd_detector.Detector, until: Callable[[], bool], at_least: int = 1) -> None:
    """Run the detector's watch loop (its real polls) until ``until()`` holds, and for at
    least ``at_least`` listings of cards."""
    listed = [0]
    real = sd_detector.list_card

    def counting(*args: Any, **kwargs: Any) -> Any:
        listed[0] += 1
        return real(*args, **kwargs)

    async def run() -> None:
        task = asyncio.create_task(detector.watch_cards())
        try:
            for _ in range(2000):
                if (until() and listed[0] >= at_least) or task.done():
                    break
                await asyncio.sleep(0.01)
            assert not task.done(), task.exception()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    sd_detector.list_card = counting
    try:
        asyncio.run(run())
    finally:
        sd_detector.list_card = real


def swap_for_link(card: Path, target: Path) -> Path:
    """The neighbour's move: the card's folder renamed away, a link to ``target`` in its
    place. Returns where the real card went."""
    away = card.parent.parent / f".away-{card.name}"
    card.rename(away)
    card.symlink_to(target, target_is_directory=True)
    return away


def swap_for_folder(card: Path, other: Path) -> Path:
    """The same with another real folder renamed into the card's place."""
    away = card.parent.parent / f".away-{card.name}"
    card.rename(away)
    other.rename(card)
    return away


def files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


@pytest.mark.parametrize("swap", [swap_for_link, swap_for_folder], ids=["link", "folder"])
def test_a_card_folder_swapped_after_it_was_listed_is_not_copied_from(
    tmp_path: Path, swap: Callable[[Path, Path], Path]
) -> None:
    """The card was seen and listed; then its folder is swapped for a link to another user's
    folder holding files that match the listing (or that folder itself is renamed into its
    place): the copy is refused naming the card, nothing lands in the shared folder."""
    watch, shared = tmp_path / "media", tmp_path / "shared"
    watch.mkdir()
    shared.mkdir()
    make_card(watch / "GOPRO1")
    other = tmp_path / "home" / "someone-else"
    shutil.copytree(watch / "GOPRO1", other)  # the same names, sizes and content
    (other / "private.txt").write_text("not yours")
    detector = detector_for(watch, shared)
    polls(detector, lambda: watch / "GOPRO1" in detector.cards)
    card = detector.cards[watch / "GOPRO1"]
    assert [f["path"] for f in card.files] == [
        "DCIM/100GOPRO/GX000001.MP4",
        "DCIM/100GOPRO/GX000002.MP4",
    ]

    swap(watch / "GOPRO1", other)  # after the check, before the open

    entry = card.files[0]
    result = sd_detector.copy_file(
        card,
        entry["path"],
        shared,
        f"{card.card_id}/{entry['path']}",
        size=entry["size"],
        fingerprint=entry["fingerprint"],
    )
    assert result["ok"] is False, result
    assert card.card_id in result["error"], result
    if swap is swap_for_link:
        assert result["code"] == "refused", result
        assert "symbolic link" in result["error"], result
    else:
        assert result["code"] == "not_mounted", result
        assert "not the folder that was listed" in result["error"], result
    assert str(tmp_path) not in result["error"].replace(str(watch / "GOPRO1"), "")
    assert files_in(shared) == []


def test_a_card_folder_swapped_for_a_link_between_the_poll_and_the_listing_is_not_listed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The poll saw ``GOPRO1`` as a folder; before it is listed, it becomes a link to another
    user's folder: nothing of that folder is listed or announced; the listing's failure is
    logged naming the card, and at the next poll the link is named as not a card."""
    watch, shared = tmp_path / "media", tmp_path / "shared"
    watch.mkdir()
    make_card(watch / "GOPRO1")
    other = tmp_path / "home" / "someone-else"
    (other / "DCIM").mkdir(parents=True)
    (other / "DCIM" / "tax-return.mp4").write_bytes(b"t" * 1000)
    real = sd_detector.list_card
    swapped: list[Path] = []

    def list_card(root: Path, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if root.name == "GOPRO1" and not swapped:
            swapped.append(swap_for_link(root, other))  # after the poll's check
        return real(root, *args, **kwargs)

    monkeypatch.setattr(sd_detector, "list_card", list_card)
    detector = detector_for(watch, shared)
    announced: list[sd_detector.Card] = []

    async def announce(card: sd_detector.Card) -> None:
        announced.append(card)

    monkeypatch.setattr(detector, "_announce", announce)
    with caplog.at_level(logging.WARNING, logger="sd_detector"):
        polls(detector, lambda: "is a link, not a card" in caplog.text, at_least=1)
    assert swapped
    assert announced == [] and detector.cards == {}, [c.files for c in announced]
    assert f"card at {watch / 'GOPRO1'} could not be listed" in caplog.text
    assert "'GOPRO1' is a symbolic link" in caplog.text
    assert "tax-return" not in caplog.text


class InProcessDetector:
    """The real ``Detector`` (its watch loop, connection and copier) on an event loop in a
    thread of this process, so that a test can wrap its functions."""

    def __init__(self, detector: sd_detector.Detector) -> None:
        self.detector = detector
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.main: asyncio.Task[Any] | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.main = asyncio.current_task()
        self.task = asyncio.create_task(self.detector.run())
        self.started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task

    def __enter__(self) -> InProcessDetector:
        self.thread.start()
        assert self.started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(20)
        self.thread.join(20)

    async def _stop(self) -> None:
        """Cancel the detector's tasks (its watch loop, connection and copier) and wait for
        them, before the loop closes."""
        assert self.task is not None
        tasks = asyncio.all_tasks() - {asyncio.current_task(), self.main}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def test_the_import_refuses_a_card_swapped_for_a_link_and_copies_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: the service imports a card; when the detector is asked for the first copy,
    the card's folder has just become a link to another user's folder holding the very same
    files. The import completes with the copy refused, the problem names the card and the
    link, nothing is copied into the shared folder and nothing is recorded as imported."""
    settings = sd_settings(tmp_path, home=tmp_path / "home-fp")
    with running_world(tmp_path, settings) as world:
        server, watch, shared = world["server"], world["watch"], world["shared"]
        maker = CardMaker(watch / "GOPRO1")
        qr = maker.qr("B9001;Vera Vik")
        video = maker.video()
        other = tmp_path / "users" / "someone-else"
        shutil.copytree(maker.folder, other)  # what the link leads to matches the listing
        assert os.path.getsize(other / qr) < SMALL_LIMIT
        real = sd_detector.copy_file
        swapped: list[Path] = []

        def copy_file(card: sd_detector.Card, *args: Any, **kwargs: Any) -> dict[str, Any]:
            if not swapped:  # after the detector's checks, before the copy opens the card
                swapped.append(swap_for_link(card.root, other))
            result: dict[str, Any] = real(card, *args, **kwargs)
            return result

        monkeypatch.setattr(sd_detector, "copy_file", copy_file)
        detector = sd_detector.Detector(
            backend=f"{server.url.replace('http', 'ws')}/ws/detector",
            shared=shared,
            token=TOKEN,
            watch=[watch],
            cards=[],
            detector_id="in-process",
            interval=600,  # one poll: the link is met by the copy, not by a later poll
            settle=0,
            max_backoff=0.3,
        )
        with InProcessDetector(detector), httpx.Client(base_url=server.url, headers=AUTH) as c:
            done = wait_for("the import", lambda: ended(c, "GOPRO1"), timeout=90)
        assert swapped
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        card_id = summary["card_id"]
        assert summary["status"] == "needs_attention", summary
        assert summary["copied"] == [] and summary["bookings"] == {}
        problem = next(p for p in summary["problems"] if p.startswith(qr))
        assert "the detector refused the copy" in problem, problem
        assert card_id in problem and "symbolic link" in problem, problem
        assert done["data"][f"copied/{qr}"]["status"] == "refused"
        assert summary["held"] == [{"path": video, "reason": summary["held"][0]["reason"]}]
        assert files_in(shared) == []
        assert ledger_paths(settings) == {}
        assert file_fingerprint(other / qr) == file_fingerprint(swapped[0] / qr)


def test_a_card_folder_replaced_between_polls_is_taken_as_removed_and_listed_anew(
    tmp_path: Path,
) -> None:
    """Between two polls the card's folder becomes another folder of the same name (a card
    mounted again, or a neighbour's folder renamed into its place): the first card is
    removed (its copies answer ``not_mounted``), the folder there now is listed as what it
    is."""
    watch, shared = tmp_path / "media", tmp_path / "shared"
    watch.mkdir()
    make_card(watch / "GOPRO1")
    detector = detector_for(watch, shared)
    polls(detector, lambda: watch / "GOPRO1" in detector.cards)
    before = detector.cards[watch / "GOPRO1"]
    other = tmp_path / "other"
    (other / "DCIM").mkdir(parents=True)
    (other / "DCIM" / "GX000009.MP4").write_bytes(b"n" * 5000)
    swap_for_folder(watch / "GOPRO1", other)
    polls(
        detector,
        lambda: (
            watch / "GOPRO1" in detector.cards and detector.cards[watch / "GOPRO1"] is not before
        ),
    )
    after = detector.cards[watch / "GOPRO1"]
    assert before.removed and not after.removed
    assert [f["path"] for f in after.files] == ["DCIM/GX000009.MP4"]
    assert after.identity != before.identity and after.watched
    entry = before.files[0]
    result = sd_detector.copy_file(
        before, entry["path"], shared, "x/a.MP4", size=entry["size"], fingerprint="0" * 16
    )
    assert result["code"] == "not_mounted", result
    assert files_in(shared) == []


def test_open_root_opens_the_folder_itself_and_walks_from_it(tmp_path: Path) -> None:
    """``framepipe.confined.open_root``: the last segment is not followed when it is a link,
    the identity is checked, and walks from its descriptor stay in that folder whatever is put
    at its name later."""
    from framepipe.confined import (
        LinkRefusedError,
        RootChangedError,
        folder_identity,
        open_beneath,
        open_dir_beneath,
        open_root,
    )

    parent = tmp_path / "media"
    (parent / "CARD" / "DCIM").mkdir(parents=True)
    (parent / "CARD" / "DCIM" / "a.mp4").write_bytes(b"the card's")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "DCIM").mkdir(parents=True)
    (elsewhere / "DCIM" / "a.mp4").write_bytes(b"someone else's")
    seen = folder_identity(os.stat(parent / "CARD", follow_symlinks=False))

    fd = open_root(parent / "CARD", identity=seen)
    try:
        swap_for_link(parent / "CARD", elsewhere)  # after it was opened
        with os.fdopen(open_beneath(fd, ("DCIM", "a.mp4")), "rb") as f:
            assert f.read() == b"the card's"
        inner = open_dir_beneath(fd, ("DCIM",))
        try:
            assert sorted(os.listdir(inner)) == ["a.mp4"]
        finally:
            os.close(inner)
        assert os.fstat(fd).st_ino == seen[1]  # the walks left it open
    finally:
        os.close(fd)

    # Now the name is a link: refused, not followed; followed only when asked to.
    with pytest.raises(LinkRefusedError, match="'CARD' is a symbolic link"):
        open_root(parent / "CARD", where="the card CARD")
    fd = open_root(parent / "CARD", follow=True)
    try:
        assert folder_identity(os.fstat(fd)) == folder_identity(os.stat(elsewhere))
    finally:
        os.close(fd)
    # Another folder at the name, or followed to one: not the folder that was checked.
    (parent / "CARD").unlink()
    elsewhere.rename(parent / "CARD")
    with pytest.raises(RootChangedError, match="not the folder it was when it was checked"):
        open_root(parent / "CARD", identity=seen)
    (parent / "CARD").rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError):
        open_root(parent / "CARD")
