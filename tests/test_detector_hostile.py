"""The detector hub (``/ws/detector``) against hostile and careless detectors (issue 14).

Real components only: the service on uvicorn (SQLite state) with the SD import's hub, real
WebSocket clients playing detectors, and the real detector process for the token's transport.
Each test reproduces one hole: a malformed ``hello`` that left a zombie detector, a binary frame
that dropped the connection without a close frame, text that cannot be stored (a lone surrogate,
NUL) reaching ``/api/detectors`` and execution inputs, file lists with paths such as ``.`` or
``x\\x00.mp4`` starting an import, and a detector taking over another detector's card session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ConfigDict, Field
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect
from websockets.sync.server import ServerConnection, serve

from conftest import need_modules
from framepipe.config import Settings
from framepipe.jobs.loading import load_pipeline
from framepipe.server.detector import DetectorHub, DetectorMessage
from rawsocket import send_text, stalled_websocket
from test_example_sd_import import Detector, imports_of, wait_for
from test_server import AUTH, TOKEN, Server
from waiting import free_port, wait_until, wait_until_async

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sd_import"

pytestmark = pytest.mark.timeout(120)

need_modules("segno", "zxingcpp", install="pip install 'framepipe[qr]' segno")

sys.path.insert(0, str(EXAMPLE))
import backend as sd_backend  # noqa: E402  (examples/sd_import/backend.py)


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[tuple[Server, Any]]:
    """The service with the SD import's detector hub (nothing is ever copied here)."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 's.db'}",
        retry_initial_delay=0.2,
        retry_max_delay=1.0,
        shutdown_grace=2.0,
    )
    pipeline = load_pipeline(sd_backend.PIPELINE_REF)
    hub = sd_backend.make_hub(pipeline, shared_dir=tmp_path / "shared", reconnect_wait=1)
    with Server(settings, pipelines=(pipeline,), detector_hub=hub) as server:
        yield server, hub


def ws_url(server: Server) -> str:
    return f"{server.url.replace('http', 'ws')}/ws/detector"


def connect(server: Server) -> ClientConnection:
    return ws_connect(ws_url(server), additional_headers=AUTH)


def recv(ws: ClientConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(ws.recv(10))
    return message


def hello(ws: ClientConnection, detector_id: str, **extra: Any) -> dict[str, Any]:
    ws.send(json.dumps({"type": "detector:hello", "detector_id": detector_id, **extra}))
    return recv(ws)


def detectors(server: Server) -> list[dict[str, Any]]:
    listed = httpx.get(f"{server.url}/api/detectors", headers=AUTH)
    assert listed.status_code == 200, listed.text
    body: list[dict[str, Any]] = listed.json()
    return body


def executions(server: Server) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = httpx.get(f"{server.url}/api/executions", headers=AUTH).json()
    return rows


def closed_with(ws: ClientConnection) -> int:
    """The close code the server sent (fails if the connection dropped without one)."""
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(10)
    assert closed.value.rcvd is not None, "dropped without a close frame"
    return closed.value.rcvd.code


BAD_HELLOS: list[tuple[dict[str, Any], str]] = [
    ({"detector_id": "z", "sessions": 5}, "hello.sessions"),
    ({"detector_id": "z", "sessions": [5]}, "hello.sessions[0]"),
    ({"detector_id": "z", "sessions": [{"card_id": "C"}]}, "hello.sessions[0].session_id"),
    ({"detector_id": "z", "sessions": [{"session_id": 7}]}, "hello.sessions[0].session_id"),
    (
        {"detector_id": "z", "sessions": [{"session_id": "s", "label": ["x"]}]},
        "hello.sessions[0].label",
    ),
    ({"detector_id": "\ud800"}, "hello.detector_id"),
    ({"detector_id": "a\x00b"}, "hello.detector_id"),
    ({"detector_id": "x" * 300}, "hello.detector_id"),
    ({"detector_id": "line\nbreak"}, "hello.detector_id"),
    ({"detector_id": "   "}, "hello.detector_id"),
    ({"detector_id": 5}, "hello.detector_id"),
    ({"detector_id": "z", "hostname": {"a": 1}}, "hello.hostname"),
    ({"detector_id": "z", "hostname": "evil\x1b[31m"}, "hello.hostname"),
    ({"detector_id": "z", "platform": "\ud83d"}, "hello.platform"),
    ({"detector_id": "z", "extra": {"deep": "\x00"}}, "hello.extra.deep"),
]


@pytest.mark.parametrize(
    ("fields", "where"), BAD_HELLOS, ids=[w + f"-{i}" for i, (_, w) in enumerate(BAD_HELLOS)]
)
def test_a_malformed_hello_is_refused_with_the_field_and_leaves_no_detector(
    hub_server: tuple[Server, Any], fields: dict[str, Any], where: str
) -> None:
    server, hub = hub_server
    with connect(server) as ws:
        ws.send(json.dumps({"type": "detector:hello", **fields}))
        answer = recv(ws)
        assert answer["type"] == "error", answer
        assert answer["field"] == where, answer
        assert where in answer["detail"]
        assert closed_with(ws) == 1008
    assert detectors(server) == []
    assert hub._connections.by_id == {} and hub._book.owners == {}  # nothing was registered


def test_hello_that_is_not_json_or_binary_is_refused_with_a_close_frame(
    hub_server: tuple[Server, Any],
) -> None:
    server, _ = hub_server
    for first in (
        b"\x00\x01 binary",
        "{not json",
        "[" * 100_000,
        '{"type": "detector:hello", "detector_id": "z", "n": NaN}',
    ):
        with connect(server) as ws:
            ws.send(first)
            answer = recv(ws)
            assert answer["type"] == "error", answer
            assert closed_with(ws) in (1003, 1008)
    assert detectors(server) == []


def test_a_binary_frame_after_hello_is_answered_and_the_connection_stays(
    hub_server: tuple[Server, Any],
) -> None:
    server, _ = hub_server
    with connect(server) as ws:
        assert hello(ws, "bin")["type"] == "detector:welcome"
        ws.send(b"\x89PNG\r\n\x1a\n")
        answer = recv(ws)
        assert answer["type"] == "error" and "binary" in answer["detail"], answer
        ws.send(json.dumps({"type": "sd:eject_all"}))  # still connected and served
        assert "unknown message type 'sd:eject_all'" in recv(ws)["detail"]
        assert [d["detector_id"] for d in detectors(server)] == ["bin"]


def test_text_that_cannot_be_stored_is_refused_at_the_boundary_naming_the_field(
    hub_server: tuple[Server, Any],
) -> None:
    server, _ = hub_server
    good_file = {"path": "DCIM/a.mp4", "size": 10, "mtime": 1.0, "fingerprint": "0123456789"}
    with connect(server) as ws:
        assert hello(ws, "text")["type"] == "detector:welcome"
        refused = [
            (
                {
                    "type": "detector:sd_inserted",
                    "session_id": "s1",
                    "card_id": "C-1",
                    "label": "\ud800",
                },
                "message.label",
            ),
            (
                {"type": "detector:sd_inserted", "session_id": "s2", "card_id": "C\x00"},
                "message.card_id",
            ),
            (
                {
                    "type": "sd:file_list",
                    "session_id": "s3",
                    "card_id": "C-3",
                    "label": "\udfff",
                    "files": [good_file],
                },
                "message.label",
            ),
            (
                {
                    "type": "sd:file_list",
                    "session_id": "s4",
                    "card_id": "C-4",
                    "files": [good_file, {**good_file, "fingerprint": "01234567\ud800"}],
                },
                "message.files[1].fingerprint",
            ),
            ({"type": "detector:sd_inserted", "session_id": "\ud800"}, "message.session_id"),
            ({"type": "detector:sd_inserted", "session_id": 12}, "message.session_id"),
            ({"type": "detector:sd_inserted", "session_id": "s" * 300}, "message.session_id"),
            (
                {"type": "detector:sd_inserted", "session_id": "s5", "file_count": "many"},
                "message.file_count",
            ),
        ]
        for message, where in refused:
            ws.send(json.dumps(message))
            answer = recv(ws)
            assert answer["type"] == "error", (message, answer)
            assert answer["field"] == where, (message, answer)
            assert where in answer["detail"]
        # Not JSON a store can hold: non-finite numbers, nesting past the limit.
        ws.send('{"type": "detector:sd_inserted", "session_id": "s6", "file_count": Infinity}')
        assert recv(ws)["field"] == "message.file_count"
        ws.send('{"type": "x", "deep": ' + "[" * 100_000 + "]" * 100_000 + "}")
        assert "nested" in recv(ws)["detail"]
        nested: Any = 1
        for _ in range(80):
            nested = [nested]
        ws.send(json.dumps({"type": "x", "deep": nested}))
        assert "nested" in recv(ws)["detail"]
        # The connection stayed; nothing refused was recorded or started.
        ws.send(
            json.dumps(
                {
                    "type": "detector:sd_inserted",
                    "session_id": "ok-1",
                    "card_id": "C-OK",
                    "label": "fine",
                }
            )
        )
        ws.send(json.dumps({"type": "sd:eject_all"}))
        assert "unknown message type" in recv(ws)["detail"]
        listed = detectors(server)
        assert [s["session_id"] for s in listed[0]["sessions"]] == ["ok-1"]
    assert executions(server) == []


def test_api_detectors_never_fails_on_what_is_stored(hub_server: tuple[Server, Any]) -> None:
    """Whatever text a hub holds (stored before the checks existed, or by a handler), the
    listing answers 200 with it escaped."""
    server, hub = hub_server
    with connect(server) as ws:
        assert hello(ws, "robust", hostname="host")["type"] == "detector:welcome"
        ws.send(
            json.dumps({"type": "detector:sd_inserted", "session_id": "weird", "label": "fine"})
        )
        # recorded (no answer comes: the example's handler says nothing)
        wait_until("the session to be recorded", lambda: "weird" in hub._book.open)
        planted = threading.Event()

        def plant() -> None:  # as if stored before the boundary checks existed
            hub._book.open["weird"]["label"] = "\ud800"
            hub._connections.by_id["robust"].hello["hostname"] = "x\udc80"
            planted.set()

        hub._loop.call_soon_threadsafe(plant)
        assert planted.wait(10)
        got = httpx.get(f"{server.url}/api/detectors", headers=AUTH)
        assert got.status_code == 200, got.text
        assert "\\ud800" in got.text
        assert got.json()[0]["sessions"][0]["session_id"] == "weird"


BAD_PATHS = [
    ".",
    "..",
    "x\x00.mp4",
    "/etc/passwd",
    "DCIM\\a.mp4",
    "a/../b.mp4",
    "./a.mp4",
    "",
    "C:a.mp4",
    "DCIM/./a.mp4",
]


@pytest.mark.parametrize("bad", BAD_PATHS, ids=[repr(p) for p in BAD_PATHS])
def test_a_file_list_with_a_bad_path_is_refused_naming_the_entry_and_starts_nothing(
    hub_server: tuple[Server, Any], bad: str
) -> None:
    server, _ = hub_server
    files = [
        {"path": f"DCIM/{n}.mp4", "size": 10 + n, "mtime": 1.0 + n, "fingerprint": f"{n:010d}"}
        for n in range(3)
    ]
    files.append({"path": bad, "size": 50, "mtime": 9.0, "fingerprint": "9999999999"})
    with connect(server) as ws:
        assert hello(ws, "paths")["type"] == "detector:welcome"
        ws.send(
            json.dumps(
                {
                    "type": "sd:file_list",
                    "session_id": "p1",
                    "card_id": "CARD-1",
                    "label": "CARD",
                    "files": files,
                }
            )
        )
        answer = recv(ws)
        assert answer["type"] == "error", answer
        assert "files[3]" in answer["detail"], answer
        assert "nothing started" in answer["detail"] or answer.get("field"), answer
    assert executions(server) == []


def test_a_file_list_naming_one_path_twice_is_refused(hub_server: tuple[Server, Any]) -> None:
    server, _ = hub_server
    entry = {"path": "DCIM/a.mp4", "size": 10, "mtime": 1.0, "fingerprint": "0123456789"}
    with connect(server) as ws:
        assert hello(ws, "dups")["type"] == "detector:welcome"
        ws.send(
            json.dumps(
                {
                    "type": "sd:file_list",
                    "session_id": "d1",
                    "card_id": "CARD-2",
                    "files": [entry, {**entry, "path": "DCIM//a.mp4"}],
                }
            )
        )
        answer = recv(ws)
        assert "files[1].path" in answer["detail"] and "files[0]" in answer["detail"], answer
    assert executions(server) == []


def _ask(
    hub: Any, session_id: str, timeout: float = 10
) -> concurrent.futures.Future[dict[str, Any]]:
    """``hub.request`` for a copy, made on the service's loop from a test thread."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(
        hub.request_sync,
        session_id,
        {"type": "sd:copy_request", "path": "DCIM/a.mp4", "dest": "C/DCIM/a.mp4"},
        answer_timeout=timeout,
        what="the copy of DCIM/a.mp4",
    )
    pool.shutdown(wait=False)
    return future


def test_a_detector_that_stops_reading_is_cut_off_and_holds_no_send_up(
    hub_server: tuple[Server, Any],
) -> None:
    """A detector whose connection takes nothing more (it stopped reading; its buffers are
    full): the send that cannot go out fails after SEND_TIMEOUT instead of waiting for as long
    as the connection lasts (holding every later send to it), and the detector is cut off, so
    the backend sees it gone; a reconnect is served as before."""
    server, hub = hub_server
    sock = stalled_websocket(server.port, "/ws/detector", TOKEN)
    hello_message = {"type": "detector:hello", "detector_id": "stuck"}
    send_text(sock, json.dumps({**hello_message, "sessions": [{"session_id": "s1"}]}))
    try:
        wait_until("the detector to be connected", lambda: hub.is_connected("stuck"), 10)
        blob = "x" * 200_000
        started = time.monotonic()
        outcomes = []
        while len(outcomes) < 200 and (not outcomes or outcomes[-1]):
            outcomes.append(hub.send_sync("s1", {"type": "sd:status", "blob": blob}, wait=60))
        assert outcomes[-1] is False, "every send went out: the client never stalled"
        assert time.monotonic() - started < 50
        wait_until("the stalled detector to be gone", lambda: not hub.is_connected("stuck"), 10)
        assert hub.send_sync("s1", {"type": "sd:status"}, wait=5) is False  # at once
    finally:
        sock.close()
    with connect(server) as again:
        assert hello(again, "stuck", sessions=[{"session_id": "s1"}])["type"] == "detector:welcome"
        assert hub.send_sync("s1", {"type": "sd:status", "n": 1}, wait=10) is True
        assert recv(again)["n"] == 1


def test_send_sync_raises_timeout_error_past_its_wait(hub_server: tuple[Server, Any]) -> None:
    """A send to a detector that stopped reading cannot finish: ``send_sync`` gives up after
    ``wait`` with :class:`TimeoutError`, as documented, and does not block its thread."""
    server, hub = hub_server
    sock = stalled_websocket(server.port, "/ws/detector", TOKEN)
    hello_message = {"type": "detector:hello", "detector_id": "slow"}
    send_text(sock, json.dumps({**hello_message, "sessions": [{"session_id": "s9"}]}))
    try:
        wait_until("the detector to be connected", lambda: hub.is_connected("slow"), 10)
        blob = "x" * 200_000
        raised: BaseException | None = None
        for _ in range(200):  # until its buffers are full and a send cannot go out
            try:
                assert hub.send_sync("s9", {"type": "sd:status", "blob": blob}, wait=0.5)
            except TimeoutError as exc:
                raised = exc
                break
        assert isinstance(raised, TimeoutError), "every send went out: the client never stalled"
    finally:
        sock.close()


def test_a_session_belongs_to_the_detector_that_opened_it(hub_server: tuple[Server, Any]) -> None:
    server, hub = hub_server
    with connect(server) as owner:
        assert hello(owner, "reader-a")["type"] == "detector:welcome"
        owner.send(
            json.dumps(
                {
                    "type": "detector:sd_inserted",
                    "session_id": "s1",
                    "card_id": "CARD-A",
                    "label": "CARD",
                }
            )
        )
        with connect(server) as thief:
            assert hello(thief, "reader-b")["type"] == "detector:welcome"
            # Every way of naming s1 from another detector is refused and changes nothing.
            for message in (
                {"type": "detector:sd_inserted", "session_id": "s1", "card_id": "CARD-A"},
                {"type": "sd:file_list", "session_id": "s1", "card_id": "CARD-A", "files": []},
                {"type": "sd:copy_progress", "session_id": "s1", "request_id": "r", "bytes": 1},
                {"type": "detector:sd_removed", "session_id": "s1", "card_id": "CARD-A"},
            ):
                thief.send(json.dumps(message))
                answer = recv(thief)
                assert answer["type"] == "error", (message, answer)
                assert (
                    "session 's1'" in answer["detail"] and "another detector" in answer["detail"]
                ), answer
                assert "reader-a" not in answer["detail"]  # who owns it is not told
            assert hub.owner("s1") == "reader-a"
            assert executions(server) == []
            listed = {d["detector_id"]: d["sessions"] for d in detectors(server)}
            assert [s["session_id"] for s in listed["reader-a"]] == ["s1"]
            assert listed["reader-b"] == []

            # A copy for s1 reaches its owner only; an answer from the thief does not count,
            # even with the right request id.
            asked = _ask(hub, "s1")
            request = recv(owner)
            assert request["type"] == "sd:copy_request" and request["session_id"] == "s1"
            thief.send(
                json.dumps(
                    {
                        "type": "sd:file_copied",
                        "request_id": request["request_id"],
                        "ok": True,
                        "dest": "C/DCIM/a.mp4",
                    }
                )
            )
            answer = recv(thief)
            assert answer["type"] == "error" and "another detector" in answer["detail"]
            owner.send(
                json.dumps(
                    {
                        "type": "sd:file_copied",
                        "request_id": request["request_id"],
                        "session_id": "s1",
                        "ok": False,
                        "code": "vanished",
                    }
                )
            )
            assert asked.result(10)["code"] == "vanished"

            # A third detector listing s1 in its hello is welcomed, but does not get s1.
            with connect(server) as other:
                assert hello(other, "reader-c", sessions=[{"session_id": "s1"}])["type"] == (
                    "detector:welcome"
                )
                answer = recv(other)
                assert answer["type"] == "error" and "session 's1'" in answer["detail"]
            assert hub.owner("s1") == "reader-a"

            # The owner crashes: its session stays its own while it is away ...
            owner.close()
            deadline = time.monotonic() + 5
            while hub.is_connected("reader-a") and time.monotonic() < deadline:
                time.sleep(0.02)
            thief.send(
                json.dumps(
                    {"type": "detector:sd_inserted", "session_id": "s1", "card_id": "CARD-A"}
                )
            )
            assert recv(thief)["type"] == "error"
            assert hub.owner("s1") == "reader-a"

    # ... and it keeps it when it comes back, whether its hello lists the session (a
    # reconnect) or not (a restarted process that lost its memory: the backend's retried
    # copies must still reach it).
    with connect(server) as back:
        assert (
            hello(back, "reader-a", sessions=[{"session_id": "s1", "card_id": "CARD-A"}])["type"]
            == "detector:welcome"
        )
        asked = _ask(hub, "s1")
        request = recv(back)
        back.send(
            json.dumps(
                {
                    "type": "sd:file_copied",
                    "request_id": request["request_id"],
                    "session_id": "s1",
                    "ok": True,
                }
            )
        )
        assert asked.result(10)["ok"] is True
    with connect(server) as restarted:
        assert hello(restarted, "reader-a")["type"] == "detector:welcome"
        asked = _ask(hub, "s1")
        request = recv(restarted)
        assert request["session_id"] == "s1"
        restarted.send(
            json.dumps({"type": "sd:file_copied", "request_id": request["request_id"], "ok": True})
        )
        assert asked.result(10)["ok"] is True


def test_the_detector_process_sends_its_token_as_a_header_not_in_the_url(tmp_path: Path) -> None:
    """``examples/sd_import/detector.py`` connects with ``Authorization: Bearer``: the token
    never appears in the URL (which access logs and proxies record)."""
    seen: list[tuple[str, str | None]] = []
    got = threading.Event()

    def handler(connection: ServerConnection) -> None:
        assert connection.request is not None
        seen.append((connection.request.path, connection.request.headers.get("Authorization")))
        got.set()
        with_hello = json.loads(connection.recv(10))
        assert with_hello["type"] == "detector:hello"

    port = free_port()
    with serve(handler, "127.0.0.1", port) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        (tmp_path / "media").mkdir()
        (tmp_path / "shared").mkdir()  # the detector refuses a missing --shared
        proc = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLE / "detector.py"),
                "--watch",
                str(tmp_path / "media"),
                "--backend",
                f"ws://127.0.0.1:{port}/ws/detector",
                "--shared",
                str(tmp_path / "shared"),
                "--token",
                TOKEN,
                "--detector-id",
                "hdr",
                "--max-backoff",
                "0.3",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        try:
            assert got.wait(30), "the detector did not connect"
        finally:
            proc.terminate()
            proc.wait(10)
            server.shutdown()
    path, authorization = seen[0]
    assert path == "/ws/detector" and TOKEN not in path
    assert authorization == f"Bearer {TOKEN}"


def test_a_card_with_names_that_are_not_utf8_is_still_announced(
    hub_server: tuple[Server, Any], tmp_path: Path
) -> None:
    """A card formatted elsewhere can hold names in a legacy encoding, which Python keeps as
    lone surrogates and the hub refuses. The detector skips such files and shows such a card
    name with U+FFFD, so its hello and the rest of the card still get through."""
    import detector as sd_detector  # examples/sd_import/detector.py

    server, _ = hub_server
    root = Path(os.fsdecode(bytes(tmp_path) + b"/CARD\xe9"))
    (root / "DCIM").mkdir(parents=True)
    (root / "DCIM" / "good.mp4").write_bytes(b"g" * 100)
    Path(os.fsdecode(bytes(root / "DCIM") + b"/bad\xff.mp4")).write_bytes(b"b" * 100)
    Path(os.fsdecode(bytes(root) + b"/F\xfeLDER")).mkdir()
    Path(os.fsdecode(bytes(root) + b"/F\xfeLDER/x.mp4")).write_bytes(b"x" * 100)
    files = sd_detector.list_card(root)
    assert [f["path"] for f in files] == ["DCIM/good.mp4"]
    label = sd_detector.card_label(root)
    assert label == "CARD\ufffd"
    card = sd_detector.Card(root, label, sd_detector.card_id_of(label, files), files)
    with connect(server) as ws:
        assert hello(
            ws,
            "legacy",
            sessions=[
                {"session_id": card.session_id, "card_id": card.card_id, "label": card.label}
            ],
        )["type"] == ("detector:welcome")
        ws.send(json.dumps(card.inserted()))
        ws.send(json.dumps(card.file_list()))
        answer = recv(ws)
        assert answer["type"] == "sd:status" and answer["state"] == "importing", answer


# -- the real detector process on hostile cards ------------------------------------------------


@pytest.fixture
def card_world(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The service with the SD import's hub (``small_limit=0``: an import copies nothing
    before a QR clip, and there is none, so nothing is ever copied) and the real detector
    process watching ``media``."""
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 's.db'}",
        retry_initial_delay=0.2,
        retry_max_delay=1.0,
        shutdown_grace=2.0,
    )
    watch, shared = tmp_path / "media", tmp_path / "shared"
    watch.mkdir()
    shared.mkdir()  # the detector refuses a missing --shared
    pipeline = load_pipeline(sd_backend.PIPELINE_REF)
    hub = sd_backend.make_hub(pipeline, shared_dir=shared, small_limit=0, reconnect_wait=1)
    with Server(settings, pipelines=(pipeline,), detector_hub=hub) as server:
        detector = Detector(server.url, watch, shared, tmp_path / "det.log")
        try:
            yield {"server": server, "watch": watch, "detector": detector, "tmp": tmp_path}
        finally:
            detector.stop()


def listed(world: dict[str, Any], label: str) -> list[str]:
    """The paths of the card ``label``'s import once it started (the file list the backend
    accepted), waiting for it; fails with the detector's log if it never starts."""
    with httpx.Client(base_url=world["server"].url, headers=AUTH) as client:
        (found,) = wait_for(
            f"the import of {label}",
            lambda: imports_of(client, label),
            60,
            world["detector"],
        )
    return [f["path"] for f in found["inputs"]["files"]]


def test_a_card_with_a_very_deep_tree_neither_stops_the_detector_nor_its_import(
    card_world: dict[str, Any],
) -> None:
    """A card (or a hostile ``--card`` folder) with 1100 nested folders made the detector's
    recursive walk raise RecursionError, which ended the process, and again at each restart
    while the card was in. Now folders below the depth cap are skipped with a warning, the
    card's own files import, and the detector keeps serving."""
    card = card_world["tmp"] / "DEEP"
    (card / "DCIM" / "100GOPRO").mkdir(parents=True)
    (card / "DCIM" / "100GOPRO" / "GX01.MP4").write_bytes(b"a" * 1000)
    chain = [card]
    for _ in range(1100):  # one level at a time: no recursion in the test either
        chain.append(chain[-1] / "d")
        chain[-1].mkdir()
    (chain[-1] / "deep.mp4").write_bytes(b"d" * 1000)
    try:
        shutil.move(str(card), str(card_world["watch"] / "DEEP"))
        detector = card_world["detector"].start()
        assert listed(card_world, "DEEP") == ["DCIM/100GOPRO/GX01.MP4"]
        assert detector.proc is not None and detector.proc.poll() is None, "the detector ended"
        log = detector.log.read_text()
        assert "skipped folder " + "/".join(["d"] * 33) + ": it is more than 32 folders" in log
        assert "RecursionError" not in log
        # Still watching: the next card is announced too.
        (card_world["watch"] / "NEXT" / "DCIM").mkdir(parents=True)
        (card_world["watch"] / "NEXT" / "DCIM" / "GX02.MP4").write_bytes(b"b" * 1000)
        assert listed(card_world, "NEXT") == ["DCIM/GX02.MP4"]
    finally:
        card_world["detector"].stop()
        mounted = card_world["watch"] / "DEEP"
        (mounted.joinpath(*["d"] * 1100) / "deep.mp4").unlink()
        for depth in range(1100, 0, -1):  # shutil.rmtree recurses: it cannot remove it
            mounted.joinpath(*["d"] * depth).rmdir()


def test_names_the_backend_refuses_are_skipped_by_the_detector_and_the_rest_imports(
    card_world: dict[str, Any],
) -> None:
    """A name with ':' or a backslash (legal on a Linux-formatted card), or a path over 1000
    characters, made the backend refuse the card's whole ``sd:file_list``: nothing of the card
    imported. The detector now leaves out, naming each, exactly what the backend's rule
    (``card_paths.card_path``) refuses; the backend accepts the rest."""
    card = card_world["tmp"] / "NAMES"
    dcim = card / "DCIM" / "100GOPRO"
    dcim.mkdir(parents=True)
    (dcim / "GX01.MP4").write_bytes(b"a" * 1000)
    (dcim / "jump 10:30.mp4").write_bytes(b"b" * 1000)
    (dcim / "a\\b.mp4").write_bytes(b"c" * 1000)
    (card / "DCIM" / "cam:2").mkdir()  # a folder no path below which is accepted
    (card / "DCIM" / "cam:2" / "GX03.MP4").write_bytes(b"d" * 1000)
    long = card.joinpath(*(c * 200 for c in "wxyz"))  # 803 characters: itself fine ...
    long.mkdir(parents=True)
    (long / ("v" * 200 + ".mp4")).write_bytes(b"e" * 1000)  # ... 1008 with this file
    (long / "ok.mp4").write_bytes(b"f" * 1000)  # 810: fine
    ok_long = "/".join(c * 200 for c in "wxyz") + "/ok.mp4"
    shutil.move(str(card), str(card_world["watch"] / "NAMES"))
    detector = card_world["detector"].start()
    assert listed(card_world, "NAMES") == ["DCIM/100GOPRO/GX01.MP4", ok_long]
    log = detector.log.read_text()
    for skipped, reason in (
        ("DCIM/100GOPRO/jump 10:30.mp4", "holds a ':'"),
        ("DCIM/100GOPRO/a\\b.mp4", "holds a backslash"),
        ("/".join(c * 200 for c in "wxyz") + "/" + "v" * 200 + ".mp4", "at most 1000"),
    ):
        line = next((x for x in log.splitlines() if f"skipped {skipped}: " in x), None)
        assert line is not None and reason in line, (skipped, log[-3000:])
    assert "skipped folder DCIM/cam:2: the backend accepts no path in it" in log
    assert "backend: " not in log  # no error from the backend about the list


def test_a_link_in_the_watch_folder_is_not_a_card(card_world: dict[str, Any]) -> None:
    """Whoever can write into the ``--watch`` folder could plant a link to any folder of the
    host (``media/HOME -> /home/me``) and the detector listed it as a card, to be copied into
    the share on the backend's request. A card must be a folder there, not a link to one."""
    watch, tmp = card_world["watch"], card_world["tmp"]
    elsewhere = tmp / "elsewhere"
    (elsewhere / "DCIM").mkdir(parents=True)
    (elsewhere / "DCIM" / "private.mp4").write_bytes(b"p" * 1000)
    (watch / "LINKED").symlink_to(elsewhere, target_is_directory=True)
    (watch / "REAL" / "DCIM").mkdir(parents=True)
    (watch / "REAL" / "DCIM" / "GX01.MP4").write_bytes(b"a" * 1000)
    detector = card_world["detector"].start()
    assert listed(card_world, "REAL") == ["DCIM/GX01.MP4"]
    # A card inserted after that is seen at a later poll than LINKED would have been.
    (watch / "LATER" / "DCIM").mkdir(parents=True)
    (watch / "LATER" / "DCIM" / "GX02.MP4").write_bytes(b"b" * 1000)
    assert listed(card_world, "LATER") == ["DCIM/GX02.MP4"]
    with httpx.Client(base_url=card_world["server"].url, headers=AUTH) as client:
        assert imports_of(client, "LINKED") == []
        labels = {s.get("label") for d in detectors(card_world["server"]) for s in d["sessions"]}
    assert labels == {"REAL", "LATER"}
    log = detector.log.read_text()
    assert f"{watch / 'LINKED'} is a link, not a card" in log
    assert log.count("is a link, not a card") == 1  # said once, not at every poll


def test_one_card_that_cannot_be_listed_does_not_stop_the_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Whatever goes wrong listing one card (here an error injected into the real
    ``list_card`` for the card BAD) is logged once and that card tried again at the next
    poll: the watch loop goes on, the other cards are announced, and BAD is once it lists."""
    import detector as sd_detector  # examples/sd_import/detector.py

    watch = tmp_path / "media"
    for label in ("BAD", "GOOD"):
        (watch / label / "DCIM").mkdir(parents=True)
        (watch / label / "DCIM" / "GX01.MP4").write_bytes(label.encode() * 100)
    real = sd_detector.list_card
    broken = [True]
    failed = [0]  # listings of BAD that failed

    def list_card(root: Path, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        if root.name == "BAD" and broken[0]:
            failed[0] += 1
            raise RuntimeError("the card reader hiccuped")
        return real(root, *args, **kwargs)

    monkeypatch.setattr(sd_detector, "list_card", list_card)
    detector = sd_detector.Detector(
        backend="ws://unused",
        shared=tmp_path / "shared",
        token=None,
        watch=[watch],
        cards=[],
        detector_id="t",
        interval=0.01,
        settle=0,
    )

    async def run() -> None:
        task = asyncio.create_task(detector.watch_cards())
        try:
            await wait_until_async(  # polls go on while BAD keeps failing
                "GOOD announced and BAD tried three times",
                lambda: (watch / "GOOD" in detector.cards and failed[0] >= 3) or task.done(),
            )
            assert not task.done(), task.exception()
            assert watch / "BAD" not in detector.cards
            broken[0] = False
            await wait_until_async("BAD announced", lambda: watch / "BAD" in detector.cards)
        finally:
            task.cancel()

    with caplog.at_level(logging.WARNING, logger="sd_detector"):
        asyncio.run(run())
    assert caplog.text.count("could not be listed: RuntimeError('the card reader hiccuped')") == 1


# -- the hub without the SD import: only what an application registers --------------------------


class Tray(BaseModel):
    """Session metadata of a made-up application (a printer's trays)."""

    model_config = ConfigDict(strict=True)
    name: str | None = None
    notes: str | None = None


class Level(BaseModel):
    session_id: str
    percent: int = Field(ge=0, le=100)


def test_the_hub_speaks_only_the_vocabulary_an_application_registers(tmp_path: Path) -> None:
    """The hub is generic: the SD import's messages are unknown to a hub that did not register
    them; registered types are validated by their model before their handler sees them;
    session metadata is what the application's model names, bounded in size; an ``end``
    ends the session and still refuses other detectors."""
    hub = DetectorHub(
        "generic-test", session_metadata=Tray, max_metadata_bytes=200, reconnect_wait=1
    )
    seen: list[int] = []

    async def on_level(msg: DetectorMessage) -> None:
        seen.append(msg.parsed_as(Level).percent)
        await msg.reply({"type": "level:ok", "session_id": msg.message["session_id"]})

    hub.register_message("level", Level, on_level)
    hub.register_message("done", role="end")
    for bad, match in (
        (lambda: hub.register_message("detector:hello"), "the hub's own"),
        (lambda: hub.register_message("level"), "registered already"),
        (
            lambda: hub.register_message("answer", handler=on_level, role="answer"),
            "takes no handler",
        ),
        (
            lambda: hub.register_message("odd", role="sometimes"),  # type: ignore[arg-type]
            "role must be one of",
        ),
    ):
        with pytest.raises(ValueError, match=match):
            bad()
    assert hub.message_types() == {"done": "end", "level": "notice"}
    settings = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 's.db'}")
    with Server(settings, detector_hub=hub) as server, connect(server) as ws:
        assert (
            hello(ws, "printer", sessions=[{"session_id": "t1", "name": "A4", "other": 1}])["type"]
            == "detector:welcome"
        )
        ws.send(
            json.dumps({"type": "sd:file_list", "session_id": "t2", "card_id": "C", "files": []})
        )
        assert recv(ws)["detail"] == (
            "unknown message type 'sd:file_list' (this service handles: done, level)"
        )
        for message, where in (
            ({"type": "level", "session_id": "t1", "percent": 150}, "message.percent"),
            ({"type": "level", "session_id": "t1"}, "message.percent"),
            ({"type": "level", "session_id": "t1", "percent": 5, "name": 7}, "message.name"),
            ({"type": "level", "session_id": "t1", "percent": 5, "notes": "x" * 300}, "message"),
        ):
            ws.send(json.dumps(message))
            answer = recv(ws)
            assert answer["type"] == "error" and answer["field"] == where, answer
        assert seen == []
        ws.send(json.dumps({"type": "level", "session_id": "t1", "percent": 40, "notes": "low"}))
        assert recv(ws) == {"type": "level:ok", "session_id": "t1"}
        assert seen == [40]
        listed = detectors(server)
        assert listed[0]["sessions"] == [{"session_id": "t1", "name": "A4", "notes": "low"}]
        assert hub._book.open.keys() == {"t1"}  # t2 (unknown type) was not recorded
        with connect(server) as other:
            assert hello(other, "other")["type"] == "detector:welcome"
            other.send(json.dumps({"type": "done", "session_id": "t1"}))
            assert "another detector" in recv(other)["detail"]
        ws.send(json.dumps({"type": "done", "session_id": "t1"}))
        ws.send(json.dumps({"type": "level", "session_id": "t9", "percent": 1}))
        assert recv(ws)["type"] == "level:ok"  # in order: done was handled before it
        sessions = {s["session_id"] for s in detectors(server)[0]["sessions"]}
        assert sessions == {"t9"} and hub.owner("t1") == "printer"
