"""An import the backend stopped under (killed mid-import, restarted) is finished, not lost.

What the user expects: the restarted backend resumes it by itself; inserting the card again
hands that import the new insertion's session and it goes on from where it stopped,
whichever detector session it was started with (here the detector was restarted and the card
re-seated while the backend was down, so the first session is gone); every video is rendered
once, the card gets no second, empty import, and the detector is told the import's final
status. A detector restarted with a card in its reader that has nothing new starts no import.

Real components: ``examples/sd_import/backend.py`` as its own process (SQLite state, local
object store) killed with SIGKILL, the detector as its own process, clips encoded with PyAV
and QR codes from segno.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import REDIS_URL, need_modules, redis_namespace
from test_example_sd_import import (
    CLI_TOKEN,
    EXAMPLE,
    CardMaker,
    Detector,
    eject,
    ended,
    imports_of,
    insert,
    wait_for,
)
from waiting import free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]  # slow: the SD-import example end to end

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")

AUTH = {"Authorization": f"Bearer {CLI_TOKEN}"}


class Backend:
    """``backend.py`` as a process on ``port``, its state under ``home``."""

    def __init__(self, tmp: Path, shared: Path, port: int, **env: str) -> None:
        self.tmp, self.shared, self.port = tmp, shared, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "FRAMEPIPE_HOME": str(tmp / "home"),
            "FRAMEPIPE_API_TOKEN": CLI_TOKEN,
            "FRAMEPIPE_RETRY_INITIAL_DELAY": "0.2",
            "FRAMEPIPE_RETRY_MAX_DELAY": "1",
            "FRAMEPIPE_HEARTBEAT_INTERVAL": "0.2",
            "PYTHONUNBUFFERED": "1",
            **env,
        }

    def start(self) -> Backend:
        with (self.tmp / "backend.log").open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    str(EXAMPLE / "backend.py"),
                    *("--shared", str(self.shared), "--port", str(self.port)),
                    *("--small-limit", "150KiB"),
                ],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc = self.proc

        def up() -> bool:
            try:
                return httpx.get(f"{self.url}/health").status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None  # died: stop waiting, fail below

        wait_for("the backend", up)
        assert proc.poll() is None, (self.tmp / "backend.log").read_text()[-3000:]
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def a_video_copied(client: httpx.Client, card: str) -> bool:
    """Whether the newest import of ``card`` has copied a video (a QR clip aside)."""
    rows = imports_of(client, card)
    if not rows:
        return False
    body = client.get(f"/api/executions/{rows[0]['id']}").json()
    return any(
        s["name"] == "copy" and s["params"].get("video") and s["status"] == "completed"
        for s in body["steps"]
    )


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[dict[str, Any]]:
    watch, shared = tmp_path / "media", tmp_path / "shared"
    watch.mkdir()
    shared.mkdir()
    backend = Backend(tmp_path, shared, free_port())
    detectors: list[Detector] = []
    try:
        yield {
            "tmp": tmp_path,
            "watch": watch,
            "shared": shared,
            "backend": backend,
            "detectors": detectors,
        }
    finally:
        for detector in detectors:
            detector.stop()
        backend.stop()


def test_reinserting_a_card_resumes_the_import_a_killed_backend_left(
    setup: dict[str, Any],
) -> None:
    tmp, watch, shared, backend = setup["tmp"], setup["watch"], setup["shared"], setup["backend"]
    maker = CardMaker(tmp / "cards" / "CRASH")
    maker.qr("B6101;Ola Ode")
    videos = [maker.video() for _ in range(4)]
    backend.start()
    log = tmp / "det.log"

    def detector() -> Detector:
        started = Detector(backend.url, watch, shared, log, "--max-rate", "250000", token=CLI_TOKEN)
        setup["detectors"].append(started.start())
        return started

    first_detector = detector()
    with httpx.Client(base_url=backend.url, headers=AUTH) as client:
        mounted = insert(maker.folder, watch)

        wait_for("a video's copy", lambda: a_video_copied(client, "CRASH"), detector=first_detector)
        [stopped] = imports_of(client, "CRASH")
    # The backend dies mid-import; meanwhile the detector restarts and the card is re-seated,
    # so the session the import was started with is gone for good.
    backend.kill()
    first_detector.stop()
    eject(mounted)
    backend.start()
    second_detector = detector()
    with httpx.Client(base_url=backend.url, headers=AUTH) as client:
        insert(maker.folder, watch)

        def resumed_and_ended() -> dict[str, Any] | None:
            body = ended(client, "CRASH")  # listed interrupted, it may be running by now
            unended = ("interrupted", "pending", "running")
            return body if body is not None and body["status"] not in unended else None

        done = wait_for(
            "the resumed import",
            resumed_and_ended,
            timeout=120,
            detector=second_detector,
        )
        assert [row["id"] for row in imports_of(client, "CRASH")] == [stopped["id"]]
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        assert summary["status"] == "imported"
        assert summary["bookings"]["B6101"]["videos"] == videos
        assert len(summary["bookings"]["B6101"]["outputs"]) == 4
        renders = [s for s in done["steps"] if s["name"] == "render"]
        assert len(renders) == 4 and all(s["status"] == "completed" for s in renders)
        card_id = summary["card_id"]
        text = log.read_text()
        # The restarted backend resumed the import itself, or the insertion did: either way
        # the insertion was answered with that import, not a new one.
        assert (
            f"status of {card_id}: already_importing {stopped['id']}" in text
            or f"status of {card_id}: importing {stopped['id']}" in text
        ), text
        wait_for(
            "the final status at the detector",
            lambda: f"status of {card_id}: imported {stopped['id']}" in log.read_text(),
            detector=second_detector,
        )


def test_a_restarted_backend_resumes_the_import_it_stopped_under_by_itself(
    setup: dict[str, Any],
) -> None:
    """An operator restarts the backend mid-import (SIGINT: the import is ``interrupted``);
    the detector keeps running, the card stays in its reader. The restarted backend resumes
    the import without the card being inserted again, through the detector's reconnected
    session, and it completes: every video rendered once, one import."""
    tmp, watch, shared, backend = setup["tmp"], setup["watch"], setup["shared"], setup["backend"]
    maker = CardMaker(tmp / "cards" / "STAY")
    maker.qr("B6301;Uno Ulm")
    videos = [maker.video() for _ in range(4)]
    backend.start()
    log = tmp / "det.log"
    detector = Detector(backend.url, watch, shared, log, "--max-rate", "250000", token=CLI_TOKEN)
    setup["detectors"].append(detector.start())
    with httpx.Client(base_url=backend.url, headers=AUTH) as client:
        insert(maker.folder, watch)

        wait_for("a video's copy", lambda: a_video_copied(client, "STAY"), detector=detector)
        [stopped] = imports_of(client, "STAY")
    backend.stop()
    backend.start()
    with httpx.Client(base_url=backend.url, headers=AUTH) as client:

        def completed() -> dict[str, Any] | None:
            body = ended(client, "STAY")
            return body if body is not None and body["status"] == "completed" else None

        done = wait_for(
            "the import resumed and completed", completed, timeout=120, detector=detector
        )
        assert [row["id"] for row in imports_of(client, "STAY")] == [stopped["id"]]
        summary = done["data"]["summary"]
        assert summary["status"] == "imported"
        assert summary["bookings"]["B6301"]["videos"] == videos
        renders = [s for s in done["steps"] if s["name"] == "render"]
        assert len(renders) == 4 and all(s["status"] == "completed" for s in renders)


def test_a_detector_restarted_with_imported_cards_in_its_reader_starts_no_import(
    setup: dict[str, Any],
) -> None:
    tmp, watch, shared, backend = setup["tmp"], setup["watch"], setup["shared"], setup["backend"]
    maker = CardMaker(tmp / "cards" / "KEPT")
    maker.qr("B6201;Pia Pil")
    maker.video()
    backend.start()
    log = tmp / "det.log"
    first = Detector(backend.url, watch, shared, log, token=CLI_TOKEN)
    setup["detectors"].append(first.start())
    with httpx.Client(base_url=backend.url, headers=AUTH) as client:
        insert(maker.folder, watch)
        done = wait_for("the import", lambda: ended(client, "KEPT"), detector=first)
        assert done["data"]["summary"]["status"] == "imported"
        card_id = done["data"]["summary"]["card_id"]
        first.stop()
        lines = log.read_text().count(f"status of {card_id}:")
        again = Detector(backend.url, watch, shared, log, token=CLI_TOKEN)
        setup["detectors"].append(again.start())
        wait_for(
            "the restarted detector's answer",
            lambda: log.read_text().count(f"status of {card_id}:") > lines,
            detector=again,
        )
        assert f"status of {card_id}: nothing_new" in log.read_text()
        assert len(imports_of(client, "KEPT")) == 1  # no empty import for the restart


def test_a_backend_killed_and_restarted_at_once_under_workers_neither_stalls_nor_doubles(
    tmp_path: Path,
) -> None:
    """Steps on ``framepipe worker`` processes; the backend relaying a copy to the detector is
    killed and started again at once (its heartbeat on Redis has not expired yet), then the
    detector restarts and announces the card again. The copy the dead backend was relaying
    fails at once and is retried (it waited for its answer timeout, 12 minutes, before); the
    card's import is found running and answered ``already_importing`` (a second import copied
    and rendered everything again before); the one import completes."""
    watch, shared = tmp_path / "media", tmp_path / "shared"
    watch.mkdir()
    shared.mkdir()
    with redis_namespace("fp-sd-") as namespace:
        values = {
            "FRAMEPIPE_DATABASE_URL": f"sqlite:///{tmp_path / 'state.db'}",
            "FRAMEPIPE_BROKER_URL": REDIS_URL,
            "FRAMEPIPE_BROKER_NAMESPACE": namespace,
            "FRAMEPIPE_JOBS_MODE": "workers",
            "FRAMEPIPE_LEASE_SECONDS": "3",
            "FRAMEPIPE_SWEEP_INTERVAL": "0.2",
            "FRAMEPIPE_SHUTDOWN_GRACE": "2",
        }
        backend = Backend(tmp_path, shared, free_port(), **values)
        workers = []
        for n in range(2):
            with (tmp_path / f"worker{n}.log").open("wb") as out:
                workers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "framepipe", "worker", "-c", "3"],
                        env=backend.env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=tmp_path,
                    )
                )
        log = tmp_path / "det.log"
        detectors: list[Detector] = []

        def detector() -> Detector:
            started = Detector(
                backend.url, watch, shared, log, "--max-rate", "100000", token=CLI_TOKEN
            )
            detectors.append(started.start())
            return started

        try:
            maker = CardMaker(tmp_path / "cards" / "DOUBLE")
            maker.qr("B6301;Rob Rune")
            videos = [maker.video(), maker.video()]
            backend.start()
            first = detector()
            insert(maker.folder, watch)
            wait_for(
                "a video's copy",
                lambda: f"copying {videos[0]} of DOUBLE" in log.read_text(),
                detector=first,
            )
            backend.kill()
            backend.start()  # at once: the earlier run's heartbeat is still on Redis
            first.stop()
            again = detector()
            with httpx.Client(base_url=backend.url, headers=AUTH) as client:
                [started] = imports_of(client, "DOUBLE")
                wait_for(
                    "the answer to the card announced again",
                    lambda: f"already_importing {started['id']}" in log.read_text(),
                    detector=again,
                )
                done = wait_for(
                    "the import", lambda: ended(client, "DOUBLE"), timeout=120, detector=again
                )
                assert done["status"] == "completed", done.get("error")
                summary = done["data"]["summary"]
                assert summary["status"] == "imported"
                assert summary["bookings"]["B6301"]["videos"] == videos
                assert len(imports_of(client, "DOUBLE")) == 1  # no second import
                renders = [s for s in done["steps"] if s["name"] == "render"]
                assert [s["attempt"] for s in renders] == [1, 1]  # none rendered twice
        finally:
            for started in detectors:
                started.stop()
            backend.stop()
            for proc in workers:
                proc.terminate()
            for proc in workers:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
