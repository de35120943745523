"""The dashboard's segments view and plots: their API over a real service hosting a live app
(a synthetic camera, a segmenter, a frame store), an app of another process of the same home,
and the page in headless Chromium (desktop and phone).

The browser test skips when ``/usr/bin/chromium`` or the ``playwright`` package is missing, and
fails under ``CI=true``. It saves screenshots in its temp folder (and ``docs/dashboard-*.png``,
the README's, with ``FRAMEPIPE_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

import test_doorbell_web as doorbell
from framepipe.app import App
from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.backoff import Backoff
from framepipe.config import Settings
from framepipe.event_sinks import StoreEventSink
from framepipe.frames import Frame
from framepipe.server.live import LiveHistory, display_fields, histogram
from framepipe.server.panels import AppDashboard, SegmentField
from framepipe.server.thumbnails import ThumbnailCache, downscale
from framepipe.sources import PatternSource
from framepipe.stream import Segmenter, Stage, StreamPipeline
from framepipe.stream.segment import Segment
from framepipe.stream.sinks import FrameStore, Sink
from test_dashboard import LiveApp
from test_server import TOKEN, Server
from waiting import wait_until

AUTH = {"Authorization": f"Bearer {TOKEN}"}
DOCS = Path(__file__).resolve().parent.parent / "docs"

# The doorbell example served by `framepipe serve` (its tests' fixtures).
analyzer = doorbell.analyzer
site = doorbell.site
served = doorbell.served


# -- the pieces, without a service ------------------------------------------------------------


def test_display_fields_named_default_and_nested() -> None:
    visitor = {"visitor": {"name": "alice", "known": True, "snapshot_key": "snaps/a.jpg"}}
    named = (
        SegmentField("who", "visitor.name"),
        SegmentField("snapshot", "visitor.snapshot_key", image=True),
    )
    assert display_fields(visitor, named) == [
        {"label": "who", "value": "alice", "image": None},
        {"label": "snapshot", "value": None, "image": "snaps/a.jpg"},
    ]
    # Without names: label/who when present, else the scalar fields, nested ones dotted.
    assert display_fields({"label": "ORDER_7", "who": "bob", "n": 3}, None) == [
        {"label": "label", "value": "ORDER_7", "image": None},
        {"label": "who", "value": "bob", "image": None},
    ]
    assert display_fields(visitor, None) == [
        {"label": "visitor.name", "value": "alice", "image": None},
        {"label": "visitor.known", "value": True, "image": None},
        {"label": "visitor.snapshot_key", "value": None, "image": "snaps/a.jpg"},
    ]
    assert display_fields({"faces": [[1, 2]], "x": float("nan")}, None) == []
    # The doorbell's verdict: who, and the snapshot, however many fields come before it.
    many = {"visitor": {**{f"n{i}": i for i in range(9)}, "snapshot_key": "s/v.jpg"}}
    shown = display_fields(many, None)
    assert len(shown) == 7 and shown[-1]["image"] == "s/v.jpg"
    with pytest.raises(ValueError, match="path"):
        SegmentField("who", "visitor..name")


def test_histogram_bins_from_zero_to_a_round_top() -> None:
    h = histogram([0.1, 0.2, 0.25, 0.9, 1.4])
    assert h["edges"][0] == 0 and len(h["edges"]) == 11 and h["edges"][-1] >= 1.4
    assert sum(h["counts"]) == h["count"] == 5
    assert histogram([])["count"] == 0


def test_thumbnails_are_downscaled_and_kept(tmp_path: Path) -> None:
    store = open_object_store(str(tmp_path / "objects"))
    image = np.zeros((480, 800, 3), np.uint8)
    cv2.rectangle(image, (100, 100), (300, 300), (0, 200, 255), -1)
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    store.put("frames/a.jpg", bytes(jpeg))
    cache = ThumbnailCache()
    thumb = cv2.imdecode(np.frombuffer(cache.get(store, "frames/a.jpg", 160), np.uint8), 1)
    assert thumb.shape[:2] == (96, 160)
    cache.get(store, "frames/a.jpg", 160)
    assert (cache.hits, cache.misses) == (1, 1)
    small = cv2.imdecode(np.frombuffer(downscale(bytes(jpeg), 1600), np.uint8), 1)
    assert small.shape[:2] == (480, 800)  # never enlarged


# -- a live app with segments, served by the service -----------------------------------------


class Labeler(Sink):
    """Says who was at the door: the meta a doorbell records for a visit."""

    def __init__(self) -> None:
        self.visits = 0

    def write(self, frame: Frame) -> None:
        pass

    def segment_closed(self, segment: Segment) -> None:
        self.visits += 1
        segment.meta["visitor"] = {
            "name": ["alice", "bob"][self.visits % 2],
            "known": True,
            "snapshot_key": segment.selected[0] if segment.selected else None,
        }


def _score(frame: Frame) -> Frame:
    frame.meta["score"] = float((frame.seq * 7) % 11)
    return frame


class Doorstep(App):
    """A hosted app whose segments are visits: it names the fields the view shows."""

    def __init__(
        self, settings: Settings, objects: ObjectStore, fps: float = 12, fail_at: int = 0
    ) -> None:
        super().__init__("doorstep", settings=settings, health_interval=0.5)
        self.objects = objects
        failed: list[int] = []

        def camera_glitch(_image: Any, seq: int) -> None:
            if fail_at and seq >= fail_at and not failed:
                failed.append(seq)
                raise OSError("the camera's cable came loose")

        self.add_pipeline(
            StreamPipeline(
                "porch",
                PatternSource("porch", width=320, height=180, fps=fps, draw=camera_glitch),
                [Stage(_score, name="score")],
                Segmenter(max_duration=1.0, label="visit"),
                [FrameStore(objects, select_best=2, workers=1), Labeler()],
                backoff=Backoff(0.2, 2.0, 1.0, 0.0),
            )
        )

    def dashboard(self) -> AppDashboard:
        return AppDashboard(
            objects=lambda: self.objects,
            segment_fields=(
                SegmentField("who", "visitor.name"),
                SegmentField("snapshot", "visitor.snapshot_key", image=True),
            ),
        )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        objects_url=str(tmp_path / "objects"),
        heartbeat_interval=0.2,
        shutdown_grace=2.0,
    )


@pytest.fixture
def doorstep(settings: Settings, tmp_path: Path) -> Iterator[Server]:
    objects = open_object_store(str(tmp_path / "app-objects"))
    with Server(settings, apps=(Doorstep(settings, objects, fail_at=20),)) as server:
        yield server


def _segments(client: httpx.Client, app: str, n: int = 2) -> list[dict[str, Any]]:
    def enough() -> list[dict[str, Any]] | None:
        answer = client.get(f"/api/segments/{app}")
        if answer.status_code == 404:  # an app of another process: no snapshot yet
            return None
        rows: list[dict[str, Any]] = answer.json()["segments"]
        return rows if len(rows) >= n else None

    return wait_until(f"{n} completed segments of {app}", enough, 30, interval=0.2)


@pytest.mark.slow
def test_segments_and_history_of_a_hosted_app(doorstep: Server) -> None:
    with httpx.Client(base_url=doorstep.url, headers=AUTH, timeout=10) as client:
        rows = _segments(client, "doorstep", 2)
        newest = rows[0]
        assert newest["pipeline"] == "porch" and newest["source_id"] == "porch"
        assert newest["completed_at"] >= rows[1]["completed_at"]
        assert newest["reason"] == "max_duration" and newest["frames"] >= 5
        assert 0.5 <= newest["duration_s"] <= 1.5
        assert newest["latency_s"] is not None and newest["latency_s"] >= 0
        assert len(newest["stored"]) == newest["frames"]
        assert len(newest["selected"]) == 2
        who, snapshot = newest["fields"]
        assert who["label"] == "who" and who["value"] in ("alice", "bob")
        assert snapshot == {"label": "snapshot", "value": None, "image": newest["selected"][0]}
        assert client.get("/api/segments/doorstep?pipeline=porch&limit=1").json()["segments"][0][
            "segment_id"
        ] in {r["segment_id"] for r in client.get("/api/segments/doorstep").json()["segments"]}
        assert client.get("/api/segments/doorstep?pipeline=nope").json()["segments"] == []

        # A stored frame and a selected one, downscaled on the server.
        for key, width in ((newest["stored"][0], 160), (newest["selected"][0], 64)):
            image = client.get(f"/api/segments/doorstep/porch/frames/{key}?width={width}")
            assert image.status_code == 200, image.text
            assert image.headers["content-type"] == "image/jpeg"
            decoded = cv2.imdecode(np.frombuffer(image.content, np.uint8), 1)
            assert decoded.shape[1] == width and decoded.shape[0] == width * 180 // 320
        full = client.get(f"/api/segments/doorstep/porch/frames/{newest['stored'][0]}?width=1920")
        assert cv2.imdecode(np.frombuffer(full.content, np.uint8), 1).shape[1] == 320

        # The history: samples that move, per-stage latency, the segments' latency histogram.
        def two_samples() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get("/api/sources/doorstep/porch/history").json()
            moving = [s for s in body["samples"] if s["fps"]]
            restarted = any(m["type"] == "source.restarting" for m in body["markers"])
            return body if len(moving) >= 2 and restarted else None

        history = wait_until(
            "two samples with a frame rate, and the restart", two_samples, 20, interval=0.3
        )
        assert history["interval"] == 1.0 and history["window"] >= 60
        samples = history["samples"]
        assert [s["ts"] for s in samples] == sorted(s["ts"] for s in samples)
        assert 5 <= max(s["fps"] or 0 for s in samples) <= 20, samples  # a 12 fps camera
        assert "running" in {s["state"] for s in samples}
        assert samples[-1]["frames"] > samples[0]["frames"]
        assert any("score" in s["latency_ms"] for s in samples)
        latency = history["segment_latency"]
        assert latency["count"] >= 2 and sum(latency["counts"]) == latency["count"]
        assert len(latency["edges"]) == len(latency["counts"]) + 1
        # The camera's glitch (the 20th frame) is marked: it died and was restarted.
        kinds = {m["type"] for m in history["markers"]}
        assert {"source.died", "source.restarting"} <= kinds, history["markers"]
        died = next(m for m in history["markers"] if m["type"] == "source.died")
        assert "cable came loose" in died["text"]
        wait_until(
            "the restart counted in a sample",
            lambda: (
                client.get("/api/sources/doorstep/porch/history").json()["samples"][-1]["restarts"]
                == 1
            ),
            10,
            interval=0.3,
        )
        recent = client.get("/api/sources/doorstep/porch/history?seconds=1").json()["samples"]
        assert len(recent) < len(samples) or len(samples) <= 2


@pytest.mark.slow
def test_frames_are_confined_to_the_apps_store(doorstep: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    _, jpeg = cv2.imencode(".jpg", np.zeros((20, 20, 3), np.uint8))
    secret.write_bytes(bytes(jpeg))
    (tmp_path / "app-objects" / "frames").mkdir(parents=True, exist_ok=True)
    (tmp_path / "app-objects" / "frames" / "link.jpg").symlink_to(secret)
    (tmp_path / "app-objects" / "notes.txt").write_text("not a picture")
    base = "/api/segments/doorstep/porch/frames"
    with httpx.Client(base_url=doorstep.url, headers=AUTH, timeout=10) as client:
        for key in ("frames/link.jpg", "frames/%2E%2E/%2E%2E/secret.jpg", "a//b.jpg"):
            refused = client.get(f"{base}/{key}")
            assert refused.status_code == 400, (key, refused.text)
            assert "refused" in refused.json()["detail"]
            assert str(tmp_path) not in refused.text
        assert client.get(f"{base}/%2Fetc%2Fpasswd").status_code in (400, 404)
        missing = client.get(f"{base}/frames/nope.jpg")
        assert missing.status_code == 404 and "nope.jpg" in missing.json()["detail"]
        assert client.get(f"{base}/notes.txt").status_code == 415
        assert client.get("/api/segments/nobody").status_code == 404
        assert client.get("/api/segments/../doorstep").status_code == 404
        assert client.get("/api/sources/nobody/porch/history").status_code == 404
        assert client.get(f"{base}/frames/nope.jpg?width=2").status_code == 422
    # The token, and the browser checks, hold on the new routes.
    with httpx.Client(base_url=doorstep.url, timeout=10) as anonymous:
        for path in (
            "/api/segments/doorstep",
            f"{base}/frames/x.jpg",
            "/api/sources/doorstep/porch/history",
            "/api/pipelines/step-durations",
        ):
            assert anonymous.get(path).status_code == 401, path
            foreign = anonymous.get(path, headers={**AUTH, "Origin": "https://evil.example"})
            assert foreign.status_code == 403, path
            assert (
                anonymous.get(path, headers={**AUTH, "Host": "rebound.example"}).status_code == 400
            )


class Beside(LiveApp):
    """``app`` run in a thread with its own event loop, committing its events to ``store``
    through its own sink, as an app of another process does."""

    def __init__(self, app: App, store: StateStore) -> None:
        self.app = app
        self.store = store
        self._stop = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            sink = StoreEventSink(self.store, self.app.name)
            self.app.on("*", sink)
            await self.app.start()
            self._started.set()
            try:
                await asyncio.to_thread(self._stop.wait)
            finally:
                await self.app.stop()
                await sink.aclose()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._started.set()


@pytest.mark.slow
def test_an_app_of_another_process_is_read_from_its_snapshots_and_events(
    settings: Settings, tmp_path: Path
) -> None:
    """An app running beside the service (here a thread with its own loop, writing the same
    home's snapshots and the same state DB through its own event sink)."""
    objects = open_object_store(settings.resolved_objects_url)
    store = StateStore(settings.resolved_database_url)
    beside = Beside(Doorstep(settings, objects, fps=15), store)
    try:
        with (
            Server(settings) as server,
            beside,
            httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client,
        ):
            rows = _segments(client, "doorstep", 2)
            assert client.get("/api/segments/doorstep").json()["hosted"] is False
            assert rows[0]["fields"][0]["label"] == "visitor.name"  # not hosted: the default
            key = rows[0]["stored"][-1]
            assert client.get(f"/api/segments/doorstep/porch/frames/{key}").status_code == 200

            def moving() -> list[dict[str, Any]] | None:
                samples = client.get("/api/sources/doorstep/porch/history").json()["samples"]
                return samples if len([s for s in samples if s["fps"]]) >= 2 else None

            samples = wait_until("samples from the snapshots", moving, 20, interval=0.3)
            assert all(s["fps"] >= 0 for s in samples if s["fps"] is not None)
    finally:
        store.close()


@pytest.mark.slow
def test_step_durations_of_job_pipelines(settings: Settings) -> None:
    from test_dashboard import render, wait_finished

    with (
        Server(settings, pipelines=(render,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client,
    ):
        assert client.get("/api/pipelines/step-durations").json() == []
        for _ in range(2):
            x = client.post(
                "/api/executions",
                json={"pipeline": "render_clip", "inputs": {"steps": 3, "pause": 0.05}},
            ).json()["id"]
            assert wait_finished(client, x) == "completed"
        (durations,) = client.get("/api/pipelines/step-durations").json()
        assert durations["pipeline"] == "render_clip" and durations["executions"] == 2
        names = [s["name"] for s in durations["steps"]]
        assert names == ["encode", "publish"]
        encode = durations["steps"][0]
        assert (
            encode["count"] == 2
            and encode["mean_s"] >= 0.14
            and encode["max_s"] >= encode["mean_s"]
        )
        one = client.get("/api/pipelines/step-durations?executions=1").json()[0]
        assert one["executions"] == 1


def test_live_history_keeps_a_bounded_window() -> None:
    history = LiveHistory({}, Settings(), interval=1.0, window=5.0)
    for i in range(20):
        history._add(("a", "p"), 100.0 + i, {"frames_captured": 10 * i, "state": "running"})
    samples = history.samples("a", "p")
    assert len(samples) == 5 and samples[-1].fps == 10.0
    history._add(("a", "p"), 50.0, {"frames_captured": 0})  # older than the last: ignored
    assert len(history.samples("a", "p")) == 5


# -- the page in headless Chromium ------------------------------------------------------------

_INKED = """canvas => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let inked = 0;
  for (let i = 3; i < data.length; i += 4) if (data[i] > 0) inked += 1;
  return inked;
}"""


def _segments_and_viewer(page: Any) -> None:
    """The segments view lists segments with their fields and a strip of thumbnails, the
    selected frames marked; the viewer steps through a segment's frames."""
    app = '.seg-app[data-app="doorstep"]'
    page.wait_for_selector(f"{app} .segment", timeout=20_000)
    segment = page.locator(f"{app} .segment").first
    assert "max_duration" in segment.locator(".seg-reason").inner_text()
    assert segment.locator('[data-field="who"] b').inner_text() in ("alice", "bob")
    assert "latency" in segment.locator(".seg-facts").inner_text()
    segment.locator('[data-field="snapshot"] img[data-loaded]').wait_for(timeout=10_000)
    thumb = segment.locator(".thumb-img[data-loaded]").first
    thumb.wait_for(timeout=10_000)
    assert thumb.evaluate("img => img.naturalWidth") == 160
    assert thumb.get_attribute("loading") == "lazy"
    assert segment.locator(".thumb.best").count() == 2

    segment.locator(".thumb").first.click()
    viewer = page.locator("#viewer")
    viewer.wait_for(state="visible")
    page.wait_for_selector("#viewer .viewer-img[data-loaded]")
    first = page.evaluate("() => document.querySelector('#viewer .viewer-img').src")
    assert viewer.get_attribute("data-index") == "0"
    assert page.evaluate("() => document.querySelector('#viewer .viewer-img').naturalWidth") == 320
    page.keyboard.press("ArrowRight")
    assert viewer.get_attribute("data-index") == "1"
    page.wait_for_function(
        "old => { const i = document.querySelector('#viewer .viewer-img');"
        " return i.dataset.loaded && i.src !== old; }",
        arg=first,
    )
    assert "frame 2 of" in viewer.locator(".viewer-pos").inner_text()
    page.click('#viewer [data-action="prev"]')
    assert viewer.get_attribute("data-index") == "0"
    page.wait_for_function(
        "old => document.querySelector('#viewer .viewer-img').src === old", arg=first
    )
    page.click('#viewer [data-action="next"]')
    assert viewer.get_attribute("data-index") == "1"
    page.keyboard.press("Escape")
    viewer.wait_for(state="hidden")


def _plots_move(page: Any) -> None:
    """The source's plots draw, and move while it runs; the segment latency histogram and the
    job pipeline's step durations show."""
    card = '.plot-card[data-source="doorstep/porch"]'
    page.wait_for_function(
        "sel => Number(document.querySelector(sel)?.dataset.points) >= 3",
        arg=f"{card} .plot-fps",
        timeout=20_000,
    )
    fps = page.locator(f"{card} .plot-fps")
    assert fps.evaluate(_INKED) > 200
    assert int(fps.get_attribute("data-markers") or 0) >= 2  # the camera's glitch, marked
    assert page.locator(f"{card} .plot-latency").evaluate(_INKED) > 200
    before = fps.evaluate("c => [c.dataset.last, c.toDataURL()]")
    page.wait_for_function(
        "([sel, last]) => document.querySelector(sel).dataset.last !== last",
        arg=[f"{card} .plot-fps", before[0]],
        timeout=10_000,
    )
    after = fps.evaluate("c => [c.dataset.last, c.toDataURL()]")
    assert after[1] != before[1], "the frames-per-second plot did not move"
    page.wait_for_function(
        "sel => Number(document.querySelector(sel)?.dataset.count) >= 1", arg=f"{card} .plot-hist"
    )
    assert page.locator(f"{card} .plot-hist").evaluate(_INKED) > 100
    bar = page.locator('.durations[data-pipeline="render_clip"] dd[data-step="encode"] progress')
    bar.wait_for(timeout=15_000)
    assert float(bar.evaluate("p => p.value")) > 0


def _busy_thumbnails(page: Any, n: int, *, width: int) -> list[str]:
    """The first ``n`` requests of ``page`` for frames ``width`` wide are answered as a
    service whose thumbnail turns are all taken answers them (503, ``Retry-After: 1``); the
    page is to ask again. Returns the URLs so answered."""
    answered: list[str] = []

    def route(r: Any) -> None:
        if len(answered) < n and f"width={width}" in r.request.url:
            answered.append(r.request.url)
            r.fulfill(
                status=503,
                headers={"Retry-After": "1", "Content-Type": "application/json"},
                body='{"detail": "every thumbnail turn is taken"}',
            )
        else:
            r.continue_()

    page.route("**/api/segments/*/*/frames/**", route)
    return answered


def _no_horizontal_scroll(page: Any) -> None:
    widths = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[1], f"horizontal scrolling: {widths}"


@pytest.mark.slow
def test_segments_view_and_plots_in_headless_chromium(settings: Settings, tmp_path: Path) -> None:
    from test_dashboard import (
        CHROMIUM,
        CHROMIUM_ARGS,
        _playwright,
        phone_page,
        render,
        wait_finished,
    )

    sync_playwright = _playwright()
    objects = open_object_store(str(tmp_path / "app-objects"))
    errors: list[str] = []
    with (
        Server(
            settings, pipelines=(render,), apps=(Doorstep(settings, objects, fail_at=20),)
        ) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=10) as client,
        sync_playwright() as pw,
    ):
        done = client.post(
            "/api/executions", json={"pipeline": "render_clip", "inputs": {"steps": 3}}
        ).json()["id"]
        assert wait_finished(client, done) == "completed"
        _segments(client, "doorstep", 2)
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            desk = browser.new_context(viewport={"width": 1280, "height": 900})
            page = desk.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            busy = _busy_thumbnails(page, 1, width=960)
            page.goto(f"{server.url}/#token={TOKEN}")
            page.wait_for_selector("#board:not([hidden])")
            _segments_and_viewer(page)
            # the viewer's first frame was answered busy, asked again and shown
            assert len(busy) == 1 and "width=960" in busy[0], busy
            _plots_move(page)
            page.wait_for_timeout(300)
            shots = {
                "dashboard-segments.png": "#segments-panel",
                "dashboard-plots.png": "#plots-panel",
            }
            for name, selector in shots.items():
                page.locator(selector).screenshot(path=str(tmp_path / name))
            page.locator(".thumb").first.click()
            page.wait_for_selector("#viewer .viewer-img[data-loaded]")
            page.screenshot(path=str(tmp_path / "dashboard-viewer.png"))
            page.keyboard.press("Escape")

            small = phone_page(browser, errors)
            small.goto(f"{server.url}/#token={TOKEN}")
            small.wait_for_selector("#board:not([hidden])")
            _segments_and_viewer(small)
            _plots_move(small)
            _no_horizontal_scroll(small)
            small.locator(".thumb").first.tap()
            small.wait_for_selector("#viewer .viewer-img[data-loaded]")
            box = small.locator("#viewer .viewer-box").bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
            small.tap('#viewer [data-action="next"]')
            assert small.locator("#viewer").get_attribute("data-index") == "1"
            _no_horizontal_scroll(small)
            small.screenshot(path=str(tmp_path / "dashboard-phone-viewer.png"))
            small.keyboard.press("Escape")
            small.locator("#segments-panel").screenshot(
                path=str(tmp_path / "dashboard-phone-segments.png")
            )
            shots["dashboard-phone-viewer.png"] = ""
            small.context.close()
            desk.close()
        finally:
            browser.close()
    assert errors == []
    for name in (*shots, "dashboard-viewer.png", "dashboard-phone-segments.png"):
        assert (tmp_path / name).stat().st_size > 5_000, name
    for name in shots:
        if os.environ.get("FRAMEPIPE_UPDATE_SCREENSHOT"):  # the README's pictures
            shutil.copyfile(tmp_path / name, DOCS / name)


@pytest.mark.slow  # framepipe serve and dlib
def test_doorbell_visits_show_who_came_and_the_snapshot(served: doorbell.Served) -> None:
    """The doorbell example, hosted by ``framepipe serve`` and left unchanged: its visits are
    segments whose default fields say who was recognised and show the snapshot it stored."""
    token = doorbell._token(served.link())
    with httpx.Client(
        base_url=served.base, headers={"Authorization": f"Bearer {token}"}, timeout=10
    ) as client:
        app = client.get("/api/apps").json()[0]["app"]

        def alice() -> dict[str, Any] | None:
            for s in client.get(f"/api/segments/{app}").json()["segments"]:
                shown = {f["label"]: f for f in s["fields"]}
                if shown.get("visitor.name", {}).get("value") == "alice":
                    return s
            return None

        visit = wait_until("a visit of alice", alice, 120, interval=0.5)
        shown = {f["label"]: f for f in visit["fields"]}
        assert shown["visitor.known"]["value"] is True
        snapshot = shown["visitor.snapshot_key"]["image"]
        base = f"/api/segments/{app}/{visit['pipeline']}/frames"
        image = client.get(f"{base}/{snapshot}?width=120")
        assert image.status_code == 200, image.text
        assert cv2.imdecode(np.frombuffer(image.content, np.uint8), 1).shape[1] == 120
        assert client.get(f"{base}/captures/leak.jpg").status_code == 400
