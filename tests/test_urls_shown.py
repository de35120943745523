"""A webhook URL's secret, in the path or the query, is masked wherever the service shows or
logs it: a step posting to a webhook that fails with the URL in its error, over the real
service (uvicorn on a loopback port) and a real webhook receiver (a loopback HTTP server)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from framepipe import Pipeline, StepContext
from framepipe.config import Settings
from test_server import TOKEN, Server, wait_status

AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "hR7uT0n4Xq9LmZk2Wp3VyB8c"
"""The webhook's secret path segment: mixed-case letters and digits, as webhook keys are."""
QUERY_SECRET = "q9Zx81LkPw"

notify = Pipeline("notify_webhook")


@notify.step()
def post(ctx: StepContext) -> dict[str, Any]:
    """Posts to the webhook it is given; a refusal raises httpx's error, naming the URL."""
    httpx.post(ctx.inputs["webhook"], json={"done": True}, timeout=10).raise_for_status()
    return {}


class _Gone(BaseHTTPRequestHandler):
    """A webhook receiver whose hook was deleted: every POST is a 404."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(404)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Gone)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


def test_a_webhook_secret_is_masked_in_the_record_the_events_and_the_log(
    tmp_path: Path, receiver: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'state.db'}",
        retry_initial_delay=0.01,
        retry_max_delay=0.05,
    )
    webhook = f"{receiver}/services/T0A1B2C3D/B0E4F5G6H/{SECRET}?channel=ops&token={QUERY_SECRET}"
    caplog.set_level(logging.INFO)
    with (
        Server(settings, pipelines=(notify,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        answer = client.post(
            "/api/executions",
            json={"pipeline": "notify_webhook", "inputs": {"webhook": webhook}},
        )
        assert answer.status_code == 201, answer.text
        execution_id = answer.json()["id"]
        record = wait_status(client, execution_id)
        assert record["status"] == "failed"
        shown = [
            client.get(f"/api/executions/{execution_id}").text,
            client.get(f"/api/status/{execution_id}").text,
            client.get("/api/events", params={"execution_id": execution_id}).text,
            "\n".join(  # the service's log (httpx logs each request of the step itself)
                r.getMessage() for r in caplog.records if r.name.startswith("framepipe")
            ),
        ]
    where = f"{receiver}/services/T0A1B2C3D/B0E4F5G6H/***"
    assert where in shown[0]  # the error still says where it posted
    assert where in shown[2] and where in shown[3]  # the events and the log name it too
    for text in shown:
        assert SECRET not in text and QUERY_SECRET not in text
