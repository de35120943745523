"""The dashboard in a real browser: Debian's ``chromium`` driven by Playwright (no browser
download: ``executable_path``), against the service on uvicorn on a loopback port.

The browser test skips when ``/usr/bin/chromium`` or the ``playwright`` package is missing, and
fails under ``CI=true`` (``.ci/run`` installs both). It saves a screenshot in its temp folder
(and ``docs/dashboard.png``, the README's, with ``FRAMEPIPE_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from conftest import service_missing
from framepipe import Pipeline, StepContext
from framepipe.app import App
from framepipe.config import Settings
from framepipe.sources import PatternSource
from framepipe.stream import StreamPipeline
from test_server import TOKEN, Server
from waiting import wait_until

pytestmark = pytest.mark.slow  # headless Chromium against a live service

AUTH = {"Authorization": f"Bearer {TOKEN}"}
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "dashboard.png"

render = Pipeline("render_clip", description="A job whose first step reports progress slowly.")


@render.step(weight=3)
def encode(ctx: StepContext) -> dict[str, Any]:
    steps = int(ctx.inputs.get("steps", 5))
    for i in range(steps):
        time.sleep(float(ctx.inputs.get("pause", 0.01)))
        ctx.progress(100 * (i + 1) / steps, f"frame batch {i + 1} of {steps}")
    return {"batches": steps}


@render.step(depends_on=["encode"])
def publish(ctx: StepContext) -> dict[str, Any]:
    if ctx.inputs.get("fail"):
        raise RuntimeError("the upload target refused the file (HTTP 507)")
    return {"published": True}


def Service(settings: Settings, port: int | None = None, token: str = TOKEN) -> Server:
    """The app with its dashboard (mounted by create_app) on uvicorn, as test_server runs it."""
    return Server(settings, pipelines=(render,), port=port, token=token)


class LiveApp:
    """A live app with one synthetic camera in a thread of its own, writing its health
    snapshot (and, where the app does, its latest frame) under the settings' home."""

    def __init__(self, settings: Settings) -> None:
        self.app = App("station", settings=settings, health_interval=0.2)
        self.app.add_pipeline(
            StreamPipeline(
                "counter_cam", PatternSource("counter_cam", width=320, height=180, fps=10)
            )
        )
        self._stop = threading.Event()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            await self.app.start()
            self._started.set()
            try:
                await asyncio.to_thread(self._stop.wait)
            finally:
                await self.app.stop()

        try:
            asyncio.run(main())
        except BaseException as exc:
            self._error = exc
            self._started.set()

    def __enter__(self) -> LiveApp:
        self.thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=30)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """The dashboard does not depend on the backend: SQLite only."""
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        retry_initial_delay=0.01,
        retry_max_delay=0.05,
        heartbeat_interval=0.2,
        shutdown_grace=2.0,
    )


@pytest.fixture
def service(settings: Settings) -> Iterator[Service]:
    with Service(settings) as running:
        yield running


def wait_finished(client: httpx.Client, execution_id: str, timeout: float = 30) -> str:
    def finished() -> str | None:
        status: str = client.get(f"/api/executions/{execution_id}").json()["status"]
        return status if status not in ("pending", "running") else None

    return wait_until(f"execution {execution_id} to finish", finished, timeout)


def test_the_page_and_its_files_need_no_token_but_the_api_does(service: Service) -> None:
    with httpx.Client(base_url=service.url) as client:
        page = client.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script src="/static/dashboard.js"' in page.text
        for path, kind in (
            ("/static/dashboard.js", "javascript"),
            ("/static/dashboard.css", "text/css"),
            ("/static/favicon.svg", "image/svg+xml"),
        ):
            served = client.get(path)
            assert served.status_code == 200, path
            assert kind in served.headers["content-type"], path
        assert client.get("/static/../app.py").status_code == 404
        assert client.get("/static/nope.js").status_code == 404
        assert client.get("/api/executions").status_code == 401
        assert "/" not in client.get("/openapi.json", headers=AUTH).json()["paths"]


def _playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        service_missing("the playwright package (pip install 'framepipe[test]')", exc)
    if not CHROMIUM.exists():
        service_missing(
            f"Debian's chromium at {CHROMIUM} (apt-get install chromium)",
            FileNotFoundError(CHROMIUM),
        )
    return sync_playwright


def phone_page(browser: Any, errors: list[str]) -> Any:
    """A new page on a phone-sized screen (390 x 844, touch) whose script errors land in
    ``errors``."""
    phone = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    page = phone.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page


def _progress(page: Any, execution_id: str) -> float:
    value = page.eval_on_selector(
        f'.exec[data-execution="{execution_id}"] progress.exec-progress', "el => el.value"
    )
    return float(value)


def test_dashboard_in_headless_chromium(settings: Settings, tmp_path: Path) -> None:
    sync_playwright = _playwright()
    services = [Service(settings).__enter__()]
    try:
        _scenario(sync_playwright, services, settings, tmp_path)
    finally:
        for service in services:
            service.__exit__()


def _scenario(
    sync_playwright: Any, services: list[Service], settings: Settings, tmp_path: Path
) -> None:
    service = services[0]
    with httpx.Client(base_url=service.url, headers=AUTH) as client, LiveApp(settings):
        # A finished execution, a failed one, then one that reports progress for ~20 s.
        done = client.post(
            "/api/executions", json={"pipeline": "render_clip", "inputs": {"steps": 3}}
        ).json()["id"]
        assert wait_finished(client, done) == "completed"
        failed = client.post(
            "/api/executions",
            json={"pipeline": "render_clip", "inputs": {"steps": 2, "fail": True}},
        ).json()["id"]
        assert wait_finished(client, failed) == "failed"
        created = client.post(
            "/api/executions",
            json={"pipeline": "render_clip", "inputs": {"steps": 80, "pause": 0.25}},
        )
        assert created.status_code == 201, created.text
        running = created.json()["id"]
        wait_until(
            "the camera's first preview frame",
            lambda: any(s["frame_url"] for s in client.get("/api/sources").json()),
            20,
            interval=0.1,
        )

        errors: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                desk = browser.new_context(viewport={"width": 1280, "height": 860})
                page = desk.new_page()
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.goto(f"{service.url}/#token={TOKEN}")  # the link `serve` prints
                # The token is taken from the address and dropped from it.
                page.wait_for_selector("#board:not([hidden])")
                assert "token" not in page.url
                page.wait_for_selector('#conn[data-state="live"]', timeout=15_000)

                # The running execution: its step, and a progress bar that moves.
                bar = f'.exec[data-execution="{running}"] progress.exec-progress'
                # (Predicates as functions: the page's CSP forbids eval of a string.)
                page.wait_for_function(
                    "sel => document.querySelector(sel)?.value > 0", arg=bar, timeout=15_000
                )
                first = _progress(page, running)
                page.wait_for_timeout(1500)
                second = _progress(page, running)
                assert 0 < first < second < 100, (first, second)
                step = page.locator(f'.exec[data-execution="{running}"] .step[data-step="encode"]')
                step.wait_for()
                assert step.get_attribute("data-status") == "running"
                assert "frame batch" in step.inner_text()
                assert float(step.locator("progress").evaluate("el => el.value")) > 0
                assert (
                    page.locator(
                        f'.exec[data-execution="{running}"] .step[data-step="publish"]'
                    ).count()
                    == 1
                )

                # The other two executions, with their status; the failure says why.
                statuses = {
                    x: page.get_attribute(f'.exec[data-execution="{x}"]', "data-status")
                    for x in (done, failed)
                }
                assert statuses == {done: "completed", failed: "failed"}
                page.click(f'.exec[data-execution="{failed}"] > summary')
                page.wait_for_selector(
                    f'.exec[data-execution="{failed}"] .step[data-step="publish"]'
                    '[data-status="failed"]'
                )
                assert "HTTP 507" in page.inner_text(f'.exec[data-execution="{failed}"]')

                # Recent events arrive live, and the other panels answer.
                page.wait_for_selector('#events .ev[data-type="step.progress"]')
                assert page.locator('#events .ev[data-type="execution.failed"]').count() == 1
                page.wait_for_selector("#processors li")
                assert page.inner_text("#processors") == "none"  # no broker: no registry

                # The camera of the live app: its health state and its latest frame, fetched
                # with the token and refreshed (a new blob: URL) every couple of seconds.
                source = '.source[data-source="station/counter_cam"]'
                frame = page.wait_for_selector(f'{source}[data-frame="loaded"] img', timeout=15_000)
                assert frame.evaluate("img => img.naturalWidth") == 320
                assert page.inner_text(f"{source} .badge") == "running"
                shown = frame.get_attribute("src")
                assert shown.startswith("blob:")
                page.wait_for_function(
                    "([sel, old]) => document.querySelector(sel).src !== old",
                    arg=[f"{source} img", shown],
                    timeout=10_000,
                )

                page.wait_for_timeout(300)  # let the bars' transition settle
                page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
                assert (tmp_path / "dashboard.png").stat().st_size > 10_000
                if os.environ.get("FRAMEPIPE_UPDATE_SCREENSHOT"):  # the README's picture
                    shutil.copyfile(tmp_path / "dashboard.png", SCREENSHOT)

                # A phone: the page asks for the token, then fits the screen's width.
                small = phone_page(browser, errors)
                small.goto(service.url)
                small.wait_for_selector("#login:not([hidden])")
                small.fill("#token", "wrong")
                small.click("#login button[type=submit]")
                small.wait_for_selector("#login-error:not([hidden])")
                assert "refused" in small.inner_text("#login-error")
                small.fill("#token", TOKEN)
                small.click("#login button[type=submit]")
                small.wait_for_selector(f'.exec[data-execution="{running}"] .step')
                small.wait_for_selector('#conn[data-state="live"]')
                widths = small.evaluate(
                    "() => [document.documentElement.scrollWidth, window.innerWidth]"
                )
                assert widths[0] <= widths[1], f"horizontal scrolling on a phone: {widths}"
                small.screenshot(path=str(tmp_path / "dashboard-phone.png"), full_page=True)

                # Cancel from the phone; the desktop page sees it live.
                small.click(f'.exec[data-execution="{running}"] button[data-action="cancel"]')
                page.wait_for_selector(
                    f'.exec[data-execution="{running}"][data-status="cancelled"]', timeout=15_000
                )
                small.context.close()

                # The service restarts: the page reconnects by itself and gets the state first.
                service.__exit__()
                page.wait_for_selector('#conn:not([data-state="live"])', timeout=15_000)
                services.append(Service(settings, port=service.port).__enter__())
                page.wait_for_selector('#conn[data-state="live"]', timeout=20_000)
                after = client.post(
                    "/api/executions", json={"pipeline": "render_clip", "inputs": {"steps": 2}}
                ).json()["id"]
                page.wait_for_selector(
                    f'.exec[data-execution="{after}"][data-status="completed"]', timeout=15_000
                )
                assert (
                    page.locator(
                        f'.exec[data-execution="{running}"][data-status="cancelled"]'
                    ).count()
                    == 1
                )
                desk.close()
            finally:
                browser.close()
        assert errors == []
        assert client.get(f"/api/executions/{running}").json()["status"] == "cancelled"
    assert SCREENSHOT.stat().st_size > 10_000


_ATTACK = """
async (target) => {
  const out = {};
  try {
    await fetch(`${target}/api/executions`);
    out.read = "answered";
  } catch (err) { out.read = "blocked"; }
  const id = target.split("#")[1];
  const base = target.split("#")[0];
  try {
    const res = await fetch(`${base}/api/executions/${id}/cancel`,
                            {method: "POST", mode: "no-cors", body: "{}",
                             headers: {"Content-Type": "text/plain"}});
    out.post = res.type;
  } catch (err) { out.post = "blocked"; }
  out.socket = await new Promise((resolve) => {
    const ws = new WebSocket(base.replace("http", "ws") + "/ws");
    ws.onmessage = (m) => { resolve("read: " + m.data.slice(0, 40)); ws.close(); };
    ws.onerror = () => resolve("refused");
    setTimeout(() => resolve("timeout"), 5000);
  });
  return out;
}
"""


@contextlib.contextmanager
def another_site(tmp_path: Path) -> Iterator[str]:
    """The address of a page of another origin (a site the user has open), served on
    loopback for the duration."""
    import http.server
    import socketserver

    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "index.html").write_text("<!doctype html><title>cat videos</title>")
    handler = functools.partial(
        http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "evil")
    )
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{site.server_address[1]}/"
        finally:
            site.shutdown()


def test_a_page_of_another_origin_is_refused_in_chromium(
    settings: Settings, tmp_path: Path
) -> None:
    """A service with no token (loopback) and a page of another origin in the same browser:
    the page cannot read executions, cancel one, or open the live feed; a page reaching the
    service under a rebound host name (DNS rebinding, mapped in Chromium's resolver) is
    refused too. The execution goes on."""
    sync_playwright = _playwright()
    with (
        Service(settings, token="") as service,
        another_site(tmp_path) as evil,
        httpx.Client(base_url=service.url) as client,
    ):
        running = client.post(
            "/api/executions",
            json={"pipeline": "render_clip", "inputs": {"steps": 60, "pause": 0.25}},
        ).json()["id"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM),
                args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebound.example 127.0.0.1"],
            )
            try:
                page = browser.new_page()
                page.goto(evil)
                found = page.evaluate(_ATTACK, f"{service.url}#{running}")
                assert found["read"] == "blocked"
                assert found["socket"] == "refused"
                rebound = page.goto(f"http://rebound.example:{service.port}/")
                assert rebound is not None and rebound.status == 400
                assert "FRAMEPIPE_ALLOWED_HOSTS" in page.content()
                # The user's own dashboard, same browser, works without a token.
                own = browser.new_page()
                own.goto(service.url)
                own.wait_for_selector(f'.exec[data-execution="{running}"]')
                own.wait_for_selector('#conn[data-state="live"]', timeout=15_000)
            finally:
                browser.close()
        events = client.get("/api/events", params={"execution_id": running}).json()["events"]
        assert not [e for e in events if "cancel" in e["type"]]
        assert client.get(f"/api/executions/{running}").json()["status"] == "running"
        client.post(f"/api/executions/{running}/cancel", json={})


_FRAME = """
async (urls) => Promise.all(urls.map((url) => new Promise((resolve) => {
  const frame = document.createElement("iframe");
  frame.onload = () => resolve(url);
  frame.src = url;
  document.body.append(frame);
})))
"""


def test_a_page_of_another_origin_cannot_frame_the_dashboard(
    settings: Settings, tmp_path: Path
) -> None:
    """A page of another origin frames the dashboard of a service without a token, to have its
    Cancel and Retry buttons clicked through a decoy (clickjacking): Chromium shows no
    dashboard in the frame, at the page's address or at its file under /static/."""
    sync_playwright = _playwright()
    with (
        Service(settings, token="") as service,
        another_site(tmp_path) as evil,
    ):
        targets = [f"{service.url}/", f"{service.url}/static/index.html"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(evil)
                page.evaluate(_FRAME, targets)
                framed = [f for f in page.frames if f is not page.main_frame]
                assert len(framed) == len(targets)
                shown = [f.url for f in framed if f.query_selector("#board") is not None]
                assert shown == []
                # The same browser opens the dashboard itself.
                own = browser.new_page()
                own.goto(targets[1])
                own.wait_for_selector('#conn[data-state="live"]', timeout=15_000)
            finally:
                browser.close()


_EMBED = """
async (urls) => Promise.all(urls.map((url) => new Promise((resolve) => {
  const img = new Image();
  img.onload = () => resolve(`${img.naturalWidth}x${img.naturalHeight}`);
  img.onerror = () => resolve("blocked");
  img.src = url;
})))
"""


def test_a_page_of_another_site_cannot_embed_the_services_frames(
    settings: Settings, tmp_path: Path
) -> None:
    """A service with no token and a page of another origin (a port of the same host, and
    another host name) that shows the user's camera frame, a stored frame's thumbnail and a
    stored object as images: an <img> sends no Origin, so each used to load (its size read
    by the page, a key's existence told by onload/onerror). Chromium now loads none of
    them (nor keeps them in its cache), while the service's own page still shows them."""
    sync_playwright = _playwright()
    ok, jpeg = cv2.imencode(".jpg", np.full((120, 200, 3), 90, np.uint8))
    assert ok
    with (
        Service(settings, token="") as service,
        LiveApp(settings),
        another_site(tmp_path) as evil,
        httpx.Client(base_url=service.url) as client,
    ):
        assert client.put("/api/objects/frames/k.jpg", content=jpeg.tobytes()).status_code == 201
        wait_until(
            "the camera's first preview frame",
            lambda: any(s["frame_url"] for s in client.get("/api/sources").json()),
            30,
        )
        images = [
            f"{service.url}/api/sources/station/counter_cam/frame",
            f"{service.url}/api/segments/station/counter_cam/frames/frames/k.jpg",
            f"{service.url}/api/objects/frames/k.jpg",
        ]
        for url in images:  # private: not kept in the browser's cache either
            assert client.get(url).headers["cache-control"] == "no-store"
        other_host = evil.replace("127.0.0.1", "localhost")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                for site in (evil, other_host):
                    page.goto(site)
                    assert page.evaluate(_EMBED, images) == ["blocked"] * 3, site
                own = browser.new_page()
                own.goto(service.url)
                shown = own.evaluate(_EMBED, images)
                assert shown[1:] == ["160x96", "200x120"]
                assert shown[0] != "blocked"
            finally:
                browser.close()
