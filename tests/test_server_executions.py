"""Cancelling executions and reading their events over the HTTP service, by id or prefix:
what a cancel answers says what it did, and ``/api/events`` takes an execution as every other
route does."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import sqlalchemy as sa

from framepipe.backends.state import StateStore
from framepipe.backends.state.schema import executions as executions_table
from framepipe.config import Settings
from test_server import AUTH, Server, demo, held, wait_status
from waiting import wait_until

CANCEL = "/api/executions/{execution_id}/cancel"


def _running_step(client: httpx.Client, execution_id: str) -> bool:
    body = client.get(f"/api/executions/{execution_id}").json()
    return any(step["status"] == "running" for step in body["steps"])


def test_a_cancel_says_whether_the_execution_is_cancelled_or_cancelling(
    settings: Settings, tmp_path: Path
) -> None:
    """An execution whose step runs in the service's engine is ``cancelling`` (its step was
    asked to stop; it ends ``cancelled``); one no engine runs (interrupted when the service
    stopped) is ``cancelled`` at once. The answer always said ``cancelling`` (found in
    review)."""
    release = tmp_path / "release"
    with (
        Server(settings, pipelines=(demo, held)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        running = client.post(
            "/api/executions", json={"pipeline": "svc_held", "inputs": {"release": str(release)}}
        ).json()["id"]
        wait_until("the held step to run", lambda: _running_step(client, running), 30)
        answer = client.post(CANCEL.format(execution_id=running[:8]))
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"id": running, "status": "cancelling"}
        release.touch()
        assert wait_status(client, running)["status"] == "cancelled"

        left = client.post(
            "/api/executions",
            json={"pipeline": "svc_held", "inputs": {"release": str(tmp_path / "never")}},
        ).json()["id"]
        wait_until("the held step to run", lambda: _running_step(client, left), 30)
    (tmp_path / "never").touch()  # the step thread the stopped service left behind ends

    with (
        Server(settings, pipelines=(demo, held)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        assert client.get(f"/api/executions/{left}").json()["status"] == "interrupted"
        answer = client.post(CANCEL.format(execution_id=left.upper()))
        assert answer.status_code == 202, answer.text
        assert answer.json() == {"id": left, "status": "cancelled"}
        shown = client.get(f"/api/executions/{left}").json()
        assert shown["status"] == "cancelled"
        assert {s["key"]: s["status"] for s in shown["steps"]} == {"hold": "cancelled"}
        again = client.post(CANCEL.format(execution_id=left))
        assert again.status_code == 409
        schema = client.get("/openapi.json").json()  # the answers are documented
        answer_schema = schema["components"]["schemas"]["CancelAnswer"]
        assert answer_schema["properties"]["status"]["enum"] == ["cancelled", "cancelling"]


def _store_execution(settings: Settings, execution_id: str) -> None:
    store = StateStore(settings.resolved_database_url)
    now = time.time()
    try:
        with store.write() as conn:
            conn.execute(
                sa.insert(executions_table).values(
                    id=execution_id,
                    pipeline="svc_demo",
                    pipeline_ref=None,
                    status="failed",
                    inputs={},
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
    finally:
        store.close()


def test_events_of_an_execution_named_by_a_prefix(settings: Settings) -> None:
    """``/api/events?execution_id=`` takes a unique prefix (any case) as every route does, and
    answers an unknown or ambiguous one as they do (404); a prefix gave an empty page (found
    in review)."""
    with (
        Server(settings) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        execution_id = client.post("/api/executions", json={"pipeline": "svc_demo"}).json()["id"]
        assert wait_status(client, execution_id)["status"] == "completed"
        whole = client.get("/api/events", params={"execution_id": execution_id}).json()
        assert "execution.completed" in [e["type"] for e in whole["events"]]
        for prefix in (execution_id[:8], execution_id[:4].upper()):
            page = client.get("/api/events", params={"execution_id": prefix})
            assert page.status_code == 200, page.text
            assert page.json() == whole
        first = client.get("/api/events", params={"execution_id": execution_id[:6], "limit": 2})
        assert first.json()["events"] == whole["events"][:2]

        _store_execution(settings, "abcd" + "0" * 28)
        _store_execution(settings, "abcd" + "1" * 28)
        for name, words in (
            ("abcd", "is ambiguous"),
            ("feedbeef", "no execution 'feedbeef'"),
            (execution_id[:3], "give at least 4 characters"),
        ):
            shown = client.get(f"/api/executions/{name}")
            events = client.get("/api/events", params={"execution_id": name})
            assert (events.status_code, shown.status_code) == (404, 404), name
            assert words in events.json()["detail"]
            assert events.json() == shown.json()
