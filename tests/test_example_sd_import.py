"""The SD-card import example (``examples/sd_import/``) end to end.

Real components only: the service (uvicorn on loopback, SQLite state, local object store) with
the detector hub and the ``sd_import`` pipeline, the detector as its own process watching a
folder whose subfolders play SD cards (clips encoded with PyAV, QR codes made with segno and
read back with zxing-cpp), and a WebSocket client watching ``pipeline:progress``. Without
segno or zxing-cpp the tests skip with the reason, except under ``CI=true``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path, PureWindowsPath
from typing import Any

import av
import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import REDIS_URL, need_modules, redis_namespace, service_missing
from framepipe.backends.state import StateStore, steps
from framepipe.config import Settings
from framepipe.jobs.ledger import Ledger, file_fingerprint
from framepipe.jobs.loading import load_pipeline
from media import make_qr_clip
from test_server import AUTH, TOKEN, Server
from waiting import free_port, wait_until

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sd_import"
CLI_TOKEN = "sd-import-command-token"  # what backend.py's settings accept (16+ characters)
SMALL_LIMIT = 160_000  # QR clips are ~100 KB, jump videos larger (checked as made)

# slow: the SD-import example end to end: its backend, detector and workers
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")

sys.path.insert(0, str(EXAMPLE))
import backend as sd_backend  # noqa: E402  (examples/sd_import/backend.py)
from card_paths import copy_dest  # noqa: E402  (examples/sd_import/card_paths.py)
from retention import RENDERED  # noqa: E402  (examples/sd_import/retention.py)

# -- cards -----------------------------------------------------------------------------------


def jump_clip(path: Path, seed: int, frames: int = 25) -> Path:
    """A 160x120 H.264 clip of noise (larger than the QR-candidate limit)."""
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(25))
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "12"}
        for i in range(frames):
            image = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


class CardMaker:
    """Files of one card, numbered and timed in the order they are added (GoPro-like names)."""

    def __init__(self, folder: Path, start: float = 1_700_000_000.0) -> None:
        self.folder = folder
        self.dcim = folder / "DCIM" / "100GOPRO"
        self.dcim.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.clock = start

    def _next(self) -> Path:
        self.n += 1
        return self.dcim / f"GX{self.n:06d}.MP4"

    def _stamp(self, path: Path) -> str:
        self.clock += 60
        os.utime(path, (self.clock, self.clock))
        return path.relative_to(self.folder).as_posix()

    def qr(self, *texts: str, damage: bool = False) -> str:
        """A QR clip of 8 frames showing each text in turn (two: two codes in one clip)."""
        path = make_qr_clip(
            self._next(), [(t, 8 // len(texts)) for t in texts], size=(320, 288), damage=damage
        )
        assert path.stat().st_size < SMALL_LIMIT
        return self._stamp(path)

    def video(self, *, small: bool = False) -> str:
        path = jump_clip(self._next(), seed=self.n, frames=2 if small else 25)
        assert (path.stat().st_size < SMALL_LIMIT) == small
        return self._stamp(path)

    def not_a_video(self, size: int = 300_000) -> str:
        """A file named like the others that holds no video (random bytes: a recording cut
        short, a damaged file), larger than the QR-candidate limit unless ``size`` says."""
        path = self._next()
        path.write_bytes(np.random.default_rng(self.n).bytes(size))
        return self._stamp(path)


def copy_in(card_id: str, card: Path, path: str) -> str:
    """Where the copy of the file ``path`` of the card folder ``card`` lands in the shared
    folder (relative to it): ``<card_id>/<folders>/<stem>-<hash><suffix>``."""
    file = card / path
    return copy_dest(card_id, path, file.stat().st_size, file_fingerprint(file))


def insert(card: Path, watch: Path) -> Path:
    """Put a copy of ``card`` under ``watch`` in one rename (as a mount appears at once)."""
    staging = watch.parent / f".staging-{card.name}"
    shutil.copytree(card, staging)  # copy2: mtimes kept
    return Path(shutil.move(str(staging), str(watch / card.name)))


def eject(mounted: Path) -> None:
    gone = mounted.parent.parent / f".ejected-{mounted.name}-{time.monotonic_ns()}"
    mounted.rename(gone)
    shutil.rmtree(gone)


# -- running it ------------------------------------------------------------------------------


class Watcher:
    """A WebSocket client on ``/ws`` collecting every message in a thread."""

    def __init__(self, url: str) -> None:
        self.messages: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.url = f"{url.replace('http', 'ws')}/ws?token={TOKEN}"
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the WebSocket did not connect"

    def _run(self) -> None:
        with ws_connect(self.url) as ws:
            self.ready.set()
            while not self.stop.is_set():
                try:
                    raw = ws.recv(timeout=0.1)
                except TimeoutError:
                    continue
                except Exception:
                    return
                with self.lock:
                    self.messages.append(json.loads(raw))

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if m.get("type") == kind]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


class Detector:
    """examples/sd_import/detector.py as a process: watching ``watch`` (``--watch``), or with
    ``card=True`` taking ``watch`` as one ``--card`` folder (a drive letter on Windows)."""

    def __init__(
        self,
        url: str,
        watch: Path,
        shared: Path,
        log: Path,
        *extra: str,
        token: str = TOKEN,
        card: bool = False,
    ) -> None:
        self.args = [
            sys.executable,
            str(EXAMPLE / "detector.py"),
            "--card" if card else "--watch",
            str(watch),
            "--backend",
            f"{url.replace('http', 'ws')}/ws/detector",
            "--shared",
            str(shared),
            "--token",
            token,
            "--detector-id",
            "test-host",
            "--interval",
            "0.2",
            "--settle",
            "0",
            "--max-backoff",
            "0.3",
            *extra,
        ]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Detector:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT)
        out.close()
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(what: str, check: Any, timeout: float = 60, detector: Detector | None = None) -> Any:
    """Poll ``check()`` until it returns something truthy (the test's own patience, not an
    assertion about speed); fails with ``what`` and the detector's log."""
    explain = (lambda: detector.log.read_text()[-3000:]) if detector is not None else None
    return wait_until(what, check, timeout, explain=explain)


def executions(client: httpx.Client) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = client.get(
        "/api/executions", params={"pipeline": "sd_import"}
    ).json()
    return sorted(rows, key=lambda r: r["created_at"])


def finished(client: httpx.Client, n: int) -> dict[str, Any] | None:
    """The ``n``-th execution (1-based) with its steps once it ended, else None."""
    rows = executions(client)
    if len(rows) < n or rows[n - 1]["status"] in ("pending", "running"):
        return None
    body: dict[str, Any] = client.get(f"/api/executions/{rows[n - 1]['id']}").json()
    return body


def sd_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """The example's settings in these tests: home and SQLite state under ``tmp_path``, short
    retries and heartbeats, 4 steps at once; ``overrides`` on top."""
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "database_url": f"sqlite:///{tmp_path / 'state.db'}",
        "retry_initial_delay": 0.2,
        "retry_max_delay": 1.0,
        "heartbeat_interval": 0.2,
        "shutdown_grace": 2.0,
        "concurrency": 4,
    }
    return Settings(**{**values, **overrides})


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return sd_settings(tmp_path)


@contextlib.contextmanager
def running_world(
    tmp_path: Path, settings: Settings, **hub_options: Any
) -> Iterator[dict[str, Any]]:
    """The service with the sd_import hub (``hub_options`` go to ``make_hub``), a card folder
    to watch, a shared folder, and a WebSocket watching progress."""
    watch, shared, cards = tmp_path / "media", tmp_path / "shared", tmp_path / "cards"
    for folder in (watch, shared, cards):
        folder.mkdir()
    pipeline = load_pipeline(sd_backend.PIPELINE_REF)
    hub = sd_backend.make_hub(
        pipeline, shared_dir=shared, small_limit=SMALL_LIMIT, reconnect_wait=20, **hub_options
    )
    with Server(settings, pipelines=(pipeline,), detector_hub=hub) as server:
        watcher = Watcher(server.url)
        detectors: list[Detector] = []
        try:
            yield {
                "server": server,
                "watch": watch,
                "shared": shared,
                "cards": cards,
                "watcher": watcher,
                "settings": settings,
                "detectors": detectors,
                "tmp": tmp_path,
            }
        finally:
            for d in detectors:
                d.stop()
            watcher.close()


@pytest.fixture
def world(tmp_path: Path, sqlite_settings: Settings) -> Iterator[dict[str, Any]]:
    with running_world(tmp_path, sqlite_settings) as running:
        yield running


def ledger_paths(settings: Settings) -> dict[str, dict[str, Any]]:
    with StateStore(settings.resolved_database_url) as store:
        return {e.meta["path"]: e.meta for e in Ledger(store, "sd_import").entries()}


# -- the tests -------------------------------------------------------------------------------


@pytest.fixture
def any_db_world(tmp_path: Path, database_url: str) -> Iterator[dict[str, Any]]:
    """``world`` on each state backend in turn (SQLite, the real PostgreSQL)."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=database_url,
        retry_initial_delay=0.2,
        retry_max_delay=1.0,
        heartbeat_interval=0.2,
        shutdown_grace=2.0,
        concurrency=4,
    )
    with running_world(tmp_path, settings) as running:
        yield running


def test_import_renders_each_jump_and_a_reinsert_copies_only_what_is_new(
    any_db_world: dict[str, Any],
) -> None:
    world = any_db_world
    server, watcher = world["server"], world["watcher"]
    maker = CardMaker(world["cards"] / "GOPRO1")
    qr1 = maker.qr('{"booking_id": "B1001", "passenger": "Anna Svensson"}')
    v1a, v1b = maker.video(), maker.video()
    qr2 = maker.qr("B1002;Bo Berg")
    v2a = maker.video()
    v2b = maker.video(small=True)  # a short clip: copied with the QR candidates, then rendered
    detector = Detector(server.url, world["watch"], world["shared"], world["tmp"] / "det.log")
    world["detectors"].append(detector.start())

    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        mounted = insert(maker.folder, world["watch"])
        first = wait_for("the first import", lambda: finished(client, 1), detector=detector)
        assert first["status"] == "completed", first.get("error")
        summary = first["data"]["summary"]
        assert summary["status"] == "imported"
        assert sorted(summary["copied"]) == sorted([qr1, v1a, v1b, qr2, v2a, v2b])
        assert summary["bookings"]["B1001"]["passenger"] == "Anna Svensson"
        assert summary["bookings"]["B1001"]["videos"] == [v1a, v1b]
        assert summary["bookings"]["B1002"]["videos"] == [v2a, v2b]
        assert summary["held"] == [] and summary["problems"] == []

        # QR candidates are copied (and read) before the rest is asked for.
        steps = first["steps"]
        copies = [s for s in steps if s["name"] == "copy"]
        small = [s for s in copies if not s["params"].get("video")]
        large = [s for s in copies if s["params"].get("video")]
        assert {s["params"]["path"] for s in small} == {qr1, qr2, v2b}
        assert {s["params"]["path"] for s in large} == {v1a, v1b, v2a}
        assert max(s["finished_at"] for s in small) <= min(s["started_at"] for s in large)
        for chain in (small, large):  # one copy at a time: each waits for the one before
            chain.sort(key=lambda s: s["started_at"])
            assert all(a["finished_at"] <= b["started_at"] for a, b in itertools.pairwise(chain))
        names = [s["name"] for s in steps]
        assert names.count("extract_metadata") == 4 and names.count("render") == 4
        # A video's processing waits for its own copy only, never for later ones: rendering
        # can run while the rest of the card is still copying.
        by_key = {s["key"]: s for s in steps}
        copy_of = {s["params"]["path"]: s["key"] for s in copies}
        for render in (s for s in steps if s["name"] == "render"):
            (meta_key,) = render["depends_on"]
            assert by_key[meta_key]["name"] == "extract_metadata"
            own = (
                []
                if render["params"]["path"] in {qr1, qr2, v2b}
                else [copy_of[render["params"]["path"]]]
            )
            assert by_key[meta_key]["depends_on"] == own

        # Rendered: intro (1 s) + the watermarked video (25 frames) + splash (1 s).
        for key in (
            summary["bookings"]["B1001"]["outputs"] + summary["bookings"]["B1002"]["outputs"][:1]
        ):
            assert key.startswith(("bookings/B1001/", "bookings/B1002/"))
            got = client.get(f"/api/objects/{key}")
            assert got.status_code == 200
            video = world["tmp"] / "out.mp4"
            video.write_bytes(got.content)
            with av.open(str(video)) as container:
                frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
            assert len(frames) == 75
            assert frames[0][:, :, 0].mean() > frames[0][:, :, 2].mean() + 30  # dark blue card
        assert set(ledger_paths(world["settings"])) == {qr1, v1a, v1b, qr2, v2a, v2b}
        card_id = summary["card_id"]
        assert sorted(
            p.relative_to(world["shared"]).as_posix()
            for p in world["shared"].rglob("*")
            if p.is_file()
        ) == sorted(copy_in(card_id, maker.folder, p) for p in (qr1, v1a, v1b, qr2, v2a, v2b))
        for path in (qr1, v1a, v1b, qr2, v2a, v2b):  # each copy named by its content's hash
            assert first["data"][f"copied/{path}"]["dest"] == copy_in(card_id, maker.folder, path)
            assert re.fullmatch(
                rf"{card_id}/DCIM/100GOPRO/{Path(path).stem}-[0-9a-f]{{12}}\.MP4",
                first["data"][f"copied/{path}"]["dest"],
            )

        # Progress of every step and of the whole execution reached the browser's socket.
        progress = [m for m in watcher.of("pipeline:progress") if m["execution_id"] == first["id"]]
        assert any(
            m["step_key"]
            and m["step_key"].startswith("render:")
            and 0 < (m["step_progress"] or 0) < 100
            for m in progress
        )
        assert any(m["step_key"] and m["step_key"].startswith("copy:") for m in progress)
        overall = [m["progress"] for m in progress if m["progress"] is not None]
        assert overall == sorted(overall) and overall[-1] == 100.0

        # The same card again: nothing is copied.
        eject(mounted)
        wait_for(
            "the card's removal",
            lambda: not any(d["sessions"] for d in client.get("/api/detectors").json()),
            detector=detector,
        )
        mounted = insert(maker.folder, world["watch"])
        second = wait_for("the second import", lambda: finished(client, 2), detector=detector)
        assert second["status"] == "completed", second.get("error")
        assert second["data"]["summary"]["status"] == "nothing_new"
        assert second["data"]["summary"]["copied"] == []
        assert [s["name"] for s in second["steps"] if s["name"] == "copy"] == []

        # One new jump on the card: only that jump is copied and rendered.
        eject(mounted)
        wait_for(
            "the card's removal",
            lambda: not any(d["sessions"] for d in client.get("/api/detectors").json()),
            detector=detector,
        )
        qr3 = maker.qr("B1003;Cleo Lind")
        v3a = maker.video()
        insert(maker.folder, world["watch"])
        third = wait_for("the third import", lambda: finished(client, 3), detector=detector)
        assert third["status"] == "completed", third.get("error")
        summary = third["data"]["summary"]
        assert sorted(summary["copied"]) == sorted([qr3, v3a])
        assert list(summary["bookings"]) == ["B1003"]
        assert summary["bookings"]["B1003"]["videos"] == [v3a]
        assert len(summary["bookings"]["B1003"]["outputs"]) == 1
        assert set(ledger_paths(world["settings"])) == {qr1, v1a, v1b, qr2, v2a, v2b, qr3, v3a}


def test_videos_of_one_booking_with_the_same_file_name_each_keep_their_own_object(
    world: dict[str, Any],
) -> None:
    """Cameras restart their numbering: one card holds ``100GOPRO/GX000002.MP4`` and
    ``101GOPRO/GX000002.MP4``, and a second camera's card for the same jump holds its own
    ``DCIM/100GOPRO/GX000002.MP4``. Every one of these passenger videos gets its own object
    (the file's name and its identity hash) and is in the store as rendered: none replaces
    another while the summary says imported."""
    server = world["server"]
    booking = '{"booking_id": "B1", "passenger": "Ann"}'
    one = CardMaker(world["cards"] / "GOPRO1")
    one.qr(booking)
    a = one.video()  # DCIM/100GOPRO/GX000002.MP4
    other = one.folder / "DCIM" / "101GOPRO"
    other.mkdir()
    jump_clip(other / "GX000002.MP4", seed=99)  # same name, another folder and content
    b = one._stamp(other / "GX000002.MP4")
    two = CardMaker(world["cards"] / "GOPRO2")  # the second camera on the same jump
    two.qr(booking)
    jump_clip(two.dcim / "GX000002.MP4", seed=123)
    c = two._stamp(two.dcim / "GX000002.MP4")
    assert a == c == "DCIM/100GOPRO/GX000002.MP4" and b == "DCIM/101GOPRO/GX000002.MP4"
    detector = Detector(server.url, world["watch"], world["shared"], world["tmp"] / "det.log")
    world["detectors"].append(detector.start())

    renders: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        for maker, label, videos in ((one, "GOPRO1", [a, b]), (two, "GOPRO2", [c])):
            insert(maker.folder, world["watch"])
            done = wait_for(
                f"the import of {label}", lambda card=label: ended(client, card), 120, detector
            )
            assert done["status"] == "completed", done.get("error")
            summary = done["data"]["summary"]
            assert summary["status"] == "imported", summary
            assert summary["bookings"]["B1"]["videos"] == videos
            for video in videos:
                dest = done["data"][f"copied/{video}"]["dest"]
                assert dest == copy_in(summary["card_id"], maker.folder, video)
                renders[dest] = done["data"][f"render/{video}"]
            assert summary["bookings"]["B1"]["outputs"] == [
                done["data"][f"render/{v}"]["key"] for v in videos
            ]

        keys = [r["key"] for r in renders.values()]
        assert len(set(keys)) == 3, keys  # three passenger videos, three objects
        for key in keys:
            assert re.fullmatch(r"bookings/B1/GX000002-[0-9a-f]{12}\.mp4", key), key
        assert len({r["sha256"] for r in renders.values()}) == 3  # three different renders
        for copy, render in renders.items():
            got = client.get(f"/api/objects/{render['key']}")
            assert got.status_code == 200, (copy, got.text)
            assert hashlib.sha256(got.content).hexdigest() == render["sha256"], copy
    # Retention finds each copy's own object.
    with StateStore(world["settings"].resolved_database_url) as store:
        rendered = {e.identity: e.meta["object_key"] for e in Ledger(store, RENDERED).entries()}
    assert rendered == {copy: render["key"] for copy, render in renders.items()}


_inputs: dict[str, dict[str, Any]] = {}  # execution id -> its inputs (they never change)


def imports_of(client: httpx.Client, label: str) -> list[dict[str, Any]]:
    """Executions of the card labelled ``label``, oldest first, each with its ``inputs``
    (listings do not carry inputs: they are read once per execution)."""
    out = []
    for row in executions(client):
        if row["id"] not in _inputs:
            _inputs[row["id"]] = client.get(f"/api/executions/{row['id']}").json()["inputs"]
        if _inputs[row["id"]].get("label") == label:
            out.append({**row, "inputs": _inputs[row["id"]]})
    return out


def ended(client: httpx.Client, label: str, n: int = 1) -> dict[str, Any] | None:
    rows = imports_of(client, label)
    if len(rows) < n or rows[n - 1]["status"] in ("pending", "running"):
        return None
    body: dict[str, Any] = client.get(f"/api/executions/{rows[n - 1]['id']}").json()
    return body


def test_bad_cards_give_clear_statuses_and_lose_nothing(world: dict[str, Any]) -> None:
    server, watcher, shared = world["server"], world["watcher"], world["shared"]
    bad = CardMaker(world["cards"] / "BAD")
    v0 = bad.video()  # no QR clip before it
    qr_x = bad.qr("B2000;Xavier Durand", damage=True)  # unreadable
    v1 = bad.video()
    qr_a, qr_b = bad.qr("B2001;Ann"), bad.qr("B2002;Ben")  # two bookings for one jump
    v2 = bad.video()
    qr_c, qr_c2 = bad.qr("B2003;Cid"), bad.qr("B2003;Cid")  # the same code filmed twice
    v3, v4 = bad.video(), bad.video()  # one vanishes, one is interrupted
    qr_m = bad.qr("B2004;Ida", "B2005;Jon")  # two codes in one clip
    v6 = bad.video()
    qr_d = bad.qr("hello world")  # a QR code that is no booking
    v5 = bad.video()
    noqr = CardMaker(world["cards"] / "NOQR")
    noqr.n = 100  # its own clip: the same content as BAD's first would be left to BAD's import
    lone = noqr.video()
    log = world["tmp"] / "det.log"
    detector = Detector(server.url, world["watch"], shared, log, "--max-rate", "250000")
    world["detectors"].append(detector.start())

    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        mounted = insert(bad.folder, world["watch"])
        insert(noqr.folder, world["watch"])

        nothing = wait_for(
            "the import of the card without QR clip",
            lambda: ended(client, "NOQR"),
            detector=detector,
        )
        assert nothing["status"] == "completed", nothing.get("error")
        summary = nothing["data"]["summary"]
        assert summary["status"] == "needs_attention"
        assert summary["held"] == [{"path": lone, "reason": "no QR clip before it"}]
        assert summary["copied"] == [] and summary["bookings"] == {}

        # While one of the two videos of B2003 copies, the other vanishes from the card ...
        def copying() -> str | None:
            for m in watcher.of("pipeline:progress"):
                for path in (v3, v4):
                    if m.get("message") == f"copying {path}":
                        return path
            return None

        first = wait_for("a copy of a video of B2003", copying, detector=detector)
        gone = v4 if first == v3 else v3
        (mounted / gone).unlink()
        # ... and the detector dies in the middle of that copy.
        detector.kill()
        running = imports_of(client, "BAD")[0]
        card_id = running["inputs"]["card_id"]
        final = shared / copy_in(card_id, bad.folder, first)
        part = final.parent / f".{final.name}.part"
        assert not final.exists()  # a partial copy never has the final name ...
        assert part.exists()
        assert first not in ledger_paths(world["settings"])  # ... nor counts as imported
        retrying = wait_for(
            "the interrupted copy's retry",
            lambda: [
                m
                for m in watcher.of("event")
                if m["event"]["type"] == "step.retrying"
                and f"disconnected while the backend waited for the copy of {first}"
                in m["event"]["data"].get("error", "")
            ],
            detector=detector,
        )
        assert "test-host" in retrying[0]["event"]["data"]["error"]

        # Meanwhile: the same card from another detector, a malformed list, a wrong token.
        twin_url = f"{server.url.replace('http', 'ws')}/ws/detector"
        with ws_connect(twin_url, additional_headers=AUTH) as twin:
            twin.send(json.dumps({"type": "detector:hello", "detector_id": "twin"}))
            assert json.loads(twin.recv(10))["type"] == "detector:welcome"
            twin.send(
                json.dumps(
                    {
                        "type": "sd:file_list",
                        "session_id": "twin-1",
                        "card_id": card_id,
                        "label": "BAD",
                        "files": running["inputs"]["files"],
                    }
                )
            )
            status = json.loads(twin.recv(10))
            assert status == {
                "type": "sd:status",
                "session_id": "twin-1",
                "card_id": card_id,
                "state": "already_importing",
                "execution_id": running["id"],
            }
            twin.send(
                json.dumps(
                    {
                        "type": "sd:file_list",
                        "session_id": "twin-2",
                        "card_id": "X",
                        "files": [
                            {
                                "path": "../../etc/passwd",
                                "size": 1,
                                "mtime": 0,
                                "fingerprint": "0123456789",
                            }
                        ],
                    }
                )
            )
            error = json.loads(twin.recv(10))
            assert error["type"] == "error"
            assert "files[0].path" in error["detail"] and "'..' segment" in error["detail"]
            twin.send(
                json.dumps(
                    {"type": "sd:file_list", "session_id": "twin-3", "card_id": "..", "files": []}
                )
            )
            assert "card_id" in json.loads(twin.recv(10))["detail"]
            twin.send("{not json")
            assert json.loads(twin.recv(10))["detail"].startswith("not JSON")
            twin.send(json.dumps({"type": "sd:eject_all"}))
            assert "unknown message type 'sd:eject_all'" in json.loads(twin.recv(10))["detail"]
        with pytest.raises(InvalidStatus, match="403"):  # closed before it is accepted
            ws_connect(f"{twin_url}?token=wrong")
        assert len(imports_of(client, "BAD")) == 1

        # The detector comes back: the retried copy reaches it and the import completes.
        detector = Detector(server.url, world["watch"], shared, log)
        world["detectors"].append(detector.start())
        done = wait_for(
            "the import of the bad card", lambda: ended(client, "BAD"), detector=detector
        )
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        assert summary["status"] == "needs_attention"
        assert summary["bookings"] == {
            "B2003": {
                "passenger": "Cid",
                "videos": [first],
                "missing": [gone],
                "not_rendered": [],
                "outputs": [done["data"][f"render/{first}"]["key"]],
            }
        }
        first_key = done["data"][f"render/{first}"]["key"]
        assert re.fullmatch(rf"bookings/B2003/{Path(first).stem}-[0-9a-f]{{12}}\.mp4", first_key)
        assert [h["path"] for h in summary["held"]] == [v0, v1, v2, v6, v5]
        reasons = [h["reason"] for h in summary["held"]]
        assert reasons[0] == "no QR clip before it"
        assert reasons[1] == f"after {qr_x}, which holds a QR code that cannot be read"
        assert reasons[2] == f"after two QR clips of different bookings ({qr_a}, {qr_b})"
        assert reasons[3] == (f"after {qr_m}, which holds several QR codes (B2004;Ida, B2005;Jon)")
        assert reasons[4].startswith(f"after {qr_d}, which holds a QR code that is no booking")
        problems = "\n".join(summary["problems"])
        assert f"{gone}: vanished from the card before it was copied" in problems
        assert f"{qr_x}: a QR code that cannot be read" in problems
        assert "two QR clips of different bookings" in problems
        assert "'hello world'" in problems
        copy_of_first = next(
            s for s in done["steps"] if s["name"] == "copy" and s["params"]["path"] == first
        )
        assert copy_of_first["attempt"] >= 2 and copy_of_first["status"] == "completed"

        # Imported: the readable QR clips and the one video; held and vanished files are not,
        # so the next insertion tries them again. No partial file is left.
        imported = set(ledger_paths(world["settings"]))
        assert imported - {qr_c, qr_c2} == {qr_a, qr_b, first}
        assert len(imported & {qr_c, qr_c2}) == 1  # byte-identical clips: one identity
        assert final.is_file() and not part.exists()
        assert not (shared / copy_in(card_id, bad.folder, gone)).exists()
        assert not list(shared.rglob("*.part"))


def test_a_failed_render_is_retried_from_that_step_without_copying_again(
    tmp_path: Path, sqlite_settings: Settings
) -> None:
    intro = tmp_path / "assets" / "intro.mp4"  # missing at first
    with running_world(tmp_path, sqlite_settings, extra_inputs={"intro": str(intro)}) as world:
        server = world["server"]
        maker = CardMaker(world["cards"] / "RETRY")
        maker.qr("B3001;Dana Holm")
        videos = [maker.video(), maker.video()]
        detector = Detector(server.url, world["watch"], world["shared"], world["tmp"] / "det.log")
        world["detectors"].append(detector.start())
        with httpx.Client(base_url=server.url, headers=AUTH) as client:
            insert(maker.folder, world["watch"])
            failed = wait_for("the import", lambda: ended(client, "RETRY"), detector=detector)
            assert failed["status"] == "failed"
            assert str(intro) in failed["error"]
            renders = [s for s in failed["steps"] if s["name"] == "render"]
            assert any(s["status"] == "failed" for s in renders)
            copies = {s["key"]: s for s in failed["steps"] if s["name"] == "copy"}
            assert len(copies) == 3 and all(s["status"] == "completed" for s in copies.values())

            intro.parent.mkdir()
            jump_clip(intro, seed=99, frames=10)
            retried = client.post(f"/api/executions/{failed['id']}/retry")
            assert retried.status_code == 202, retried.text
            done = wait_for("the retried import", lambda: ended(client, "RETRY"), detector=detector)
            assert done["status"] == "completed", done.get("error")
            summary = done["data"]["summary"]
            assert summary["status"] == "imported"
            assert summary["bookings"]["B3001"]["videos"] == videos
            assert len(summary["bookings"]["B3001"]["outputs"]) == 2
            for step in done["steps"]:
                if step["name"] == "copy":  # nothing was copied again
                    assert step["attempt"] == copies[step["key"]]["attempt"] == 1
            assert any(s["name"] == "render" and s["attempt"] == 2 for s in done["steps"])
            key = summary["bookings"]["B3001"]["outputs"][0]
            (tmp_path / "out.mp4").write_bytes(client.get(f"/api/objects/{key}").content)
            with av.open(str(tmp_path / "out.mp4")) as container:
                assert sum(1 for _ in container.decode(video=0)) == 10 + 25 + 25


def test_steps_run_on_workers_through_redis(tmp_path: Path, database_url: str) -> None:
    """``framepipe worker`` processes run every step; copies reach the detector through the
    service's hub over Redis. SQLite and PostgreSQL alike."""
    with redis_namespace("fp-sd-") as namespace:
        values: dict[str, Any] = {
            "home": tmp_path / "home",
            "database_url": database_url,
            "broker_url": REDIS_URL,
            "broker_namespace": namespace,
            "jobs_mode": "workers",
            "lease_seconds": 3.0,
            "sweep_interval": 0.2,
            "retry_initial_delay": 0.2,
            "retry_max_delay": 1.0,
            "shutdown_grace": 2.0,
        }
        settings = Settings(**values)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            **{f"FRAMEPIPE_{k.upper()}": str(v) for k, v in values.items()},
        }
        procs = []
        for n in range(2):
            with (tmp_path / f"worker{n}.log").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "framepipe", "worker", "-c", "3"],
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=tmp_path,
                    )
                )
        try:
            with running_world(tmp_path, settings) as world:
                server = world["server"]
                maker = CardMaker(world["cards"] / "WORKERS")
                qr = maker.qr("B4001;Eva Ek")
                videos = [maker.video(), maker.video()]
                log = world["tmp"] / "det.log"
                detector = Detector(
                    server.url, world["watch"], world["shared"], log, "--max-rate", "250000"
                )
                world["detectors"].append(detector.start())
                with httpx.Client(base_url=server.url, headers=AUTH) as client:
                    insert(maker.folder, world["watch"])
                    # The detector dies mid-copy: the worker's step hears it through Redis.
                    wait_for(
                        "a video's copy",
                        lambda: [
                            m
                            for m in world["watcher"].of("pipeline:progress")
                            if m.get("message") == f"copying {videos[0]}"
                        ],
                        detector=detector,
                    )
                    detector.kill()
                    wait_for(
                        "the copy's retry on a worker",
                        lambda: [
                            m
                            for m in world["watcher"].of("event")
                            if m["event"]["type"] == "step.retrying"
                            and "DetectorUnavailableError: detector 'test-host': disconnected "
                            f"while the backend waited for the copy of {videos[0]}"
                            in m["event"]["data"].get("error", "")
                        ],
                        detector=detector,
                    )
                    detector = Detector(server.url, world["watch"], world["shared"], log)
                    world["detectors"].append(detector.start())
                    done = wait_for(
                        "the import on workers",
                        lambda: ended(client, "WORKERS"),
                        timeout=90,
                        detector=detector,
                    )
                    assert done["status"] == "completed", done.get("error")
                    summary = done["data"]["summary"]
                    assert summary["status"] == "imported"
                    assert sorted(summary["copied"]) == sorted([qr, *videos])
                    assert summary["bookings"]["B4001"]["videos"] == videos
                    assert len(summary["bookings"]["B4001"]["outputs"]) == 2

                    def progress() -> list[dict[str, Any]]:
                        return [
                            m
                            for m in world["watcher"].of("pipeline:progress")
                            if m["execution_id"] == done["id"]
                        ]

                    last = wait_for(
                        "the execution's last progress",
                        lambda: [m for m in progress() if m["step_key"] is None],
                    )
                    assert last[0]["progress"] == 100.0
                    assert any((m["step_key"] or "").startswith("render:") for m in progress())
                with StateStore(settings.resolved_database_url) as store, store.read() as conn:
                    ran_on = set(
                        conn.execute(
                            sa.select(steps.c.worker).where(steps.c.execution_id == done["id"])
                        ).scalars()
                    )
                assert None not in ran_on and ran_on  # every step ran on a worker
                assert len(ledger_paths(settings)) == 3
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_the_dashboard_shows_the_detector_its_card_and_the_import(world: dict[str, Any]) -> None:
    chromium = Path("/usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        service_missing("playwright (pip install playwright)", exc)
    if not chromium.exists():
        service_missing("Debian's chromium", FileNotFoundError(str(chromium)))
    server = world["server"]
    maker = CardMaker(world["cards"] / "SHOWCARD")
    maker.qr("B5001;Fia Falk")
    maker.video()
    detector = Detector(server.url, world["watch"], world["shared"], world["tmp"] / "det.log")
    world["detectors"].append(detector.start())
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        wait_for("the detector", lambda: client.get("/api/detectors").json(), detector=detector)
        insert(maker.folder, world["watch"])
        wait_for("the import", lambda: ended(client, "SHOWCARD"), detector=detector)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(chromium),
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.goto(f"{server.url}/?token={TOKEN}")
            page.wait_for_selector('#detectors li[data-detector="test-host"]')
            assert "SHOWCARD" in page.inner_text("#detectors")
            page.wait_for_selector(".exec")
            assert "sd_import" in page.inner_text("#executions")
            page.screenshot(path=str(world["tmp"] / "dashboard.png"), full_page=True)
        finally:
            browser.close()


# -- the detector's own rules (no service needed) ----------------------------------------------


def test_detector_lists_cards_and_refuses_paths_outside_them(tmp_path: Path) -> None:
    import detector as sd_detector  # examples/sd_import/detector.py

    card = tmp_path / "GOPRO"
    (card / "DCIM").mkdir(parents=True)
    (card / "DCIM" / "a.MP4").write_bytes(b"a" * 1000)
    (card / "DCIM" / ".hidden.mp4").write_bytes(b"x")
    (card / "DCIM" / "notes.txt").write_text("x")
    (card / "System Volume Information").mkdir()
    (card / "System Volume Information" / "b.mp4").write_bytes(b"b")
    os.utime(card / "DCIM" / "a.MP4", (1000, 1000))
    files = sd_detector.list_card(card)
    assert [f["path"] for f in files] == ["DCIM/a.MP4"]
    card_id = sd_detector.card_id_of("GOPRO", files)
    (card / "DCIM" / "b.MP4").write_bytes(b"b" * 10)
    os.utime(card / "DCIM" / "b.MP4", (2000, 2000))
    assert sd_detector.card_id_of("GOPRO", sd_detector.list_card(card)) == card_id  # stable
    assert sd_detector.card_id_of("OTHER", files) != card_id
    assert sd_detector.card_label(PureWindowsPath("E:\\")) == "E"  # a drive root has no name
    assert sd_detector.card_label(PureWindowsPath("E:\\DCIM")) == "DCIM"

    entry = next(f for f in sd_detector.list_card(card) if f["path"] == "DCIM/b.MP4")
    found = sd_detector.Card(card, "GOPRO", card_id, files)
    shared = tmp_path / "shared"
    shared.mkdir()  # the share is never created by a copy (it may be a mount point)
    for rel, dest in (
        ("../secret.mp4", "x/a.mp4"),
        ("DCIM/b.MP4", "../../etc/x"),
        ("/etc/passwd", "x"),
        ("DCIM\\b.MP4", "x"),
    ):
        refused = sd_detector.copy_file(
            found, rel, shared, dest, size=10, fingerprint=entry["fingerprint"]
        )
        assert refused["code"] == "refused", rel
    changed = sd_detector.copy_file(
        found, "DCIM/b.MP4", shared, "c/b.MP4", size=11, fingerprint=entry["fingerprint"]
    )
    assert changed["code"] == "changed" and not (shared / "c" / "b.MP4").exists()
    assert not list(shared.rglob("*.part"))
    ok = sd_detector.copy_file(
        found, "DCIM/b.MP4", shared, "c/b.MP4", size=10, fingerprint=entry["fingerprint"]
    )
    assert ok["ok"] and (shared / "c" / "b.MP4").read_bytes() == b"b" * 10
    again = sd_detector.copy_file(
        found, "DCIM/b.MP4", shared, "c/b.MP4", size=10, fingerprint=entry["fingerprint"]
    )
    assert again == {**ok, "already": True}  # a verified copy is not made twice
    (card / "DCIM" / "b.MP4").unlink()
    gone = sd_detector.copy_file(
        found, "DCIM/b.MP4", shared, "d/b.MP4", size=10, fingerprint=entry["fingerprint"]
    )
    assert gone["code"] == "vanished"


def test_the_backend_restarting_mid_import_resumes_with_a_retry(
    tmp_path: Path, sqlite_settings: Settings
) -> None:
    watch, shared, cards = tmp_path / "media", tmp_path / "shared", tmp_path / "cards"
    for folder in (watch, shared, cards):
        folder.mkdir()
    pipeline = load_pipeline(sd_backend.PIPELINE_REF)

    def serve(port: int | None = None) -> Server:
        hub = sd_backend.make_hub(
            pipeline, shared_dir=shared, small_limit=SMALL_LIMIT, reconnect_wait=20
        )
        return Server(sqlite_settings, pipelines=(pipeline,), port=port, detector_hub=hub)

    maker = CardMaker(cards / "RESTART")
    maker.qr("B6001;Gus Gran")
    videos = [maker.video(), maker.video()]
    first = serve().__enter__()
    second: Server | None = None
    detector = Detector(first.url, watch, shared, tmp_path / "det.log", "--max-rate", "250000")
    detector.start()
    try:
        with httpx.Client(base_url=first.url, headers=AUTH) as client:
            insert(maker.folder, watch)

            def copying_a_video() -> bool:
                rows = imports_of(client, "RESTART")
                if not rows:
                    return False
                body = client.get(f"/api/executions/{rows[0]['id']}").json()
                return any(
                    s["name"] == "copy"
                    and s["params"].get("video")
                    and s["status"] == "running"
                    and s["progress"] > 0
                    for s in body["steps"]
                )

            wait_for("a video's copy", copying_a_video, detector=detector)
        first.__exit__(None, None, None)  # the backend stops in the middle of it
        second = serve(port=first.port).__enter__()
        with httpx.Client(base_url=second.url, headers=AUTH) as client:
            stopped = imports_of(client, "RESTART")[0]
            assert stopped["status"] == "interrupted", stopped
            wait_for(
                "the detector to reconnect",
                lambda: client.get("/api/detectors").json(),
                detector=detector,
            )
            retried = client.post(f"/api/executions/{stopped['id']}/retry")
            assert retried.status_code == 202, retried.text
            done = wait_for(
                "the resumed import", lambda: ended(client, "RESTART"), detector=detector
            )
            assert done["status"] == "completed", done.get("error")
            summary = done["data"]["summary"]
            assert summary["status"] == "imported"
            assert summary["bookings"]["B6001"]["videos"] == videos
            assert len(summary["bookings"]["B6001"]["outputs"]) == 2
            assert len(imports_of(client, "RESTART")) == 1  # resumed, not started again
        assert len(ledger_paths(sqlite_settings)) == 3
        assert not list(shared.rglob("*.part"))
    finally:
        detector.stop()
        (second or first).__exit__(None, None, None)


def test_a_worker_asking_a_stopped_service_is_told_at_once() -> None:
    """``get_hub`` on a worker gives a RemoteDetectorHub; with no service holding the hub (no
    heartbeat on Redis) a request fails at once, naming the hub, instead of waiting."""
    import asyncio

    from framepipe.errors import DetectorUnavailableError
    from framepipe.server.detector import RemoteDetectorHub, get_hub

    with redis_namespace("fp-sd-") as namespace:
        settings = Settings(broker_url=REDIS_URL, broker_namespace=namespace)
        hub = get_hub("nobody", settings)
        assert isinstance(hub, RemoteDetectorHub)
        with pytest.raises(DetectorUnavailableError, match="hub nobody is not running"):
            asyncio.run(
                hub.request(
                    "s1", {"type": "sd:copy_request", "path": "a.mp4"}, what="the copy of a.mp4"
                )
            )
    with pytest.raises(DetectorUnavailableError, match="no Redis broker"):
        get_hub("nobody", Settings(broker_url="memory://"))


def test_the_backend_runs_as_a_command(tmp_path: Path) -> None:
    """``python examples/sd_import/backend.py`` and ``detector.py`` as their README runs them
    (with a token the settings accept: at least 16 characters)."""
    watch, shared = tmp_path / "media", tmp_path / "shared"
    watch.mkdir()
    shared.mkdir()  # the share, mounted: neither side creates it unless told
    port = free_port()
    env = {
        **os.environ,
        "FRAMEPIPE_HOME": str(tmp_path / "home"),
        "FRAMEPIPE_API_TOKEN": CLI_TOKEN,
        "PYTHONUNBUFFERED": "1",
    }
    with (tmp_path / "backend.log").open("wb") as out:
        backend = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE / "backend.py"),
                "--shared",
                str(shared),
                "--port",
                str(port),
                "--small-limit",
                "150KiB",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    detector = Detector(url, watch, shared, tmp_path / "det.log", token=CLI_TOKEN)
    try:

        def up() -> bool:
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                return backend.poll() is not None  # died: stop waiting, fail below

        wait_for("the backend", up)
        assert backend.poll() is None, (tmp_path / "backend.log").read_text()
        detector.start()
        maker = CardMaker(tmp_path / "cards" / "CLI")
        maker.qr("B7001;Hugo Hall")
        video = maker.video()
        insert(maker.folder, watch)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {CLI_TOKEN}"}) as client:
            done = wait_for("the import", lambda: ended(client, "CLI"), detector=detector)
            assert done["status"] == "completed", done.get("error")
            assert done["data"]["summary"]["bookings"]["B7001"]["videos"] == [video]
            key = done["data"]["summary"]["bookings"]["B7001"]["outputs"][0]
            assert client.get(f"/api/objects/{key}").status_code == 200
            assert client.get("/api/detectors").json()[0]["detector_id"] == "test-host"
    finally:
        detector.stop()
        backend.send_signal(signal.SIGINT)
        try:
            backend.wait(timeout=20)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()


def test_a_card_folder_given_with_card_imports_each_insertion(world: dict[str, Any]) -> None:
    """``detector.py --card DIR`` (the README's form for Windows, ``--card E:\\``): the folder
    is a card while it exists and holds files. A card appearing there is imported; taken out,
    it is removed; the same card back with a new jump copies only that jump."""
    server = world["server"]
    reader = world["tmp"] / "E"  # the card reader's drive: no folder while no card is in it
    maker = CardMaker(world["cards"] / "GOPRO1")
    maker.qr("B8001;Ines Ito")
    first = maker.video()
    detector = Detector(
        server.url, reader, world["shared"], world["tmp"] / "det.log", card=True
    ).start()
    world["detectors"].append(detector)

    def mount() -> None:  # the card's files appear at the reader's path at once
        staging = world["tmp"] / ".staging-E"
        shutil.copytree(maker.folder, staging)
        staging.rename(reader)

    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        mount()
        done = wait_for("the first import", lambda: ended(client, "E"), detector=detector)
        assert done["status"] == "completed", done.get("error")
        summary = done["data"]["summary"]
        assert summary["status"] == "imported", summary
        assert summary["card_id"].startswith("E-")
        assert summary["bookings"]["B8001"]["videos"] == [first]
        assert len(summary["bookings"]["B8001"]["outputs"]) == 1
        assert client.get("/api/detectors").json()[0]["sessions"][0]["label"] == "E"

        taken_out = reader.rename(world["tmp"] / ".taken-out")  # the drive goes at once
        shutil.rmtree(taken_out)
        wait_for(
            "the card's removal",
            lambda: not any(d["sessions"] for d in client.get("/api/detectors").json()),
            detector=detector,
        )
        maker.qr("B8002;Jan Jul")
        second = maker.video()
        mount()
        again = wait_for("the second import", lambda: ended(client, "E", 2), detector=detector)
        assert again["status"] == "completed", again.get("error")
        summary = again["data"]["summary"]
        assert summary["card_id"] == done["data"]["summary"]["card_id"]  # the same card
        assert list(summary["bookings"]) == ["B8002"]
        assert summary["bookings"]["B8002"]["videos"] == [second]
        assert len(summary["copied"]) == 2  # the new QR clip and video only


def test_the_detector_endpoint_rules(world: dict[str, Any]) -> None:
    """The framework's /ws/detector: hello first, one connection per detector id, the list of
    detectors behind the token."""
    from websockets.exceptions import ConnectionClosed

    server = world["server"]
    url = f"{server.url.replace('http', 'ws')}/ws/detector?token={TOKEN}"
    with ws_connect(url) as rude:
        rude.send(json.dumps({"type": "sd:file_list", "files": []}))
        assert "detector:hello" in json.loads(rude.recv(10))["detail"]
        with pytest.raises(ConnectionClosed) as closed:
            rude.recv(10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    with ws_connect(url) as first:
        first.send(
            json.dumps(
                {
                    "type": "detector:hello",
                    "detector_id": "dup",
                    "sessions": [{"session_id": "s1", "card_id": "C-1", "label": "C"}],
                }
            )
        )
        assert json.loads(first.recv(10))["type"] == "detector:welcome"
        with ws_connect(url) as second:
            second.send(json.dumps({"type": "detector:hello", "detector_id": "dup"}))
            assert json.loads(second.recv(10))["type"] == "detector:welcome"
            with pytest.raises(ConnectionClosed):  # replaced by the newer connection
                first.recv(10)
            listed = httpx.get(f"{server.url}/api/detectors", headers=AUTH).json()
            assert [d["detector_id"] for d in listed] == ["dup"]
            assert listed[0]["sessions"] == [{"session_id": "s1", "card_id": "C-1", "label": "C"}]
    assert httpx.get(f"{server.url}/api/detectors").status_code == 401
