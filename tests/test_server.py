"""The HTTP service over real HTTP: uvicorn on a loopback port, httpx and a WebSocket client."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
import sqlalchemy as sa
import uvicorn
import websockets
from typer.testing import CliRunner

from framepipe import Pipeline, StepContext
from framepipe.app import App
from framepipe.backends.objects import open_object_store
from framepipe.backends.state import StateStore, objects_left
from framepipe.backends.state.event_log import append_events, insert_events
from framepipe.backends.state.retention import prune_events
from framepipe.cli import app as cli_app
from framepipe.config import Settings, load_settings
from framepipe.errors import ConfigError
from framepipe.events import Event
from framepipe.jobs.pruning import FINISHED
from framepipe.server import EventFeed, create_app
from framepipe.sources import PatternSource
from framepipe.stream import Stage, StreamPipeline
from waiting import free_port, wait_until, wait_until_async

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

demo = Pipeline("svc_demo")


@demo.step()
def count(ctx: StepContext) -> dict[str, Any]:
    steps = int(ctx.inputs.get("steps", 5))
    for i in range(steps):
        time.sleep(float(ctx.inputs.get("pause", 0.05)))
        ctx.progress(100 * (i + 1) / steps, f"{i + 1} of {steps}")
    return {"counted": steps}


@demo.step(depends_on=["count"])
def gate(ctx: StepContext) -> dict[str, Any]:
    gate_file = ctx.inputs.get("gate")
    if gate_file and not Path(gate_file).exists():
        raise FileNotFoundError(f"gate file {gate_file} is missing")
    return {"passed": True}


held = Pipeline("svc_held")


@held.step()
def hold(ctx: StepContext) -> dict[str, Any]:
    """Waits for the file ``release`` (the test's go-ahead), then reports progress."""
    wait_until("the release file", Path(ctx.inputs["release"]).exists, 60, interval=0.02)
    ctx.progress(50.0, "released")
    return {"held": True}


class Server:
    """uvicorn serving the app in a thread of this process, on a free loopback port."""

    def __init__(
        self,
        settings: Settings,
        *,
        pipelines: tuple[Pipeline, ...] = (demo,),
        port: int | None = None,
        token: str = TOKEN,
        **kwargs: Any,
    ) -> None:
        self.port = port or free_port()
        app = create_app(settings, pipelines=pipelines, token=token, **kwargs)
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=self.port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=2,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        wait_until(
            "uvicorn to start or its thread to end",
            lambda: self.server.started or not self.thread.is_alive(),
            30,
            interval=0.02,
        )
        if not self.server.started:
            raise RuntimeError("the server did not start: its thread ended")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    with Server(settings.model_copy(update={"max_upload_bytes": 1000})) as running:
        yield running


def wait_status(client: httpx.Client, execution_id: str, timeout: float = 30) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/api/executions/{execution_id}").json()
        return body if body["status"] not in ("pending", "running") else None

    return wait_until(f"execution {execution_id} to finish", finished, timeout)


def test_health_is_open_and_everything_else_needs_the_token(server: Server) -> None:
    with httpx.Client(base_url=server.url) as client:
        health = client.get("/health")
        assert health.status_code == 200
        assert health.json()["database"] == "ok"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            denied = client.get("/api/pipelines", headers=headers)
            assert denied.status_code == 401
            assert "bearer token" in denied.json()["detail"]
        ok = client.get("/api/pipelines", headers=AUTH)
        assert ok.status_code == 200
        assert [p["name"] for p in ok.json()] == ["svc_demo"]
        assert ok.json()[0]["steps"][1] == {
            "name": "gate",
            "depends_on": ["count"],
            "params": [],
            "retries": 0,
            "weight": 1.0,
        }
        assert client.get("/openapi.json").status_code == 200


def test_submit_show_retry_and_events(server: Server, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        created = client.post(
            "/api/executions",
            json={"pipeline": "svc_demo", "inputs": {"steps": 3, "gate": str(gate)}},
        )
        assert created.status_code == 201, created.text
        execution_id = created.json()["id"]
        failed = wait_status(client, execution_id)
        assert failed["status"] == "failed"
        assert "gate file" in failed["error"]
        steps = {s["key"]: s for s in failed["steps"]}
        assert steps["count"]["status"] == "completed"
        assert failed["data"] == {"counted": 3}

        while_failed = client.get("/metrics").text
        assert 'framepipe_step_failures{pipeline="svc_demo",step="gate"} 1.0' in while_failed
        assert 'framepipe_executions{pipeline="svc_demo",status="failed"} 1.0' in while_failed

        gate.touch()
        retried = client.post(f"/api/executions/{execution_id[:8]}/retry")
        assert retried.status_code == 202, retried.text
        done = wait_status(client, execution_id)
        assert done["status"] == "completed"
        assert done["data"] == {"counted": 3, "passed": True}
        assert {s["key"]: s["attempt"] for s in done["steps"]} == {"count": 1, "gate": 2}

        again = client.post(f"/api/executions/{execution_id}/retry")
        assert again.status_code == 409
        assert "has completed; nothing to retry" in again.json()["detail"]

        assert httpx.get(f"{server.url}/metrics").status_code == 401
        metrics = client.get("/metrics")
        assert metrics.status_code == 200
        text = metrics.text
        assert 'framepipe_executions{pipeline="svc_demo",status="completed"} 1.0' in text
        assert 'framepipe_step_duration_seconds_count{pipeline="svc_demo",step="count"} 1.0' in text
        assert 'framepipe_steps{pipeline="svc_demo",status="completed",step="gate"} 1.0' in text

        listed = client.get("/api/executions").json()
        assert [(e["id"], e["steps_done"], e["steps_total"]) for e in listed] == [
            (execution_id, 2, 2)
        ]
        page = client.get("/api/events", params={"execution_id": execution_id, "limit": 5})
        first = page.json()
        assert len(first["events"]) == 5
        rest = client.get(
            "/api/events", params={"execution_id": execution_id, "after": first["next"]}
        ).json()
        types = [e["type"] for e in first["events"] + rest["events"]]
        assert types[0] == "execution.created"
        assert types.count("execution.completed") == 1
        assert "step.progress" in types


def test_bad_requests_say_what_is_wrong_and_create_nothing(server: Server) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        bad_json = client.post(
            "/api/executions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad_json.status_code == 422
        assert "JSON" in json.dumps(bad_json.json())
        unknown = client.post("/api/executions", json={"pipeline": "nope"})
        assert unknown.status_code == 404
        assert unknown.json()["detail"] == "unknown pipeline 'nope' (known: svc_demo)"
        wrong_type = client.post("/api/executions", json={"pipeline": "svc_demo", "inputs": [1, 2]})
        assert wrong_type.status_code == 422
        assert wrong_type.json()["detail"][0]["loc"] == ["body", "inputs"]
        extra = client.post("/api/executions", json={"pipeline": "svc_demo", "x": 1})
        assert extra.status_code == 422
        missing = client.get("/api/executions/feedbeef")
        assert missing.status_code == 404
        assert "no execution 'feedbeef'" in missing.json()["detail"]
        bad_limit = client.get("/api/executions", params={"limit": "lots"})
        assert bad_limit.status_code == 422
        assert client.get("/api/executions").json() == []  # nothing half-created


def test_events_after_an_id_beyond_the_column_are_an_empty_page(server: Server) -> None:
    """``after`` may be up to 2**62; past the largest id the column holds there is nothing
    after it, not a 503 "integer out of range" (found in review)."""
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        created = client.post("/api/executions", json={"pipeline": "svc_demo"})
        execution_id = created.json()["id"]
        wait_status(client, execution_id)
        newest = client.get("/api/events", params={"limit": 1000}).json()["next"]
        assert newest > 0
        for after in (2**31 - 1, 2**31, 2**62):
            for params in ({"after": after}, {"after": after, "execution_id": execution_id}):
                page = client.get("/api/events", params=params)
                assert page.status_code == 200, (params, page.text)
                assert page.json() == {"events": [], "next": after}


def test_objects_upload_download_limits_and_keys(server: Server, settings: Settings) -> None:
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        put = client.put("/api/objects/frames/cam1/0001.jpg", content=b"\xff\xd8jpeg")
        assert put.status_code == 201
        with open_object_store(settings.resolved_objects_url) as objects:
            stored = objects.stat("frames/cam1/0001.jpg").version
        # the version a submit can pin the upload with (ml_video's input_version)
        assert stored and put.json() == {
            "key": "frames/cam1/0001.jpg",
            "size": 6,
            "version": stored,
        }
        assert client.get("/api/objects/frames/cam1/0001.jpg").content == b"\xff\xd8jpeg"
        big = client.put("/api/objects/frames/big.bin", content=b"x" * 5000)
        assert big.status_code == 413
        assert "over the limit of 1000" in big.json()["detail"]
        assert client.get("/api/objects/frames/big.bin").status_code == 404
        escape = client.put("/api/objects/frames/%2E%2E/%2E%2E/etc/passwd", content=b"x")
        assert escape.status_code == 400
        assert ".." in escape.json()["detail"]


@pytest.mark.slow
def test_websocket_sends_the_state_then_live_progress(server: Server) -> None:
    async def scenario() -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as client:
            created = await client.post(
                "/api/executions",
                json={"pipeline": "svc_demo", "inputs": {"steps": 8, "pause": 0.15}},
            )
            execution_id = created.json()["id"]
        ws_url = f"ws://127.0.0.1:{server.port}/ws?execution_id={execution_id}&token={TOKEN}"
        seen: list[dict[str, Any]] = []
        summaries: list[dict[str, Any]] = []
        async with websockets.connect(ws_url) as ws:
            snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if message["type"] == "pipeline:progress":  # the original import service's summary
                    summaries.append(message)
                    if message["step_key"] is None:
                        break
                    continue
                assert message["type"] == "event"
                seen.append(message["event"])
        return snapshot, seen, summaries

    snapshot, seen, summaries = asyncio.run(scenario())
    overall = [m["progress"] for m in summaries]
    assert overall == sorted(overall) and overall[-1] == 100.0
    assert {m["step_key"] for m in summaries} == {"count", "gate", None}
    assert any(0 < m["step_progress"] < 100 for m in summaries if m["step_key"] == "count")
    assert snapshot["type"] == "snapshot"
    assert snapshot["execution"]["pipeline"] == "svc_demo"
    assert snapshot["execution"]["status"] == "running"
    progress = [
        e["data"]["progress"]
        for e in seen
        if e["type"] == "step.progress" and e["step_key"] == "count"
    ]
    assert len(progress) >= 3  # progress arrived as it happened, not all at the end
    assert progress == sorted(progress)
    assert [e["type"] for e in seen][-1] == "execution.completed"
    assert all(e["execution_id"] == snapshot["execution"]["id"] for e in seen)


def test_websocket_of_an_id_prefix_gets_the_live_events(settings: Settings, tmp_path: Path) -> None:
    """``/ws?execution_id=`` with a prefix of the id (also in upper case) gets the snapshot
    and then the execution's events, as with the full id: the feed matches full ids, so the
    prefix is resolved before subscribing (it got the snapshot and never an event; found in
    review)."""
    release = tmp_path / "release"

    async def listen(port: int, ident: str, ready: asyncio.Event) -> tuple[str, list[str]]:
        url = f"ws://127.0.0.1:{port}/ws?execution_id={ident}&token={TOKEN}"
        async with websockets.connect(url) as ws:
            snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert snapshot["type"] == "snapshot", snapshot
            ready.set()
            seen: list[str] = []
            while not seen or seen[-1] != "execution.completed":
                message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if message["type"] == "event":
                    assert message["event"]["execution_id"] == snapshot["execution"]["id"]
                    seen.append(message["event"]["type"])
            return snapshot["execution"]["id"], seen

    async def scenario(port: int) -> tuple[str, list[tuple[str, list[str]]]]:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as c:
            created = await c.post(
                "/api/executions",
                json={"pipeline": "svc_held", "inputs": {"release": str(release)}},
            )
            execution_id = created.json()["id"]
        idents = [execution_id, execution_id[:8], execution_id[:6].upper()]
        ready = [asyncio.Event() for _ in idents]
        listeners = [
            asyncio.create_task(listen(port, i, r)) for i, r in zip(idents, ready, strict=True)
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 20)
        release.touch()
        return execution_id, list(await asyncio.gather(*listeners))

    with Server(settings, pipelines=(demo, held)) as server:
        execution_id, heard = asyncio.run(scenario(server.port))
    for ident, seen in heard:  # what came after the release (each subscribed before it)
        assert ident == execution_id
        assert seen[-3:] == ["step.progress", "step.completed", "execution.completed"]


def test_the_service_prunes_executions_older_than_the_retention(settings: Settings) -> None:
    """With ``executions_retention_days``, the service deletes the executions that finished
    longer ago than that (at start, then hourly); one that finished since stays."""

    def listed(server: Server) -> list[str]:
        answer = httpx.get(f"{server.url}/api/executions", headers=AUTH)
        assert answer.status_code == 200, answer.text
        return [e["id"] for e in answer.json()]

    with Server(settings) as server:  # no retention: kept
        old = _run_to_the_end(server)
    time.sleep(1.0)
    keep = settings.model_copy(update={"executions_retention_days": 0.5 / 86_400})  # 0.5 s
    with Server(keep) as server:
        wait_until("the old execution pruned", lambda: old not in listed(server), timeout=20)
        fresh = _run_to_the_end(server)
        assert listed(server) == [fresh]  # the next prune is an hour away


def test_the_service_prunes_each_executions_objects_after_its_records(
    settings: Settings, caplog: pytest.LogCaptureFixture, aws_env: None
) -> None:
    """With ``executions_retention_objects``, each pruned execution's objects under the
    template go too, and so do those an earlier prune left; objects under no pruned
    execution's prefix stay. While the object store is away, no execution is pruned (its
    objects would be left with no record naming them)."""
    with Server(settings) as server:
        old = [_run_to_the_end(server), _run_to_the_end(server)]
    with open_object_store(settings.resolved_objects_url) as objects:
        for execution_id in old:
            objects.put(f"ml/{execution_id}/frames/f1.jpg", b"x")
            objects.put(f"ml/{execution_id}/out.mp4", b"y")
        objects.put("ml/someone-else/keep.bin", b"z")
    time.sleep(1.0)
    retention = {
        "executions_retention_days": 0.5 / 86_400,
        "executions_retention_objects": "ml/{execution_id}/",
    }

    away = settings.model_copy(
        update={**retention, "objects_url": f"s3://frames?endpoint=http://127.0.0.1:{free_port()}"}
    )
    caplog.set_level(logging.WARNING, logger="framepipe")
    with Server(away) as server:
        wait_until(
            "the skipped prune's warning",
            lambda: any("are not pruned this hour" in r.getMessage() for r in caplog.records),
            timeout=30,
        )
        answer = httpx.get(f"{server.url}/api/executions", headers=AUTH)
        assert sorted(e["id"] for e in answer.json()) == sorted(old)

    earlier = "ml/" + "e" * 32 + "/"  # what an earlier prune could not delete
    with open_object_store(settings.resolved_objects_url) as objects:
        objects.put(f"{earlier}out.mp4", b"w")
        where = objects.url
    with StateStore(settings.resolved_database_url) as store, store.write() as conn:
        conn.execute(
            objects_left.insert().values(
                store=where,
                prefix=earlier,
                execution_id="e" * 32,
                error="refused",
                since=0.0,
                tries=1,
            )
        )

    with Server(settings.model_copy(update=retention)) as server:

        def left() -> list[str]:
            with open_object_store(settings.resolved_objects_url) as o:
                return sorted(i.key for i in o.list("ml/"))

        wait_until("the old executions' objects deleted", lambda: len(left()) == 1, timeout=20)
        assert left() == ["ml/someone-else/keep.bin"]
        answer = httpx.get(f"{server.url}/api/executions", headers=AUTH)
        assert answer.json() == []
    with StateStore(settings.resolved_database_url) as store, store.read() as conn:
        assert conn.execute(sa.select(objects_left.c.prefix)).all() == []


def test_the_service_prunes_only_the_statuses_it_is_told(settings: Settings) -> None:
    """``executions_retention_statuses=failed``: a failed execution is pruned, a completed one
    of the same age is kept (its results with it)."""
    with Server(settings) as server:
        completed = _run_to_the_end(server)
        failed = str(
            httpx.post(
                f"{server.url}/api/executions",
                json={"pipeline": "svc_demo", "inputs": {"steps": 1, "pause": 0, "gate": "/nx"}},
                headers=AUTH,
            ).json()["id"]
        )
        wait_until(
            "the gated execution to fail",
            lambda: (
                httpx.get(f"{server.url}/api/executions/{failed}", headers=AUTH).json()["status"]
                == "failed"
            ),
        )
    time.sleep(1.0)
    keep = settings.model_copy(
        update={
            "executions_retention_days": 0.5 / 86_400,
            "executions_retention_statuses": ["failed"],
        }
    )

    def listed(server: Server) -> list[str]:
        return [e["id"] for e in httpx.get(f"{server.url}/api/executions", headers=AUTH).json()]

    with Server(keep) as server:
        wait_until("the failed execution pruned", lambda: failed not in listed(server), 20)
        assert listed(server) == [completed]


def test_retention_statuses_are_finished_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRAMEPIPE_EXECUTIONS_RETENTION_STATUSES", " Failed, cancelled ")
    assert load_settings().executions_retention_statuses == ["failed", "cancelled"]
    monkeypatch.setenv("FRAMEPIPE_EXECUTIONS_RETENTION_STATUSES", "")
    assert set(load_settings().executions_retention_statuses) == {s.value for s in FINISHED}
    monkeypatch.setenv("FRAMEPIPE_EXECUTIONS_RETENTION_STATUSES", "failed,running")
    with pytest.raises(ConfigError, match="FRAMEPIPE_EXECUTIONS_RETENTION_STATUSES: 'running'"):
        load_settings()


def test_a_retention_objects_template_that_names_every_execution_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for template, says in (
        ("ml/", "does not hold {execution_id}"),
        ("ml/{execution_id:.0}/", "takes no format or conversion"),
        ("ml/{step}/{execution_id}/", "unknown field(s) step"),
    ):
        monkeypatch.setenv("FRAMEPIPE_EXECUTIONS_RETENTION_OBJECTS", template)
        with pytest.raises(ConfigError, match=re.escape(says)) as refused:
            load_settings()
        assert "FRAMEPIPE_EXECUTIONS_RETENTION_OBJECTS" in str(refused.value)


def _run_to_the_end(server: Server) -> str:
    """Submit a short demo execution and wait until it completed; its id."""
    execution_id = str(
        httpx.post(
            f"{server.url}/api/executions",
            json={"pipeline": "svc_demo", "inputs": {"steps": 1, "pause": 0}},
            headers=AUTH,
        ).json()["id"]
    )

    def status() -> str:
        answer = httpx.get(f"{server.url}/api/executions/{execution_id}", headers=AUTH)
        return str(answer.json()["status"])

    wait_until("the execution to complete", lambda: status() == "completed")
    return execution_id


def _app_events(kind: str, n: int, *, age: float = 0.0) -> list[Event]:
    return [Event(kind, time.time() - age, data={"n": i}) for i in range(n)]


def test_the_feed_goes_on_after_the_newest_events_are_pruned(
    server: Server, settings: Settings
) -> None:
    """The newest events pruned, the next ones get higher ids still, and ``/ws`` and
    ``GET /api/events?after=`` give them: on SQLite the rowid gave the pruned ids again, below
    the feed's last id, and they were never sent (found in review; migration 0006)."""
    ws_url = f"ws://127.0.0.1:{server.port}/ws?token={TOKEN}"

    async def scenario(store: StateStore) -> tuple[list[int], list[int]]:
        async with websockets.connect(ws_url) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "snapshot"

            async def next_events(n: int) -> list[tuple[int, str]]:
                got: list[tuple[int, str]] = []
                while len(got) < n:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if message["type"] == "event":
                        got.append((message["event"]["id"], message["event"]["type"]))
                return got

            old = await asyncio.to_thread(
                append_events, store, _app_events("app.old", 3, age=3 * 86400)
            )
            assert await next_events(3) == [(e.id, "app.old") for e in old]
            assert await asyncio.to_thread(prune_events, store, 86400) == 3
            new = await asyncio.to_thread(append_events, store, _app_events("app.new", 2))
            assert await next_events(2) == [(e.id, "app.new") for e in new]
        return [e.id or 0 for e in old], [e.id or 0 for e in new]

    with StateStore(settings.resolved_database_url) as store:
        old, new = asyncio.run(scenario(store))
    assert min(new) > max(old)
    with httpx.Client(base_url=server.url, headers=AUTH) as client:
        page = client.get("/api/events", params={"after": max(old)}).json()
    assert [e["id"] for e in page["events"]] == new


def _readers_wait_for_event_writers(store: StateStore) -> bool:
    """A reader of events waits on the events lock (PostgreSQL; never on SQLite)."""
    if store.dialect == "sqlite":
        return False
    with store.read() as conn:
        waiting = conn.exec_driver_sql(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
        ).scalar_one()
    return bool(waiting)


def test_events_of_concurrent_writers_reach_the_feed_and_after_in_id_order(
    server: Server, settings: Settings
) -> None:
    """Writer A takes its event id and holds its transaction open (from the test); writer B
    writes an event meanwhile. Both reach ``/ws`` and ``GET /api/events?after=``, in id order.
    On PostgreSQL B's id was the higher and committed first: the feed read it and passed A's
    id for good, and so did a client paging with ``after`` (found in review). Now a reader of
    events waits for the event writers in flight (an advisory lock, shared by writers,
    exclusive for readers), and on SQLite B waits for A's commit (the write lock)."""
    ws_url = f"ws://127.0.0.1:{server.port}/ws?token={TOKEN}"
    a_inserted, release, b_starting, b_done = (threading.Event() for _ in range(4))
    b_pid: list[int] = []
    ids: dict[str, int] = {}

    def writer_a(store: StateStore) -> None:
        with store.write() as conn:
            ids["a"] = insert_events(store, conn, _app_events("writer.a", 1))[0].id or 0
            a_inserted.set()
            assert release.wait(60)

    def writer_b(store: StateStore) -> None:
        b_starting.set()
        with store.write() as conn:
            if store.dialect == "postgresql":
                b_pid.append(conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())
            ids["b"] = insert_events(store, conn, _app_events("writer.b", 1))[0].id or 0
        b_done.set()

    def b_committed_or_waits(store: StateStore) -> bool:
        if b_done.is_set():
            return True
        if store.dialect == "sqlite":  # its write lock: B cannot get past BEGIN IMMEDIATE
            return b_starting.is_set()
        if not b_pid:
            return False
        with store.read() as conn:
            waiting = conn.exec_driver_sql(
                f"SELECT wait_event_type FROM pg_stat_activity WHERE pid = {b_pid[0]}"
            ).scalar()
        return bool(waiting == "Lock")

    async def scenario(store: StateStore, client: httpx.AsyncClient) -> dict[str, Any]:
        async with websockets.connect(ws_url) as ws:
            snapshot = json.loads(await asyncio.wait_for(ws.recv(), 10))
            heard: list[tuple[int, str]] = []

            async def hear(until: Any, patience: float) -> None:
                deadline = time.monotonic() + patience
                while not until() and time.monotonic() < deadline:
                    try:
                        message = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
                    except TimeoutError:
                        continue
                    if message["type"] == "event":
                        heard.append((message["event"]["id"], message["event"]["type"]))

            a = threading.Thread(target=writer_a, args=(store,), daemon=True)
            a.start()
            assert await asyncio.to_thread(a_inserted.wait, 30)
            b = threading.Thread(target=writer_b, args=(store,), daemon=True)
            b.start()
            await wait_until_async(
                "writer B to commit or wait", lambda: b_committed_or_waits(store)
            )
            # A client pages while A is still open (B, on PostgreSQL, committed already): on
            # PostgreSQL its read waits for A's commit, on SQLite it finds nothing yet.
            paging = asyncio.ensure_future(
                client.get("/api/events", params={"after": snapshot["after"]})
            )
            await wait_until_async(
                "the read to return or to wait for writer A",
                lambda: paging.done() or _readers_wait_for_event_writers(store),
            )
            release.set()
            first = (await paging).json()
            await asyncio.to_thread(a.join, 30)
            await asyncio.to_thread(b.join, 30)
            await hear(lambda: len(heard) >= 2, 15)
            rest = (await client.get("/api/events", params={"after": first["next"]})).json()
            paged = [(e["id"], e["type"]) for e in first["events"] + rest["events"]]
            return {"heard": heard, "paged": paged}

    async def main(store: StateStore) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH) as client:
            return await scenario(store, client)

    with StateStore(settings.resolved_database_url) as store:
        got = asyncio.run(main(store))
    assert ids["a"] < ids["b"]
    expected = [(ids["a"], "writer.a"), (ids["b"], "writer.b")]
    assert got["heard"] == expected
    assert got["paged"] == expected


def test_the_feed_follows_event_ids_given_again(database_url: str) -> None:
    """The backstop: when the ids start again below the feed's last id (the database replaced
    by a fresh one under a running service), the feed follows from the newest stored id
    instead of waiting for ids above the old one."""

    def replace_database(store: StateStore) -> None:
        with store.write() as conn:
            conn.exec_driver_sql("DELETE FROM fp_events")
            if store.dialect == "sqlite":
                conn.exec_driver_sql("UPDATE sqlite_sequence SET seq = 0 WHERE name = 'fp_events'")
            else:
                conn.exec_driver_sql(
                    "SELECT setval(pg_get_serial_sequence('fp_events', 'id'), 1, false)"
                )

    async def scenario(store: StateStore) -> None:
        feed = EventFeed(store, interval=0.02)
        await feed.start()
        try:
            async with feed.subscribe() as stream:
                events = aiter(stream)

                async def next_events(n: int) -> list[tuple[int | None, str]]:
                    got: list[tuple[int | None, str]] = []
                    for _ in range(n):
                        event = await asyncio.wait_for(anext(events), 30)
                        assert event is not None
                        got.append((event.id, event.type))
                    return got

                before = await asyncio.to_thread(append_events, store, _app_events("before", 3))
                assert await next_events(3) == [(1, "before"), (2, "before"), (3, "before")]
                assert [e.id for e in before] == [1, 2, 3]
                await asyncio.to_thread(replace_database, store)
                await wait_until_async("the feed to follow the ids back", lambda: feed.last_id == 0)
                after = await asyncio.to_thread(append_events, store, _app_events("after", 2))
                assert [e.id for e in after] == [1, 2]
                assert await next_events(2) == [(1, "after"), (2, "after")]
        finally:
            await feed.stop()

    with StateStore(database_url) as store:
        asyncio.run(scenario(store))


@pytest.mark.postgres
def test_the_feed_rides_out_a_database_outage_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The state database refuses connections for about 3 s: the feed says so in one warning
    (the error's first line, no password), then one line when it answers again, and the
    events stored during the outage reach the subscriber."""
    from test_event_sinks import _postgres_outage

    caplog.set_level(logging.INFO, logger="framepipe.server.feed")

    async def scenario(store: StateStore, begin: Any, end: Any) -> list[str]:
        feed = EventFeed(store, interval=0.02)
        await feed.start()
        try:
            async with feed.subscribe() as stream:
                events = aiter(stream)
                await asyncio.to_thread(begin)
                await asyncio.sleep(3.0)
                await asyncio.to_thread(end)
                await asyncio.to_thread(append_events, store, _app_events("after", 2))
                got = []
                for _ in range(2):
                    event = await asyncio.wait_for(anext(events), 30)
                    assert event is not None
                    got.append(event.type)
                return got
        finally:
            await feed.stop()

    with _postgres_outage() as (store, begin, end):
        assert asyncio.run(scenario(store, begin, end)) == ["after", "after"]
    lines = [r.getMessage() for r in caplog.records if r.name.endswith("server.feed")]
    warned = [line for line in lines if "does not answer" in line]
    assert len(warned) == 1 and "\n" not in warned[0] and "s3cret-pw" not in warned[0]
    assert len([line for line in lines if "answers again" in line]) == 1
    assert len(lines) == 2, lines


def test_websocket_refuses_a_missing_token(server: Server) -> None:
    async def scenario() -> int | None:
        try:
            async with websockets.connect(f"ws://127.0.0.1:{server.port}/ws") as ws:
                await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None
        except websockets.InvalidStatus as exc:
            return exc.response.status_code
        return None

    assert asyncio.run(scenario()) in (1008, 403)


def test_sources_show_a_live_apps_state_and_latest_frame(settings: Settings) -> None:
    app = App("lobby", settings=settings, health_interval=0.05)
    pipeline = app.add_pipeline(
        StreamPipeline(
            "door",
            PatternSource("door", width=1280, height=720, fps=30),
            stages=[Stage(lambda f: f, name="noop")],
        )
    )
    stop = threading.Event()

    def run_app() -> None:
        async def main() -> None:
            await app.start()
            try:
                await asyncio.to_thread(stop.wait)
            finally:
                await app.stop()

        asyncio.run(main())

    runner = threading.Thread(target=run_app, daemon=True)
    runner.start()
    try:
        with Server(settings) as server, httpx.Client(base_url=server.url, headers=AUTH) as client:

            def with_a_frame() -> list[dict[str, Any]] | None:
                sources: list[dict[str, Any]] = client.get("/api/sources").json()
                ready = sources and sources[0]["frame_url"] and pipeline.frames_captured > 5
                return sources if ready else None

            sources = wait_until(
                "the app's source with a frame",
                with_a_frame,
                explain=lambda: client.get("/api/sources").json(),
            )
            assert [(s["app"], s["pipeline"], s["state"]) for s in sources] == [
                ("lobby", "door", "running")
            ]
            assert sources[0]["frames"] > 0
            frame = client.get(sources[0]["frame_url"])
            assert frame.status_code == 200
            assert frame.headers["content-type"] == "image/jpeg"
            image = cv2.imdecode(np.frombuffer(frame.content, np.uint8), cv2.IMREAD_COLOR)
            assert image.shape == (360, 640, 3)  # the preview is at most 640 wide
            assert client.get("/api/sources/lobby/nope/frame").status_code == 404
            assert client.get("/api/sources/../door/frame").status_code == 404
            assert client.get("/api/sources/lobby/..%2Fx/frame").status_code == 404
            refused = client.get("/api/sources/lobby/.hidden/frame")
            assert refused.status_code == 422  # a name may not start with a dot
            assert client.get("/api/processors").json() == []  # no Redis broker here
    finally:
        stop.set()
        runner.join(timeout=30)


@pytest.mark.slow
def test_sources_of_an_app_served_here_stop_and_start(settings: Settings) -> None:
    app = App("station", settings=settings, health_interval=0.05)
    one = app.add_pipeline(
        StreamPipeline(
            "station_1",
            PatternSource("station_1", fps=50),
            stages=[Stage(lambda f: f, name="noop")],
        )
    )
    app.add_pipeline(
        StreamPipeline(
            "station_2",
            PatternSource("station_2", fps=50),
            stages=[Stage(lambda f: f, name="noop")],
        )
    )

    events: list[tuple[str, dict[str, Any]]] = []
    app.on("*", lambda kind, data: events.append((kind, data)))

    def state_of(client: httpx.Client, name: str) -> str:
        rows = {s["pipeline"]: s for s in client.get("/api/sources").json()}
        return str(rows[name]["state"]) if name in rows else ""

    with (
        Server(settings, apps=[app]) as server,
        httpx.Client(base_url=server.url, headers=AUTH) as client,
    ):
        wait_until("station_1 to run", lambda: state_of(client, "station_1") == "running")
        stopped = client.post("/api/sources/station/station_1/stop")
        assert stopped.status_code == 202
        assert stopped.json()["state"] == "stopped"
        # stopped for real: the answer comes once the capture and its tasks have ended
        assert ("pipeline.paused", {"pipeline": "station_1"}) in events
        assert not one.running
        frames = one.frames_captured
        wait_until("the snapshot to show it", lambda: state_of(client, "station_1") == "stopped")
        assert one.frames_captured == frames  # none since, while the snapshot caught up
        assert state_of(client, "station_2") == "running"  # the other one is untouched
        started = client.post("/api/sources/station/station_1/start")
        assert started.status_code == 202
        wait_until("frames again", lambda: one.frames_captured > frames + 5)
        wait_until("station_1 to run", lambda: state_of(client, "station_1") == "running")
        missing = client.post("/api/sources/station/station_9/stop")
        assert missing.status_code == 404
        assert (
            "has no pipeline 'station_9' (it has: station_1, station_2)"
            in (missing.json()["detail"])
        )
        assert client.post("/api/sources/elsewhere/x/stop").status_code == 404
        metrics = client.get("/metrics").text
        assert 'pipeline="station_2"' in metrics
        assert "framepipe_stage_fps{" in metrics
        assert "framepipe_source_restarts_total{" in metrics
        # the app's events go to the state database through its event sink, counted
        written = r'framepipe_event_sink_written_total\{app="station",sink="store",[^}]*\} [1-9]'
        assert re.search(written, metrics)
        assert re.search(r"framepipe_event_sink_dropped_total\{[^}]*\} 0.0", metrics)
        events = client.get("/api/events", params={"limit": 1000}).json()["events"]
        paused = [e for e in events if e["type"] == "pipeline.paused"]
        assert [e["data"] for e in paused] == [{"app": "station", "pipeline": "station_1"}]
        assert any(e["type"] == "source.started" and e["data"]["app"] == "station" for e in events)


def test_serve_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_app,
        ["--home", str(tmp_path), "serve", "--host", "0.0.0.0"],
        env={"FRAMEPIPE_API_TOKEN": ""},
    )
    assert result.exit_code == 2
    assert "refusing to serve on 0.0.0.0 without a token" in result.output
