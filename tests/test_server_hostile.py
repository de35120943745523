"""The service against hostile neighbours and careless clients, over real HTTP and WebSockets.

Each test reproduces a way a real deployment was hurt: a web page driving the service of the
user who opened it (foreign ``Origin``, a DNS-rebinding ``Host``, a simple cross-site POST),
one string breaking every listing for good, inputs of any size, a token in access logs, a
non-ASCII token answered with a 500, server paths in error texts, a corrupt or read-only
state database."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect as ws_connect

from framepipe import Pipeline, StepContext
from framepipe.app import App
from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.backends.state.schema import events as events_table
from framepipe.backends.state.schema import executions as executions_table
from framepipe.config import Settings
from framepipe.server.panels import AppDashboard
from framepipe.sources import PatternSource
from framepipe.stream import StreamPipeline
from rawsocket import stalled_websocket
from test_server import AUTH, TOKEN, Server, wait_status
from waiting import free_port, wait_until

EVIL = "https://evil.example"

quick = Pipeline("quick")


@quick.step()
def only(ctx: StepContext) -> dict[str, Any]:
    return {"seen": sorted(ctx.inputs)}


@pytest.fixture
def open_server(settings: Settings) -> Iterator[Server]:
    """A service with no token: the default on loopback that web pages must still not use."""
    with Server(settings, pipelines=(quick,), token="") as running:
        yield running


def _ws(server: Server, path: str, **kwargs: Any) -> Any:
    return ws_connect(f"ws://127.0.0.1:{server.port}{path}", open_timeout=10, **kwargs)


def _refused_handshake(server: Server, path: str, **kwargs: Any) -> int:
    with pytest.raises(InvalidStatus) as refused, _ws(server, path, **kwargs):
        pass
    return int(refused.value.response.status_code)


# -- 1. other origins and hosts --------------------------------------------------------------


def test_a_web_page_of_another_origin_cannot_use_a_service_without_token(
    open_server: Server,
) -> None:
    own = f"http://127.0.0.1:{open_server.port}"
    with httpx.Client(base_url=open_server.url) as client:
        # A program (no Origin) and the service's own page may use it.
        assert client.get("/api/executions").status_code == 200
        assert client.get("/api/executions", headers={"Origin": own}).status_code == 200
        for origin in (EVIL, "null", f"http://127.0.0.1:{open_server.port + 1}"):
            read = client.get("/api/executions", headers={"Origin": origin})
            assert read.status_code == 403, origin
            assert "FRAMEPIPE_ALLOWED_ORIGINS" in read.json()["detail"]
        # The cross-site "simple" POST a page can send without a preflight: refused whether
        # the browser adds its Origin or not, and nothing is cancelled.
        submitted = client.post("/api/executions", json={"pipeline": "quick"})
        assert submitted.status_code == 201
        execution_id = submitted.json()["id"]
        simple = client.post(
            f"/api/executions/{execution_id}/cancel",
            content="{}",
            headers={"Content-Type": "text/plain", "Origin": EVIL},
        )
        assert simple.status_code == 403
        no_origin = client.post(
            f"/api/executions/{execution_id}/cancel",
            content="x=1",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert no_origin.status_code == 415
        assert "application/json" in no_origin.json()["detail"]
        # the proof nothing was cancelled: the execution ran to its end, completed
        assert wait_status(client, execution_id)["status"] == "completed"
        events = client.get("/api/events", params={"execution_id": execution_id}).json()
        assert "execution.completed" in [e["type"] for e in events["events"]]
        assert not [e for e in events["events"] if "cancel" in e["type"]]
    # WebSockets: the live feed and the detector endpoint refuse a foreign page's handshake.
    assert _refused_handshake(open_server, "/ws", origin=EVIL) == 403
    assert _refused_handshake(open_server, "/ws/detector", origin=EVIL) == 403
    with _ws(open_server, "/ws", origin=own) as ws:
        assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"


def test_a_dns_rebinding_host_is_refused(open_server: Server, settings: Settings) -> None:
    with httpx.Client(base_url=open_server.url) as client:
        rebound = client.get(
            "/api/executions", headers={"Host": f"evil.example:{open_server.port}"}
        )
        assert rebound.status_code == 400
        assert "FRAMEPIPE_ALLOWED_HOSTS" in rebound.json()["detail"]
        # The page's own origin matches its (rebound) host, yet the host is not ours.
        assert (
            client.get(
                "/", headers={"Host": "evil.example", "Origin": "http://evil.example"}
            ).status_code
            == 400
        )
        for host in (f"localhost:{open_server.port}", f"127.0.0.1:{open_server.port}"):
            assert client.get("/api/executions", headers={"Host": host}).status_code == 200
    # The handshake of a page on a rebound name reaches 127.0.0.1 with Host: evil.example.
    with (
        socket.create_connection(("127.0.0.1", open_server.port)) as sock,
        pytest.raises(InvalidStatus) as refused,
        ws_connect(f"ws://evil.example:{open_server.port}/ws", sock=sock, open_timeout=10),
    ):
        pass
    assert refused.value.response.status_code == 403


def test_hosts_and_origins_of_the_operators_choice_are_allowed(settings: Settings) -> None:
    chosen = settings.model_copy(
        update={"allowed_hosts": ["framepipe.lan"], "allowed_origins": ["https://ops.example"]}
    )
    with (
        Server(chosen, pipelines=(quick,), token="") as server,
        httpx.Client(base_url=server.url) as client,
    ):
        assert (
            client.get(
                "/api/executions",
                headers={"Host": "framepipe.lan", "Origin": "http://framepipe.lan"},
            ).status_code
            == 200
        )
        assert (
            client.get("/api/executions", headers={"Origin": "https://ops.example"}).status_code
            == 200
        )
        assert client.get("/api/executions", headers={"Host": "other.lan"}).status_code == 400


# What Chromium sends for an <img> of another site's page (no Origin), for a link followed from
# it, and for an iframe of it.
_EMBEDDED = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
_LINKED = {
    "Sec-Fetch-Site": "cross-site",
    "Sec-Fetch-Mode": "navigate",
    "Sec-Fetch-Dest": "document",
}
_FRAMED = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "iframe"}


def test_another_sites_page_cannot_embed_what_the_service_serves(open_server: Server) -> None:
    """A page of another site (or another port of this host: ``same-site``) loads the
    service's frames and objects as images, videos or frames; it sends no ``Origin``, only
    ``Sec-Fetch-*``: refused before any route runs. A link followed to the dashboard is not."""
    with httpx.Client(base_url=open_server.url) as client:
        assert client.put("/api/objects/k.bin", content=b"private").status_code == 201
        for headers in (_EMBEDDED, {**_EMBEDDED, "Sec-Fetch-Site": "same-site"}, _FRAMED):
            for path in ("/api/objects/k.bin", "/api/executions", "/metrics", "/"):
                refused = client.get(path, headers=headers)
                assert refused.status_code == 403, (path, headers)
                assert "another site" in refused.json()["detail"]
                assert "private" not in refused.text
        for path in ("/", "/api/objects/k.bin"):  # a top-level page the other site cannot read
            assert client.get(path, headers=_LINKED).status_code == 200
        own = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "no-cors"}
        assert client.get("/api/objects/k.bin", headers=own).content == b"private"
        typed = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"}
        assert client.get("/api/objects/k.bin", headers=typed).content == b"private"


def test_every_response_is_marked_private_to_the_services_own_pages(
    open_server: Server,
) -> None:
    """Each response (data, objects, errors, refusals) tells the browser not to sniff it, not
    to let another origin's page use it (``Cross-Origin-Resource-Policy``), not to cache it
    and, opened as a document, to run nothing and not be framed; the dashboard's files keep
    their own policy."""
    with httpx.Client(base_url=open_server.url) as client:
        client.put("/api/objects/k.bin", content=b"private")
        responses = [
            client.get("/api/executions"),
            client.get("/api/objects/k.bin"),
            client.get("/api/objects/missing"),
            client.get("/api/executions/" + "x" * 100),
            client.get("/health"),
            client.get("/nowhere"),
            client.get("/api/executions", headers={"Origin": EVIL}),
            client.post("/api/executions", content="{}", headers={"Content-Type": "text/plain"}),
        ]
        assert [r.status_code for r in responses] == [200, 200, 404, 422, 200, 404, 403, 415]
        for r in responses:
            assert r.headers["x-content-type-options"] == "nosniff", r.url
            assert r.headers["cross-origin-resource-policy"] == "same-origin", r.url
            assert r.headers["cache-control"] == "no-store", r.url
            csp = r.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp, r.url
        page = client.get("/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert page.headers["cross-origin-resource-policy"] == "same-origin"
        assert page.headers["cache-control"] == "no-cache"


# -- 2. strings that are not valid Unicode ------------------------------------------------------


def _post_raw(client: httpx.Client, body: str) -> httpx.Response:
    return client.post(
        "/api/executions", content=body.encode(), headers={"Content-Type": "application/json"}
    )


def _store_old_bad_rows(settings: Settings) -> str:
    """An execution and an event holding a lone surrogate, as versions before the boundary
    checks stored them."""
    store = StateStore(settings.resolved_database_url)
    now = time.time()
    with store.write() as conn:
        conn.execute(
            sa.insert(executions_table).values(
                id="bad" + "0" * 29,
                pipeline="quick",
                pipeline_ref=None,
                status="failed",
                inputs={"n": "\ud800"},
                progress=0.0,
                error=None,
                owner=None,
                heartbeat_at=now,
                cancel_requested=False,
                runs=1,
                created_at=now,
                started_at=now,
                finished_at=now,
            )
        )
        conn.execute(
            sa.insert(events_table).values(
                type="execution.failed",
                ts=now,
                execution_id="bad" + "0" * 29,
                step_key=None,
                data={"label": "\ud800"},
            )
        )
    store.close()
    return "bad" + "0" * 29


def test_lone_surrogates_are_refused_and_stored_ones_never_break_a_listing(
    settings: Settings,
) -> None:
    if settings.resolved_database_url.startswith("postgresql"):
        pytest.skip("PostgreSQL itself refuses a lone surrogate; only the refusal applies")
    bad_id = _store_old_bad_rows(settings)
    for _run in range(2):  # and after a restart of the service
        with (
            Server(settings, pipelines=(quick,)) as server,
            httpx.Client(base_url=server.url, headers=AUTH) as client,
        ):
            refused = _post_raw(client, '{"pipeline": "quick", "inputs": {"n": "\\ud800"}}')
            assert refused.status_code == 422
            assert "inputs.n" in refused.json()["detail"]
            assert "surrogate" in refused.json()["detail"]
            assert _post_raw(client, '{"pipeline": "\\ud800"}').status_code in (404, 422)
            assert (
                _post_raw(client, '{"pipeline": "quick", "inputs": {"\\udfff": 1}}').status_code
                == 422
            )
            nul = _post_raw(client, '{"pipeline": "quick", "inputs": {"n": "a\\u0000b"}}')
            assert nul.status_code == 422
            assert "NUL" in nul.json()["detail"]
            listing = client.get("/api/executions")
            assert listing.status_code == 200
            assert bad_id in [e["id"] for e in listing.json()]
            shown = client.get(f"/api/executions/{bad_id}")
            assert shown.status_code == 200
            assert "\\ud800" in shown.text  # shown escaped
            assert client.get("/api/events", params={"limit": 1000}).status_code == 200
            with _ws(server, "/ws", additional_headers=AUTH) as ws:
                snapshot = json.loads(ws.recv(timeout=10))
            assert snapshot["type"] == "snapshot"
            assert bad_id in [e["id"] for e in snapshot["executions"]]


class _Shelf(App):
    """An app whose dashboard serves the images of its own object store."""

    def __init__(self, settings: Settings, objects: ObjectStore) -> None:
        super().__init__("shelf", settings=settings)
        self.objects = objects

    def dashboard(self) -> AppDashboard:
        return AppDashboard(objects=lambda: self.objects)


def _raw(server: Server, path: str) -> httpx.URL:
    """``path`` sent as written: no client re-encodes or folds its escapes."""
    return httpx.URL(server.url).copy_with(raw_path=path.encode())


def test_an_object_key_that_is_not_utf8_is_refused_not_merged_into_another(
    settings: Settings, tmp_path: Path
) -> None:
    """``k%ff`` and ``k%fe`` were both decoded to ``k\\ufffd`` (the second upload overwrote
    the first, and either name read it); ``k%0A`` was stored as ``k``; ``a%0Ab`` found no
    route. Every route that takes an object key now reads it as the client sent it."""
    shelf_store = open_object_store(str(tmp_path / "shelf"))
    shelf_store.put("k\ufffd", b"real")
    with (
        Server(settings, pipelines=(quick,), apps=[_Shelf(settings, shelf_store)]) as server,
        httpx.Client(headers=AUTH) as client,
    ):
        for raw, shown in (
            ("k%ff", "'k%FF' (invalid start byte at byte 1)"),
            ("k%fe", "'k%FE' (invalid start byte at byte 1)"),
            ("%ED%A0%80", "'%ED%A0%80' (invalid continuation byte at byte 0)"),
            ("dir/k%C3", "'dir/k%C3' (unexpected end of data at byte 5)"),
        ):
            for method in ("PUT", "GET"):
                answer = client.request(method, _raw(server, f"/api/objects/{raw}"), content=b"x")
                assert answer.status_code == 400, (method, raw, answer.text)
                assert answer.json()["detail"].startswith(
                    f"object key is not valid UTF-8: {shown}"
                ), answer.text
            for path in (f"/api/apps/shelf/objects/{raw}", f"/api/segments/shelf/p/frames/{raw}"):
                answer = client.get(_raw(server, path))
                assert answer.status_code == 400, (path, answer.text)
                assert f"object key is not valid UTF-8: {shown}" in answer.json()["detail"]
        # A real U+FFFD, spelt in UTF-8, is a key like any other.
        stored = client.put(_raw(server, "/api/objects/k%EF%BF%BD"), content=b"mine")
        assert stored.status_code == 201 and stored.json()["key"] == "k\ufffd"
        assert client.get(_raw(server, "/api/objects/k%EF%BF%BD")).content == b"mine"
        assert client.get(_raw(server, "/api/apps/shelf/objects/k%EF%BF%BD")).content == b"real"
        # A newline is refused by name like every other control character, wherever it is.
        for raw, char in (("a%0Ab", "\\n"), ("k%0A", "\\n"), ("a%0Db", "\\r"), ("a%09b", "\\t")):
            answer = client.put(_raw(server, f"/api/objects/{raw}"), content=b"x")
            assert answer.status_code == 400, (raw, answer.text)
            assert f"contains the control character '{char}'" in answer.json()["detail"]
            answer = client.get(_raw(server, f"/api/apps/shelf/objects/{raw}"))
            assert answer.status_code == 400, (raw, answer.text)
        assert client.get(_raw(server, "/api/objects/k")).status_code == 404


# -- 4. sizes -----------------------------------------------------------------------------------


def test_inputs_have_a_size_limit_and_listings_do_not_carry_them(settings: Settings) -> None:
    limited = settings.model_copy(update={"max_inputs_bytes": 20_000})
    with (
        Server(limited, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        over = client.post(
            "/api/executions", json={"pipeline": "quick", "inputs": {"blob": "x" * 30_000}}
        )
        assert over.status_code == 413
        assert "FRAMEPIPE_MAX_INPUTS_BYTES" in over.json()["detail"]
        huge = client.post(
            "/api/executions", json={"pipeline": "quick", "inputs": {"blob": "x" * 2_000_000}}
        )
        assert huge.status_code == 413  # refused before the body is read whole
        deep = _post_raw(
            client, '{"pipeline": "quick", "inputs": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
        )
        assert deep.status_code in (400, 422)
        near = client.post(
            "/api/executions", json={"pipeline": "quick", "inputs": {"blob": "y" * 15_000}}
        )
        assert near.status_code == 201
        listing = client.get("/api/executions", params={"limit": 1})
        assert listing.status_code == 200
        assert "inputs" not in listing.json()[0]
        assert len(listing.content) < 2_000
        full = client.get(f"/api/executions/{near.json()['id']}")
        assert full.json()["inputs"]["blob"] == "y" * 15_000


def test_an_upload_is_streamed_to_disk_not_held_in_memory(settings: Settings) -> None:
    size = 48 * 1024 * 1024
    roomy = settings.model_copy(update={"max_upload_bytes": 64 * 1024 * 1024})
    chunk = os.urandom(1024 * 1024)

    def body() -> Iterator[bytes]:
        for _ in range(size // len(chunk)):
            yield chunk

    with (
        Server(roomy, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client,
    ):
        tracemalloc.start()
        try:
            stored = client.put("/api/objects/big/upload.bin", content=body())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert stored.status_code == 201
        assert stored.json()["size"] == size
        assert peak < size // 4, f"the upload held {peak} bytes in memory"
        small = settings.model_copy(update={"max_upload_bytes": 1000})
    with (
        Server(small, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        over = client.put("/api/objects/over.bin", content=iter([b"x" * 600, b"y" * 600]))
        assert over.status_code == 413
        assert client.get("/api/objects/over.bin").status_code == 404  # nothing half-stored


def _store_big(store: ObjectStore, key: str, size: int) -> str:
    """Store ``size`` random bytes under ``key``; their SHA-256."""
    written = hashlib.sha256()
    with tempfile.TemporaryDirectory() as folder:
        video = Path(folder) / "video.mp4"
        with video.open("wb") as file:
            for _ in range(size // (1024 * 1024)):
                chunk = os.urandom(1024 * 1024)
                written.update(chunk)
                file.write(chunk)
        store.put_file(key, video)
    return written.hexdigest()


def _download(client: httpx.Client, path: str) -> tuple[httpx.Response, str, int]:
    """GET ``path`` streamed: the response, the SHA-256 of its body and the peak of the
    memory this process (the service's too) allocated meanwhile."""
    received = hashlib.sha256()
    tracemalloc.start()
    try:
        with client.stream("GET", path) as download:
            for part in download.iter_bytes():
                received.update(part)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return download, received.hexdigest(), peak


def test_a_download_is_streamed_not_held_in_memory(settings: Settings, tmp_path: Path) -> None:
    """A result video of any size: GET /api/objects/{key} costs the service a chunk of memory,
    not the object, and sends it whole, as data no browser runs; so does an object of an
    app's own store at /api/apps/{app}/objects/{key} (which read it whole into memory)."""
    size = 48 * 1024 * 1024
    with open_object_store(settings.resolved_objects_url) as store:
        written = _store_big(store, "results/video.mp4", size)
    shelf_store = open_object_store(str(tmp_path / "shelf"))
    on_shelf = _store_big(shelf_store, "clips/video.mp4", size)
    with (
        Server(settings, pipelines=(quick,), apps=[_Shelf(settings, shelf_store)]) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as client,
    ):
        for path, expected in (
            ("/api/objects/results/video.mp4", written),
            ("/api/apps/shelf/objects/clips/video.mp4", on_shelf),
        ):
            download, received, peak = _download(client, path)
            assert download.status_code == 200, path
            assert peak < size // 4, f"{path}: the download held {peak} bytes in memory"
            assert received == expected, path
            assert download.headers["content-length"] == str(size)
            assert download.headers["content-type"] == "application/octet-stream"
            assert download.headers["x-content-type-options"] == "nosniff"
        missing = client.get("/api/objects/results/none.mp4")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "no object 'results/none.mp4'"
        missing = client.get("/api/apps/shelf/objects/none.jpg")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "no object 'none.jpg' in app 'shelf''s store"
    shelf_store.close()


def test_a_live_feed_subscriber_that_stops_reading_is_cut_off(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A subscriber whose connection takes nothing more (a client that stopped reading) is cut
    off, instead of being held with the events committed meanwhile for as long as its
    connection lasts; a subscriber that reads gets every event all along."""
    caplog.set_level("WARNING", logger="framepipe")
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
        _ws(server, "/ws", additional_headers=AUTH) as reader,
        stalled_websocket(server.port, "/ws", TOKEN) as stalled,
    ):
        assert json.loads(reader.recv(timeout=10))["type"] == "snapshot"
        reader_port, stalled_port = reader.socket.getsockname()[1], stalled.getsockname()[1]
        # The reader reads while the executions are submitted: one that waited for the end
        # would be a stalled subscriber too (its client stops taking from the socket once 16
        # messages wait, and closes when its keepalive pings go unanswered behind them).
        created: set[str] = set()
        others: list[dict[str, Any]] = []  # anything but events and progress: a lagged

        def read() -> None:
            with contextlib.suppress(ConnectionClosed):
                for text in reader:
                    message = json.loads(text)
                    if message["type"] == "event":
                        if message["event"]["type"] == "execution.created":
                            created.add(message["event"]["execution_id"])
                    elif message["type"] != "pipeline:progress":
                        others.append(message)

        reading = threading.Thread(target=read, name="reader", daemon=True)
        reading.start()
        # inputs just under what an execution.created event carries (16 KiB of JSON): each
        # submit sends the subscribers about 15 KB, 9 MB in all, more than the buffers hold
        submitted = {
            client.post(
                "/api/executions", json={"pipeline": "quick", "inputs": {"blob": "x" * 15_000}}
            ).json()["id"]
            for _ in range(600)
        }

        def cut_off(port: int) -> bool:
            peer = f"the subscriber at 127.0.0.1:{port} "
            return any(
                peer in r.getMessage() and "it is cut off" in r.getMessage() for r in caplog.records
            )

        wait_until("the stalled subscriber to be cut off", lambda: cut_off(stalled_port), 60)
        wait_until(
            "the reader to get every execution.created",
            lambda: created >= submitted or not reading.is_alive(),
            120,
            explain=lambda: f"{len(created & submitted)} of 600 came",
        )
        assert created >= submitted, f"the reader got {len(created & submitted)} of 600"
        assert others == []
        assert reading.is_alive()  # its connection is open
        assert not cut_off(reader_port)
        # What the service had sent before it cut the stalled subscriber off, then the end.
        stalled.settimeout(30)
        while stalled.recv(1 << 20):
            pass
    reading.join(10)


# -- 5. links and strange files in shared folders ----------------------------------------------


def test_a_preview_linked_out_of_the_previews_folder_is_not_served(
    settings: Settings, tmp_path: Path
) -> None:
    """Whoever may write in the run folder links a preview (or an app's previews folder) to a
    file of the server's user: the service answers 404, not the file."""
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 not for the web")
    apps = settings.run_dir / "apps"
    (apps / "cam").mkdir(parents=True)
    (apps / "cam" / "gate.jpg").write_bytes(b"\xff\xd8 a frame")
    (apps / "cam" / "door.jpg").symlink_to(secret)
    (apps / "linked").symlink_to(tmp_path, target_is_directory=True)
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        frame = client.get("/api/sources/cam/gate/frame")
        assert frame.status_code == 200
        assert frame.content == b"\xff\xd8 a frame"
        for path in ("/api/sources/cam/door/frame", "/api/sources/linked/secret/frame"):
            refused = client.get(path)
            assert refused.status_code == 404, path
            assert b"not for the web" not in refused.content
            assert "link" in refused.json()["detail"]
            assert str(tmp_path) not in refused.text
        assert client.get("/api/sources/cam/none/frame").status_code == 404


def test_a_snapshot_of_another_shape_does_not_break_the_sources(settings: Settings) -> None:
    """Health snapshots of another version or a neighbour's in the run folder: the sources
    of the apps that wrote theirs as apps do are listed and sampled, the others left out."""
    apps = settings.run_dir / "apps"
    apps.mkdir(parents=True)
    good = {
        "name": "station",
        "state": "stopped",
        "updated_at": time.time(),
        "pipeline_status": {"cam": {"state": "ok", "frames_captured": 12}},
    }
    (apps / "station.json").write_text(json.dumps(good))
    odd = [
        {"name": 5, "state": "stopped", "pipeline_status": {"cam": {}}},
        {"name": "b", "state": "stopped", "pipeline_status": ["cam"]},
        {"name": "c", "state": "stopped", "pipeline_status": {"cam": 3}},
        {"name": "n", "pipeline_status": {"cam": {}}},  # no state
        # the shape apps write, with fields of another version's
        {"name": "d", "pipeline_status": {"cam": {"source": "x", "capture_fps": "fast"}}},
        {"name": "e", "pipeline_status": {"cam": {"source": {"frames": "many", "uptime": 2}}}},
        {"name": "f", "updated_at": "soon", "pipeline_status": {"cam": {}}},
        {"name": "g", "pipeline_status": {"cam": {"frames_captured": "many"}}},
    ]
    for snapshot in odd[4:]:
        snapshot["state"] = "running"
    for i, snapshot in enumerate(odd):
        (apps / f"odd{i}.json").write_text(json.dumps(snapshot))
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        listed = client.get("/api/sources")
        assert listed.status_code == 200
        rows = {(r["app"], r["pipeline"]): r for r in listed.json()}
        assert rows[("station", "cam")]["state"] == "ok"
        assert set(rows) <= {("station", "cam"), *((a, "cam") for a in "defg")}
        assert rows[("e", "cam")]["fps"] is None
        wait_until(
            "a sample of the station's camera",
            lambda: client.get("/api/sources/station/cam/history").json()["samples"],
            30,
        )


# -- 6. tokens, paths, databases ----------------------------------------------------------------


def test_a_non_ascii_token_is_refused_not_a_server_error(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        for raw in (b"Bearer \xc3\xa9", b"Bearer \xff\xfe", "Bearer é".encode()):
            denied = client.get("/api/executions", headers={"Authorization": raw})
            assert denied.status_code == 401
        for path in ("/ws?token=%C3%A9", "/ws/detector?token=%C3%A9", "/ws?token=%FF"):
            assert _refused_handshake(server, path) == 403
        encoded = base64.urlsafe_b64encode(b"\xc3\xa9").decode().rstrip("=")
        assert _refused_handshake(server, "/ws", subprotocols=[f"framepipe.token.{encoded}"]) == 403
        # The token as a subprotocol (what the dashboard sends) or a header is accepted.
        good = base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")
        with _ws(server, "/ws", subprotocols=[f"framepipe.token.{good}"]) as ws:
            assert ws.subprotocol == f"framepipe.token.{good}"
            assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def test_error_details_do_not_carry_server_paths(settings: Settings) -> None:
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        missing = client.get("/api/objects/nowhere/x.bin")
        assert missing.status_code == 404
        assert missing.json()["detail"] == "no object 'nowhere/x.bin'"
        for response in (missing, client.get("/api/executions/nope")):
            assert str(settings.home.resolve()) not in response.text
            assert "file://" not in response.text


leaky = Pipeline("leaky")
_SECRET = "s3cr3t-pw"


@leaky.step()
def connect(ctx: StepContext) -> dict[str, Any]:
    raise RuntimeError(f"could not connect to postgresql://app:{_SECRET}@db.internal/prod")


def test_no_answer_shows_the_secret_of_a_url_whatever_stored_it(settings: Settings) -> None:
    """A step failing with its database's URL in the message, an input naming a camera with
    its password, a live source whose id is such a URL: the error, the steps, the events, the
    status, the live feed, the sources and /metrics each showed the password as it was."""
    station = App("station", settings=settings, health_interval=0.1)
    camera = f"rtsp://admin:{_SECRET}@10.0.0.5/stream?token={_SECRET}"
    station.add_pipeline(StreamPipeline("door", PatternSource(camera, fps=20)))
    with (
        Server(settings, pipelines=(leaky,), apps=[station]) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        execution_id = client.post(
            "/api/executions", json={"pipeline": "leaky", "inputs": {"camera": camera}}
        ).json()["id"]
        assert wait_status(client, execution_id)["status"] == "failed"
        wait_until(
            "the source to run",
            lambda: [s["state"] for s in client.get("/api/sources").json()] == ["running"],
        )
        answers = {
            path: client.get(path).text
            for path in (
                "/api/executions",
                f"/api/executions/{execution_id}",
                f"/api/status/{execution_id}",
                f"/api/events?execution_id={execution_id}",
                "/api/events?limit=1000",
                "/api/sources",
                "/metrics",
            )
        }
        with _ws(server, f"/ws?execution_id={execution_id}", additional_headers=AUTH) as ws:
            answers["/ws"] = ws.recv(timeout=10)
        for path, text in answers.items():
            assert _SECRET not in text, path
        shown = json.loads(answers[f"/api/executions/{execution_id}"])
        assert "postgresql://app:***@db.internal/prod" in shown["error"]
        assert shown["inputs"]["camera"] == "rtsp://admin:***@10.0.0.5/stream?token=***"
        assert "rtsp://admin:***@10.0.0.5" in answers["/metrics"]
        from prometheus_client.parser import text_string_to_metric_families

        sources = {  # still valid exposition, the URL masked inside its label
            sample.labels.get("source")
            for family in text_string_to_metric_families(answers["/metrics"])
            for sample in family.samples
        }
        assert "rtsp://admin:***@10.0.0.5/stream?token=***" in sources


def test_the_schema_is_public_and_holds_no_data_and_no_page_loads_outside_scripts(
    settings: Settings,
) -> None:
    """/docs and /redoc would load Swagger UI and ReDoc from a CDN into the service's origin
    (where the dashboard keeps its token): not served. Nothing the service serves names
    another origin's script."""
    with (
        Server(settings, pipelines=(quick,)) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        schema = client.get("/openapi.json")
        assert schema.status_code == 200
        assert "quick" not in schema.text  # the same for every installation
        for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            assert client.get(page).status_code == 404, page
        assert "cdn." not in client.get("/").text
        assert client.get("/api/pipelines").status_code == 401


def test_health_and_submit_tell_the_truth_on_a_read_only_database(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    StateStore(settings.resolved_database_url).close()
    read_only = StateStore(
        f"sqlite:///file:{tmp_path / 'state.db'}?mode=ro&uri=true", migrate=False
    )
    try:
        with (
            Server(settings, pipelines=(quick,), store=read_only) as server,
            httpx.Client(base_url=server.url, headers=AUTH) as client,
        ):
            health = client.get("/health")
            assert health.status_code == 503
            assert health.json()["database"].startswith("read-only")
            refused = client.post("/api/executions", json={"pipeline": "quick"})
            assert refused.status_code == 503
            assert "readonly database" in refused.json()["detail"]
            assert str(tmp_path) not in refused.text
    finally:
        read_only.close()


def _serve(
    home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "framepipe",
            "--home",
            str(home),
            "serve",
            "--port",
            str(free_port()),
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "FRAMEPIPE_API_TOKEN": "", **(env or {})},
    )


@pytest.mark.slow
def test_serve_on_a_corrupt_or_read_only_database_says_so_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"this is not SQLite " * 500)
    corrupt = _serve(tmp_path)
    assert corrupt.returncode == 1
    assert "Traceback" not in corrupt.stderr
    assert "file is not a database" in corrupt.stderr
    assert len(corrupt.stderr.strip().splitlines()) <= 2
    good = tmp_path / "good"
    good.mkdir()
    StateStore(f"sqlite:///{good / 'state.db'}").close()
    read_only = _serve(
        good, env={"FRAMEPIPE_DATABASE_URL": f"sqlite:///file:{good / 'state.db'}?mode=ro&uri=true"}
    )
    assert read_only.returncode == 1
    assert "Traceback" not in read_only.stderr
    assert "readonly" in read_only.stderr


@pytest.mark.slow
def test_a_blank_token_is_refused(tmp_path: Path) -> None:
    for blank in (" ", "  padded-token-of-enough-length  "):
        result = _serve(tmp_path, "--host", "0.0.0.0", env={"FRAMEPIPE_API_TOKEN": blank})
        assert result.returncode == 2
        assert "FRAMEPIPE_API_TOKEN" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_serve_makes_a_token_and_keeps_tokens_out_of_its_log(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "framepipe", "--home", str(tmp_path), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "FRAMEPIPE_API_TOKEN": "", "FRAMEPIPE_LOG_LEVEL": "INFO"},
    )
    try:
        assert proc.stdout is not None
        link = ""
        deadline = time.monotonic() + 30
        while "#token=" not in link and time.monotonic() < deadline:
            link = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#token=" in link
        token = link.strip().rsplit("#token=", 1)[1]
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until("the service to answer /health", healthy, 10, interval=0.1)
        assert httpx.get(f"{url}/api/executions").status_code == 401
        assert (
            httpx.get(
                f"{url}/api/executions", headers={"Authorization": f"Bearer {token}"}
            ).status_code
            == 200
        )
        with ws_connect(f"ws://127.0.0.1:{port}/ws?token={token}", open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=10))["type"] == "snapshot"
        httpx.get(f"{url}/?token={token}")
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "GET /ws?token=***" in out or "/ws?token=***" in out
    assert "/?token=***" in out
    assert token not in out


def test_the_demo_import_names_no_folder_of_the_server_over_http(tmp_path: Path) -> None:
    """The demo's card is a declared local folder: over HTTP, with no input roots, a client
    cannot point it at a folder of the server; inside a configured root it imports."""
    from framepipe.demo import pipeline as demo_import
    from framepipe.demo import prepare_card

    card = tmp_path / "cards" / "sd1"
    prepare_card(card, 1)
    for roots, expected in (([], 422), ([tmp_path / "cards"], 201)):
        settings = Settings(home=tmp_path / f"home{len(roots)}", input_roots=roots)
        with (
            Server(settings, pipelines=(demo_import,)) as server,
            httpx.Client(base_url=server.url, headers=AUTH) as client,
        ):
            details = []
            for folder in ("/etc/ssl", "/nowhere/ssl"):
                answer = client.post(
                    "/api/executions", json={"pipeline": "demo_import", "inputs": {"card": folder}}
                )
                assert answer.status_code == 422, folder
                details.append(answer.json()["detail"])
            assert details[0] == details[1]  # whether the folder exists is not told
            assert "inputs.card" in details[0]
            ours = client.post(
                "/api/executions", json={"pipeline": "demo_import", "inputs": {"card": str(card)}}
            )
            assert ours.status_code == expected, ours.text
