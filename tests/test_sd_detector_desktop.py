"""The detector's life on a desktop. Stopped the way a service manager stops it (SIGTERM,
systemd's ``stop``), it ends at once with status 0 and says nothing alarming: an operator
reads an ``ERROR`` with a ``RuntimeError`` in the detector's journal as a crash, and it hid
the real ones.

An empty folder in its watch folder (a mount point before or after its card) is no card.

Real components: the service on uvicorn (SQLite) with the ``sd_import`` hub, the detector as
its own process connected to it, with and without a card in its reader.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest

from conftest import need_modules
from test_example_sd_import import (
    EXAMPLE,
    CardMaker,
    Detector,
    ended,
    imports_of,
    insert,
    sqlite_settings,
    wait_for,
    world,
)
from test_server import AUTH

__all__ = ["sqlite_settings", "world"]  # the fixtures, shared with the example's tests

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # slow: the detector as a process

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")


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


def test_an_empty_folder_in_the_watch_folder_is_no_card_until_files_appear(
    world: dict[str, Any],
) -> None:
    """A desktop's automounter makes ``/media/$USER/LABEL`` before it mounts the card there,
    and a lazy unmount leaves it empty behind: an empty folder is no card (no session, no
    import that finds nothing), and the card mounted on it is announced once and imported."""
    server = world["server"]
    mount_point = world["watch"] / "GOPRO9"
    mount_point.mkdir()
    log = world["tmp"] / "det.log"
    detector = Detector(server.url, world["watch"], world["shared"], log).start()
    world["detectors"].append(detector)
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        wait_for("the detector", lambda: client.get("/api/detectors").json(), detector=detector)
        time.sleep(1.5)  # several polls (--interval 0.2) of the empty folder
        assert [d["sessions"] for d in client.get("/api/detectors").json()] == [[]]
        assert imports_of(client, "GOPRO9") == []
        assert "inserted" not in log.read_text()

        maker = CardMaker(world["cards"] / "GOPRO9")
        maker.qr("B9201;Mo Unt")
        video = maker.video()
        (maker.folder / "DCIM").rename(mount_point / "DCIM")  # the card mounted there
        done = wait_for("the import", lambda: ended(client, "GOPRO9"), detector=detector)
        assert done["data"]["summary"]["status"] == "imported"
        assert done["data"]["summary"]["bookings"]["B9201"]["videos"] == [video]
        assert len(imports_of(client, "GOPRO9")) == 1


def test_a_failed_copy_is_a_warning_in_the_detectors_log_not_copied(
    world: dict[str, Any],
) -> None:
    """The operator at the reader reads the detector's log: a copy that failed (here the video
    vanished from the card after the listing) is a WARNING naming the file, the code and why,
    never an INFO line starting ``copied``."""
    server = world["server"]
    maker = CardMaker(world["cards"] / "VANISH")
    maker.qr("B9401;Van Ish")
    kept = maker.video()
    gone = maker.video()
    log = world["tmp"] / "det.log"
    detector = Detector(
        server.url, world["watch"], world["shared"], log, "--max-rate", "400000"
    ).start()
    world["detectors"].append(detector)
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        mounted = insert(maker.folder, world["watch"])
        wait_for("the listing", lambda: "inserted" in log.read_text(), detector=detector)
        (mounted / gone).unlink()  # listed, then gone before its copy (videos copy last)
        done = wait_for("the import", lambda: ended(client, "VANISH"), detector=detector)
        assert done["data"]["summary"]["bookings"]["B9401"]["missing"] == [gone]
        wait_for("the final status", lambda: "needs_attention" in log.read_text())
    said = log.read_text()
    assert f"copied {kept}: ok" in said
    assert f"WARNING copy of {gone} failed (vanished): {gone} is no longer on the card" in said
    assert f"copied {gone}" not in said
    # The final status names each problem, so the reader's operator sees it without a browser.
    card_id = done["data"]["summary"]["card_id"]
    assert f"WARNING card {card_id}: {gone}: vanished from the card before it was copied" in said


def test_a_wrong_token_or_backend_url_is_told_in_one_line(world: dict[str, Any]) -> None:
    """What a first setup gets wrong: a token that is not the backend's, none at all, or the
    backend's http:// address. Each ends the detector with one line that says what to fix, no
    traceback."""
    server = world["server"]
    ws_url = f"{server.url.replace('http', 'ws')}/ws/detector"

    def run(*args: str) -> tuple[int, str]:
        done = subprocess.run(
            [
                sys.executable,
                str(EXAMPLE / "detector.py"),
                "--watch",
                str(world["watch"]),
                "--shared",
                str(world["shared"]),
                *args,
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
            env={k: v for k, v in os.environ.items() if k != "FRAMEPIPE_API_TOKEN"},
        )
        assert "Traceback" not in done.stderr, done.stderr
        return done.returncode, done.stderr

    code, said = run("--backend", ws_url, "--token", "not-the-backends-token")
    assert code == 1
    assert "the token is not the backend's FRAMEPIPE_API_TOKEN" in said
    code, said = run("--backend", ws_url)
    assert code == 1
    assert "no token was given (--token, FRAMEPIPE_API_TOKEN)" in said
    code, said = run("--backend", f"{server.url}/ws/detector", "--token", "x" * 20)
    assert code == 2
    assert "give the backend's detector WebSocket, ws://HOST:PORT/ws/detector" in said
