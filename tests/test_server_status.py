"""``GET /api/status/{job_id}`` true to the state store: a job no engine or worker has started
reads ``queued``, and ``updatedAt`` moves when the job's progress does."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

import worker_pipelines as wp
from framepipe import Pipeline, StepContext
from framepipe.config import Settings
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepInfo, StepStatus
from framepipe.server.routes.status import job_status
from test_jobs_workers import Cluster, cluster_factory  # noqa: F401 - the fixture below uses
from test_server import AUTH, Server
from waiting import wait_until

stepped = Pipeline("status_stepped")


@stepped.step()
def advance(ctx: StepContext) -> dict[str, Any]:
    """Reports 20 %, waits for the file ``go``, reports 60 %, waits for ``end``."""
    folder = Path(ctx.inputs["dir"])
    ctx.progress(20, "started")
    wait_until("the go file", (folder / "go").exists, 60, interval=0.02)
    ctx.progress(60, "going")
    wait_until("the end file", (folder / "end").exists, 60, interval=0.02)
    return {"done": True}


def _at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _status_when(client: httpx.Client, job_id: str, check: Callable[[dict[str, Any]], bool]) -> Any:
    def seen() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/api/status/{job_id}").json()
        return body if check(body) else None

    return wait_until(f"the status of {job_id} to change", seen, 60)


def test_updated_at_moves_with_progress(settings: Settings, tmp_path: Path) -> None:
    """Between two progress reports of one step nothing else of the job changes: its
    updatedAt stood at the step's start while progress went from 20 to 60 (found in review)."""
    with (
        Server(settings, pipelines=(stepped,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        job_id = client.post(
            "/api/executions", json={"pipeline": "status_stepped", "inputs": {"dir": str(tmp_path)}}
        ).json()["id"]
        first = _status_when(client, job_id, lambda b: b["progress"] >= 20)
        assert (first["status"], first["stage"]) == ("processing", "advance")
        time.sleep(0.5)
        (tmp_path / "go").touch()
        second = _status_when(client, job_id, lambda b: b["progress"] >= 60)
        assert second["status"] == "processing"
        assert _at(second["updatedAt"]) >= _at(first["updatedAt"]) + 0.4
        assert _at(second["updatedAt"]) <= time.time() + 0.01
        (tmp_path / "end").touch()
        done = _status_when(client, job_id, lambda b: b["status"] == "completed")
        assert _at(done["updatedAt"]) >= _at(second["updatedAt"])


def test_a_job_waiting_for_a_worker_reads_queued(
    request: pytest.FixtureRequest, database_url: str
) -> None:
    """A job submitted to the workers' broker reads ``queued`` (progress 0, no stage) until a
    worker starts its first step; it read ``processing`` (found in review)."""
    make: Callable[..., Cluster] = request.getfixturevalue("cluster_factory")
    cluster = make(database_url)
    with (
        Server(cluster.settings, pipelines=(wp.slow,)) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        job_id = client.post(
            "/api/executions",
            json={"pipeline": "wk_slow", "inputs": {"dir": str(cluster.dir), "seconds": 1.5}},
        ).json()["id"]
        waiting = client.get(f"/api/status/{job_id}").json()
        assert (waiting["status"], waiting["progress"], waiting["stage"]) == ("queued", 0, None)
        assert waiting["executionStatus"] == "running"
        time.sleep(0.5)  # no worker: still queued
        assert client.get(f"/api/status/{job_id}").json()["status"] == "queued"
        cluster.wait_registered(cluster.worker())
        running = _status_when(client, job_id, lambda b: b["status"] != "queued")
        assert (running["status"], running["stage"]) == ("processing", "long")
        done = _status_when(client, job_id, lambda b: b["status"] == "completed")
        assert done["progress"] == 100


def _step(name: str, status: StepStatus, **times: float | None) -> StepInfo:
    return StepInfo(
        key=name, name=name, status=status, params={}, depends_on=[], weight=1.0,
        progress=0.0, message=None, attempt=1, failures=0, crashes=0, output=None, error=None,
        spawned_by=None, created_at=100.0, ready_at=None, started_at=times.get("started_at"),
        finished_at=times.get("finished_at"),
    )  # fmt: skip


def test_a_step_waiting_to_be_retried_is_the_stage() -> None:
    """A job whose step failed and waits for its next try reads ``processing`` with that step
    as its stage, not a stage of None as if nothing ran; the newest event's time is its
    ``updatedAt`` when it is the newest time known."""
    info = ExecutionInfo(
        id="0" * 32, pipeline="p", pipeline_ref=None, status=ExecutionStatus.RUNNING,
        inputs={}, progress=50.0, error=None, owner=None, runs=1, created_at=100.0,
        started_at=101.0, finished_at=None,
        steps=[
            _step("first", StepStatus.COMPLETED, started_at=101.0, finished_at=102.0),
            _step("flaky", StepStatus.RETRYING, started_at=103.0, finished_at=104.0),
        ],
    )  # fmt: skip
    status = job_status(info, last_event_at=105.0)
    assert (status["status"], status["stage"], status["progress"]) == ("processing", "flaky", 50)
    assert _at(status["updatedAt"]) == 105.0
