"""``framepipe demo --live`` as a newcomer runs it: a real process on a loopback port, its
printed link opened in Debian's headless ``chromium`` (Playwright, as in test_dashboard.py),
stopped with SIGINT or SIGTERM; both demos on the packages a plain install brings (the live
one with the ``server`` extra), every other package made unimportable; the generated station
clip read back by the station's own stages; the options' refusals.

The browser test skips when ``/usr/bin/chromium`` or the ``playwright`` package is missing,
and fails under ``CI=true``. It saves screenshots in its temp folder (and ``docs/demo-live.png``,
the README's, with ``FRAMEPIPE_UPDATE_SCREENSHOT=1``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from framepipe.cli import app as cli_app
from framepipe.demo_live import listen
from framepipe.demo_media import DEMO_ORDERS, OrderTagReader, make_station_clip, read_order
from framepipe.errors import ConfigError
from framepipe.sources.av import VideoSource
from framepipe.stream.pipeline import StreamPipeline
from framepipe.stream.segment import Segmenter
from framepipe.stream.stage import Stage
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, _playwright, phone_page
from waiting import free_port, wait_until

BLOCK = "import sys; sys.modules.update(dict.fromkeys("
MAIN = "); from framepipe.cli import main; main()"
EXTRAS = [  # every optional dependency's module (pyproject's extras and the test tools)
    "psycopg",
    "boto3",
    "redis",
    "aio_pika",
    "dlib",
    "face_recognition_models",
    "zxingcpp",
    "rapidocr_onnxruntime",
    "onnxruntime",
    "aiomqtt",
    "opentelemetry.sdk",  # (the API is FastAPI's own dependency)
    "segno",
    "skvideo",
    "moto",
    "playwright",
]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "demo-live.png"
SOURCE = '.source[data-source="demo/order_station"]'
ORDER = '[data-segment^="ORDER_10"]'


class Demo:
    """``framepipe demo --live`` in a session of its own (so that every process it could
    leave behind is found by its process group), its stdout collected line by line."""

    def __init__(self, home: Path, *args: str, without: Sequence[str] = ()) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEPIPE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.home = home
        # ``without``: modules that cannot be imported, as if their packages were not installed.
        python = [sys.executable, "-c", f"{BLOCK}{list(without)!r}){MAIN}"]
        self.proc = subprocess.Popen(
            [*python, "demo", "--live", "--home", str(home), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(stream, into), daemon=True)
            for stream, into in ((self.proc.stdout, self.lines), (self.proc.stderr, self.errors))
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def explain(self) -> str:
        return "\n".join(["stdout:", *self.lines[-20:], "stderr:", *self.errors[-30:]])

    def line(self, prefix: str, timeout: float = 60) -> str:
        """The first stdout line starting with ``prefix``, once printed."""

        def printed() -> str | None:
            if self.proc.poll() is not None and not any(x.startswith(prefix) for x in self.lines):
                raise AssertionError(f"the demo exited ({self.proc.returncode})\n{self.explain()}")
            return next((x for x in self.lines if x.startswith(prefix)), None)

        return wait_until(f"the demo to print {prefix!r}", printed, timeout, explain=self.explain)

    @property
    def url(self) -> str:
        return self.line("Dashboard: ").removeprefix("Dashboard: ")

    def stop(self, sig: int, timeout: float = 60) -> int:
        """Send ``sig``, wait for the exit; the exit code."""
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the demo did not stop on {sig}\n{self.explain()}") from None
        for reader in self._readers:
            reader.join(10)
        return code

    def leftovers(self) -> bool:
        """True when a process of the demo's group is still alive."""
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        if self.proc.poll() is None or self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def demo_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def start(demo_home: Path) -> Iterator[Any]:
    started: list[Demo] = []

    def run(*args: str, without: Sequence[str] = ()) -> Demo:
        demo = Demo(demo_home, *args, without=without)
        started.append(demo)
        return demo

    yield run
    for demo in started:
        demo.close()


def _token(url: str) -> str:
    return url.partition("#token=")[2]


def _orders_completed(client: httpx.Client) -> list[str]:
    page = client.get("/api/events", params={"limit": 500}).json()["events"]
    return [e["data"]["segment_id"] for e in page if e["type"] == "segment.completed"]


# -- the whole demo in a browser --------------------------------------------------------------


@pytest.mark.slow
def test_live_demo_in_chromium_on_a_desktop_and_a_phone(
    start: Any, demo_home: Path, tmp_path: Path
) -> None:
    sync_playwright = _playwright()
    demo = start("--port", str(free_port()))
    url = demo.url
    assert url.startswith("http://127.0.0.1:")
    assert _token(url)
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            desk = browser.new_context(viewport={"width": 1280, "height": 900})
            page = desk.new_page()
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            _check_board(page, demo)
            assert _ticket_in_view(page) in DEMO_ORDERS
            page.evaluate("() => window.scrollTo(0, 0)")  # the sticky header back on top
            page.screenshot(path=str(tmp_path / "demo-live.png"), full_page=True)
            if os.environ.get("FRAMEPIPE_UPDATE_SCREENSHOT"):  # the README's picture
                shutil.copyfile(tmp_path / "demo-live.png", SCREENSHOT)

            small = phone_page(browser, errors)
            small.goto(url)
            _check_board(small, demo)
            widths = small.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
            assert widths[0] <= widths[1], f"horizontal scrolling on a phone: {widths}"
            small.screenshot(path=str(tmp_path / "demo-live-phone.png"), full_page=True)
            # Ctrl-C with both pages still connected (their live feeds open).
            assert demo.stop(signal.SIGINT) == 0, demo.explain()
            page.wait_for_selector('#conn:not([data-state="live"])', timeout=15_000)
        finally:
            browser.close()
    assert errors == []
    assert demo.lines[-1] == "Demo stopped.", demo.explain()
    assert not demo.leftovers()
    stored = demo_home / "objects" / "frames" / "order_station" / "ORDER_101"
    assert sorted(p.suffix for p in stored.iterdir()) == [".jpg"] * len(list(stored.iterdir()))
    assert len(list(stored.iterdir())) >= 20  # its 3 s of ticket at 8 fps, and the tail


def _check_board(page: Any, demo: Demo) -> None:
    """The station with a live preview, orders completing, the batch import: as a user sees
    them on ``page``."""
    page.wait_for_selector("#board:not([hidden])", timeout=20_000)
    assert "token" not in page.url
    page.wait_for_selector('#conn[data-state="live"]', timeout=20_000)
    # The station: its state and a latest frame that keeps changing (a new blob: URL).
    frame = page.wait_for_selector(f'{SOURCE}[data-frame="loaded"] img', timeout=30_000)
    assert frame.evaluate("img => img.naturalWidth") == 640
    assert page.inner_text(f"{SOURCE} .badge") == "running"
    shown = frame.get_attribute("src")
    page.wait_for_function(
        "([sel, old]) => document.querySelector(sel).src !== old",
        arg=[f"{SOURCE} img", shown],
        timeout=15_000,
    )
    # Orders completing, live: ORDER_101 closes ~5.5 s after the start, ORDER_102 5 s later.
    done = '#events .ev[data-type="segment.completed"]'
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].some(e => e.textContent.includes('ORDER_1'))",
        arg=done,
        timeout=45_000,
    )
    count = page.locator(done).count()
    page.wait_for_function(
        "([sel, n]) => document.querySelectorAll(sel).length > n", arg=[done, count], timeout=30_000
    )
    # The segments view: the station's orders, with thumbnails of their stored frames and the
    # 3 sharpest of each marked.
    order = f'.seg-app[data-app="demo"] .segment[data-pipeline="order_station"]{ORDER}'
    page.wait_for_selector(order, timeout=20_000)
    first = page.locator(order).first
    first.locator(".thumb-img[data-loaded]").first.wait_for(timeout=15_000)
    assert first.locator(".thumb.best").count() == 3
    # The batch import, completed, in the executions view.
    run = page.wait_for_selector('.exec[data-status="completed"]', timeout=30_000)
    assert "demo_import" in run.inner_text(), demo.explain()


def _ticket_in_view(page: Any) -> str:
    """Wait until the dashboard's preview of the station shows a ticket whose QR code reads
    (as the picture on the screen, not the JPEG the service sent); the order id."""
    detector = cv2.QRCodeDetector()
    img = f"{SOURCE} img"
    for _ in range(20):
        shown = page.get_attribute(img, "src")
        page.wait_for_function(
            "([sel, old]) => document.querySelector(sel).src !== old",
            arg=[img, shown],
            timeout=15_000,
        )
        picture = np.frombuffer(page.locator(img).screenshot(), np.uint8)
        gray = cv2.imdecode(picture, cv2.IMREAD_GRAYSCALE)
        order, _ = read_order(detector, gray)
        if order is not None:
            return order
    raise AssertionError("20 previews in a row showed no readable ticket")


# -- stopping, without a browser --------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_stops_the_station_and_the_service_with_exit_0(start: Any, demo_home: Path) -> None:
    port = free_port()
    demo = start("--port", str(port))
    url = demo.url
    headers = {"Authorization": f"Bearer {_token(url)}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
        sources = wait_until("the station listed", lambda: client.get("/api/sources").json(), 20)
        assert [(s["app"], s["pipeline"]) for s in sources] == [("demo", "order_station")]
        orders = wait_until(
            "the first order", lambda: _orders_completed(client), 45, explain=demo.explain
        )
        assert orders[0] == DEMO_ORDERS[0]
        (run,) = client.get("/api/executions").json()
        assert run["pipeline"] == "demo_import"
    assert demo.stop(signal.SIGTERM) == 0, demo.explain()
    assert not demo.leftovers()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health")


@pytest.mark.slow
def test_the_core_packages_and_the_server_extra_are_enough(start: Any, demo_home: Path) -> None:
    demo = start("--port", str(free_port()), "--duration", "8", without=EXTRAS)
    assert demo.proc.wait(90) == 0, demo.explain()
    assert any("Order ORDER_101 completed" in line for line in demo.errors), demo.explain()
    assert any(line.startswith("Batch import") and "completed" in line for line in demo.lines)
    assert (demo_home / "objects" / "frames" / "order_station" / "ORDER_101").is_dir()


@pytest.mark.slow
def test_the_plain_demo_needs_only_the_core_packages_and_ends(tmp_path: Path) -> None:
    """The README's first command, on what ``pip install framepipe`` installs."""
    without = [*EXTRAS, "fastapi", "uvicorn", "starlette", "websockets"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FRAMEPIPE_")}
    done = subprocess.run(
        [sys.executable, "-c", f"{BLOCK}{without!r}){MAIN}", "demo", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "framepipe demo --live" in done.stdout
    assert len(list((tmp_path / ".framepipe" / "objects" / "thumbnails").iterdir())) == 4


@pytest.mark.slow
def test_sigterm_while_the_media_are_made_exits_0(start: Any) -> None:
    demo = start("--port", str(free_port()))
    demo.line("Making the demo's media")
    assert demo.stop(signal.SIGTERM) == 0, demo.explain()
    assert demo.lines[-1] in ("Demo stopped before the service started.", "Demo stopped.")
    assert not demo.leftovers()


@pytest.mark.slow
def test_duration_ends_the_demo_by_itself(start: Any) -> None:
    demo = start("--port", str(free_port()), "--duration", "2")
    assert demo.url
    assert demo.proc.wait(60) == 0, demo.explain()
    assert "Demo stopped." in demo.lines


@pytest.mark.slow
def test_a_busy_default_port_is_replaced_and_said(start: Any) -> None:
    with socket.socket() as taken:
        try:  # held here, or by something else already: busy either way
            taken.bind(("127.0.0.1", 8000))
            taken.listen()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        demo = start("--duration", "0")
        url = demo.url
        assert demo.proc.wait(60) == 0, demo.explain()
    port = int(url.split(":")[2].split("/")[0])
    assert port != 8000
    assert f"Port 8000 is busy: serving on port {port} instead." in demo.lines


# -- the station's media ----------------------------------------------------------------------


@pytest.mark.slow
def test_the_station_clip_segments_into_its_orders(tmp_path: Path) -> None:
    clip = tmp_path / "station.mp4"
    orders = ["ORDER_7", "ORDER_8"]
    shots = make_station_clip(clip, orders, order_seconds=1.5, gap_seconds=1.0)
    assert [s.order for s in shots] == [None, "ORDER_7", None, "ORDER_8", None]
    completed: list[dict[str, Any]] = []

    def collect(event: str, data: dict[str, Any]) -> None:
        if event == "segment.completed":
            completed.append(data)

    station = StreamPipeline(
        "station",
        VideoSource(clip, "station"),  # once, at machine speed: the stream's clock segments
        stages=[Stage(OrderTagReader(), workers=2)],
        segmenter=Segmenter("order", timeout=0.5, clock="stream", include_untagged=False),
        on_event=collect,
    )

    async def play() -> None:
        await station.start()
        await station.wait()

    asyncio.run(play())
    assert [(c["segment_id"], c["frames"]) for c in completed] == [
        ("ORDER_7", shots[1].frames),  # every frame of each ticket read, nothing else
        ("ORDER_8", shots[3].frames),
    ]


def test_a_station_clip_refuses_an_order_id_that_cannot_be_a_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'\.\./x' does not look like ORDER_<number>"):
        make_station_clip(tmp_path / "x.mp4", ["../x"])
    assert list(tmp_path.iterdir()) == []


# -- the options ------------------------------------------------------------------------------


def test_a_busy_port_is_replaced_unless_it_was_asked_for() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with listen("127.0.0.1", port, exact=False) as sock:
            assert sock.getsockname()[1] not in (port, 0)
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}: .*leave out --port"):
            listen("127.0.0.1", port, exact=True)


def test_without_the_server_extra_the_pip_command_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # what a missing package looks like
    result = CliRunner().invoke(cli_app, ["demo", "--live", "--home", str(tmp_path / "h")])
    assert result.exit_code == 2, result.output
    assert "pip install 'framepipe[server]'" in result.output
    assert "framepipe demo --live" in result.output
    assert not (tmp_path / "h" / "demo-live").exists()


def test_live_options_need_live(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli_app, ["demo", "--port", "9000", "--home", str(tmp_path)])
    assert result.exit_code == 2
    assert "--port needs --live" in result.output


def test_the_demo_refuses_an_open_address_without_a_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["demo", "--live", "--host", "0.0.0.0", "--home", str(tmp_path)],
        env={"FRAMEPIPE_API_TOKEN": None},
    )
    assert result.exit_code == 2, result.output
    assert "refusing to serve on 0.0.0.0 without a token" in result.output
