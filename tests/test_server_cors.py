"""A web front end of another origin using the service: CORS for ``FRAMEPIPE_ALLOWED_ORIGINS``.

Over real HTTP and WebSockets (uvicorn on a loopback port), then in headless Chromium: a page
served from a port in ``FRAMEPIPE_ALLOWED_ORIGINS`` reads executions with the bearer token,
submits one, shows a stored image and opens the live feed; the same page from a port not in
the list gets none of it, and nothing it tried reaches a route."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from framepipe import Pipeline, StepContext
from framepipe.app import App
from framepipe.config import Settings
from framepipe.server.browser_guard import CORS_MAX_AGE
from test_dashboard import CHROMIUM, CHROMIUM_ARGS, _playwright
from test_server import AUTH, TOKEN, Server, wait_status

FRONT = "https://front.example"
EVIL = "https://evil.example"

quick = Pipeline("quick")


@quick.step()
def only(ctx: StepContext) -> dict[str, Any]:
    return {"seen": sorted(ctx.inputs)}


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """CORS does not depend on the state backend: SQLite only."""
    return Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        retry_initial_delay=0.01,
        retry_max_delay=0.05,
    )


def _allowing(settings: Settings, *origins: str) -> Settings:
    return settings.model_copy(update={"allowed_origins": list(origins)})


def _jpeg(width: int, height: int) -> bytes:
    ok, encoded = cv2.imencode(".jpg", np.full((height, width, 3), 90, np.uint8))
    assert ok
    return bytes(encoded)


def _preflight(client: httpx.Client, path: str, origin: str, **asked: str) -> httpx.Response:
    headers = {"Origin": origin, "Access-Control-Request-Method": "POST", **asked}
    return client.options(path, headers=headers)


def _cors_headers(answer: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in answer.headers.items() if k.startswith("access-control-")}


# -- over HTTP -------------------------------------------------------------------------------


def test_an_allowed_origin_gets_its_preflight_answered_and_its_answers_marked(
    settings: Settings,
) -> None:
    """A preflight from an allowed origin (in the case the operator wrote it) is answered
    before the token check with what the front end may send; every answer to it, a 401
    included, names that origin (never ``*``, no credentials mode) and varies by Origin."""
    with (
        Server(_allowing(settings, "https://Front.example/"), pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url) as client,
        httpx.Client(base_url=server.url, headers=AUTH) as program,
    ):
        asked = _preflight(
            client,
            "/api/executions",
            FRONT,
            **{"Access-Control-Request-Headers": "authorization,content-type"},
        )
        assert asked.status_code == 204, asked.text
        assert asked.headers["access-control-allow-origin"] == FRONT
        methods = {m.strip() for m in asked.headers["access-control-allow-methods"].split(",")}
        assert {"GET", "POST", "PUT"} <= methods
        allowed = asked.headers["access-control-allow-headers"].lower()
        assert {"authorization", "content-type"} <= {h.strip() for h in allowed.split(",")}
        assert asked.headers["access-control-max-age"] == str(CORS_MAX_AGE)
        assert "origin" in asked.headers["vary"].lower()
        assert "access-control-allow-credentials" not in asked.headers
        assert asked.headers["cross-origin-resource-policy"] == "same-origin"

        for answer, status in (
            (client.get("/api/executions", headers={"Origin": FRONT, **AUTH}), 200),
            (client.get("/api/executions", headers={"Origin": FRONT}), 401),
            (client.get("/api/executions/nope", headers={"Origin": FRONT, **AUTH}), 404),
            (
                client.post(
                    "/api/executions",
                    json={"pipeline": "quick", "inputs": {"a": 1}},
                    headers={"Origin": FRONT, **AUTH},
                ),
                201,
            ),
        ):
            assert answer.status_code == status, answer.text
            assert answer.headers["access-control-allow-origin"] == FRONT, answer.url
            assert "Origin" in answer.headers["vary"], answer.url
            assert "access-control-allow-credentials" not in answer.headers
        assert wait_status(program, answer.json()["id"])["status"] == "completed"

        # A front end on the LAN reaching a service on loopback: Chromium asks first.
        private = _preflight(
            client,
            "/api/executions",
            FRONT,
            **{"Access-Control-Request-Private-Network": "true"},
        )
        assert private.headers["access-control-allow-private-network"] == "true"
        # Not a preflight (no Access-Control-Request-Method): the route's answer, as before.
        assert client.options("/api/executions", headers={"Origin": FRONT}).status_code == 405


def test_other_origins_get_nothing_new(settings: Settings) -> None:
    """A preflight or a request from an origin not in the list is refused as before, without
    any CORS header; the service's own page and programs need no CORS and get none; ``*`` in
    the list is no wildcard."""
    with (
        Server(_allowing(settings, FRONT, "*"), pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        own = f"http://127.0.0.1:{server.port}"
        for origin in (EVIL, "null", "https://front.example.evil.example", f"{FRONT}:8443"):
            asked = _preflight(client, "/api/executions", origin)
            assert asked.status_code == 403, origin
            assert "FRAMEPIPE_ALLOWED_ORIGINS" in asked.json()["detail"]
            assert _cors_headers(asked) == {}, origin
            read = client.get("/api/executions", headers={"Origin": origin, **AUTH})
            assert read.status_code == 403 and _cors_headers(read) == {}, origin
        for headers in ({}, {"Origin": own}):
            answer = client.get("/api/executions", headers={**headers, **AUTH})
            assert answer.status_code == 200
            assert _cors_headers(answer) == {}, headers
        # The guard's other checks still hold for the allowed origin: a rebound Host.
        rebound = _preflight(client, "/api/executions", FRONT, Host="evil.example")
        assert rebound.status_code == 400 and _cors_headers(rebound) == {}


def test_without_allowed_origins_nothing_changes(settings: Settings) -> None:
    """No origin allowed: a preflight is refused (403) and no response varies by Origin."""
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert _preflight(client, "/api/executions", FRONT).status_code == 403
        answer = client.get("/api/executions", headers=AUTH)
        assert "vary" not in answer.headers and _cors_headers(answer) == {}


def _subprotocol(token: str) -> str:
    return "framepipe.token." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def test_the_live_feed_takes_an_allowed_origin_and_refuses_others(settings: Settings) -> None:
    """The WebSocket handshake goes by the same list: an allowed origin with the token gets
    the snapshot; an allowed origin without the token, or another origin with it, does not."""
    with Server(_allowing(settings, FRONT), pipelines=(quick,)) as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        with ws_connect(
            url, origin=FRONT, subprotocols=[_subprotocol(TOKEN)], open_timeout=10
        ) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url, origin=EVIL, subprotocols=[_subprotocol(TOKEN)], open_timeout=10)
        assert refused.value.response.status_code == 403
        with pytest.raises(InvalidStatus) as refused:  # no token
            ws_connect(url, origin=FRONT, open_timeout=10)
        assert refused.value.response.status_code == 403


# -- in Chromium -----------------------------------------------------------------------------


@contextlib.contextmanager
def front_end(tmp_path: Path, name: str) -> Iterator[str]:
    """The origin of a front end's page, served on a loopback port of its own meanwhile."""
    import http.server
    import socketserver

    folder = tmp_path / name
    folder.mkdir()
    (folder / "index.html").write_text(f"<!doctype html><title>{name}</title>")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    with socketserver.TCPServer(("127.0.0.1", 0), handler) as site:
        threading.Thread(target=site.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{site.server_address[1]}"
        finally:
            site.shutdown()


# What a front end does: read, submit, show a stored image (fetched with the token), listen.
_FRONT_END = """
async ({base, token, key}) => {
  const auth = {Authorization: `Bearer ${token}`};
  const out = {};
  try {
    const listed = await fetch(`${base}/api/executions`, {headers: auth});
    out.list = `${listed.status} ${Array.isArray(await listed.json())}`;
  } catch (err) { out.list = "blocked"; }
  try {
    const noToken = await fetch(`${base}/api/executions`);
    out.noToken = `${noToken.status}`;
  } catch (err) { out.noToken = "blocked"; }
  try {
    const sent = await fetch(`${base}/api/executions`, {
      method: "POST",
      headers: {...auth, "Content-Type": "application/json"},
      body: JSON.stringify({pipeline: "quick", inputs: {from: location.origin}}),
    });
    const body = await sent.json();
    out.submit = `${sent.status}`;
    out.id = body.id;
  } catch (err) { out.submit = "blocked"; }
  try {
    const image = await fetch(`${base}/api/objects/${key}`, {headers: auth});
    const bitmap = await createImageBitmap(await image.blob());
    out.image = `${bitmap.width}x${bitmap.height}`;
  } catch (err) { out.image = "blocked"; }
  out.socket = await new Promise((resolve) => {
    const encoded = btoa(token).replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
    const ws = new WebSocket(base.replace("http", "ws") + "/ws", [`framepipe.token.${encoded}`]);
    ws.onmessage = (m) => { resolve(JSON.parse(m.data).type); ws.close(); };
    ws.onerror = () => resolve("refused");
  });
  return out;
}
"""

# An open service's images in <img> tags of a page: with crossorigin (a CORS request, which
# sends the page's Origin) and without (no-cors, no Origin).
_IMAGES = """
async (urls) => Promise.all(urls.flatMap((url) => [true, false].map((cors) =>
  new Promise((resolve) => {
    const img = new Image();
    if (cors) img.crossOrigin = "anonymous";
    img.onload = () => resolve(`${img.naturalWidth}x${img.naturalHeight}`);
    img.onerror = () => resolve("blocked");
    img.src = url;
  }))))
"""


@pytest.mark.slow
def test_a_front_end_of_an_allowed_origin_uses_the_api_in_chromium(
    settings: Settings, tmp_path: Path
) -> None:
    """The page of an allowed origin (another port of this host) reads executions with the
    token, reads the 401 of a request without it, submits an execution (a preflighted POST),
    shows a stored image fetched with the token and gets the live feed's snapshot. The same
    page from a port not in the list gets nothing, and its submit never reaches the service."""
    sync_playwright = _playwright()
    with (
        front_end(tmp_path, "front") as front,
        front_end(tmp_path, "other") as other,
        Server(_allowing(settings, front), pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        assert client.put("/api/objects/frames/k.jpg", content=_jpeg(200, 120)).status_code == 201
        args = {"base": server.url, "token": TOKEN, "key": "frames/k.jpg"}
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(front)
                used = page.evaluate(_FRONT_END, args)
                page.goto(other)
                refused = page.evaluate(_FRONT_END, args)
            finally:
                browser.close()
        assert {k: v for k, v in used.items() if k != "id"} == {
            "list": "200 true",
            "noToken": "401",
            "submit": "201",
            "image": "200x120",
            "socket": "snapshot",
        }
        assert refused == {
            "list": "blocked",
            "noToken": "blocked",
            "submit": "blocked",
            "image": "blocked",
            "socket": "refused",
        }
        assert wait_status(client, used["id"])["status"] == "completed"
        executions = client.get("/api/executions").json()
        assert [e["id"] for e in executions] == [used["id"]]


@pytest.mark.slow
def test_an_allowed_origins_img_crossorigin_shows_the_services_images_in_chromium(
    settings: Settings, tmp_path: Path
) -> None:
    """A service without a token and the ``<img>`` of a page: with ``crossorigin`` (a CORS
    request) the allowed origin's page shows a stored object and a frame's thumbnail,
    ``Cross-Origin-Resource-Policy: same-origin`` notwithstanding; without it (no ``Origin``
    sent, so no page can be told from another) they stay blocked, and a page of an origin not
    in the list is shown neither."""
    sync_playwright = _playwright()
    with (
        front_end(tmp_path, "front") as front,
        front_end(tmp_path, "other") as other,
        Server(
            _allowing(settings, front),
            pipelines=(),
            token="",
            apps=[App("station", settings=settings)],
        ) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert client.put("/api/objects/frames/k.jpg", content=_jpeg(200, 120)).status_code == 201
        images = [
            f"{server.url}/api/objects/frames/k.jpg",
            f"{server.url}/api/segments/station/cam/frames/frames/k.jpg",
        ]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(front)
                allowed = page.evaluate(_IMAGES, images)
                page.goto(other)
                foreign = page.evaluate(_IMAGES, images)
            finally:
                browser.close()
        # per image: [crossorigin, plain]
        assert allowed == ["200x120", "blocked", "160x96", "blocked"]
        assert foreign == ["blocked"] * 4
