"""Retry through the HTTP service on workers: the workers load the execution's pipeline by
the reference stored with it, so the service resumes an execution of a pipeline it does not
serve itself, as ``JobClient.retry`` does (embedded, the service needs the pipeline:
``test_server.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

import worker_pipelines as wp
from framepipe.jobs.sync_client import SyncJobClient
from test_jobs_workers import Cluster, cluster_factory  # noqa: F401 - the fixture below uses
from test_server import AUTH, Server, wait_status


def test_the_service_resumes_on_workers_a_pipeline_it_does_not_serve(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> None:
    make: Callable[..., Cluster] = request.getfixturevalue("cluster_factory")
    cluster = make(database_url)
    worker = cluster.worker()
    cluster.wait_registered(worker)
    with SyncJobClient(settings=cluster.settings) as jobs:
        execution_id = jobs.submit(wp.resume, {"dir": str(cluster.dir)})
        failed = jobs.wait(execution_id, raise_on_failure=False)
    assert failed.status.value == "failed", failed.error
    (cluster.dir / "fixed").touch()
    with (
        Server(cluster.settings, pipelines=()) as server,
        httpx.Client(base_url=server.url, headers=AUTH, timeout=30) as client,
    ):
        retried = client.post(f"/api/executions/{execution_id[:8]}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["id"] == execution_id
        done = wait_status(client, execution_id)
        assert done["status"] == "completed", done.get("error")
        attempts = {s["key"]: s["attempt"] for s in done["steps"]}
        assert attempts["first"] == 1  # completed steps are not run again
        assert attempts["breaks"] == 3  # two attempts failed, the retry's first passed
        again = client.post(f"/api/executions/{execution_id}/retry")
        assert again.status_code == 409
        assert "has completed; nothing to retry" in again.json()["detail"]
