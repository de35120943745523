"""The job semantics users rely on, run in both modes from one suite: the embedded engine, and
real ``framepipe worker`` processes on Redis and the database. A rule that holds in one mode
and not the other is a bug this suite is here to catch."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import worker_pipelines as wp
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.events import Event
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import list_events
from test_jobs_workers import Cluster, cluster_factory  # noqa: F401 - the fixture

Runner = Callable[..., tuple[ExecutionInfo, list[Event]]]


@pytest.fixture(params=["embedded", "workers"])
def run_in_mode(request: pytest.FixtureRequest, tmp_path: Path,
                database_url: str) -> Iterator[Runner]:
    """``run(pipeline, inputs, **settings)``: the finished execution and its stored events."""

    def collect(settings: Settings, info: ExecutionInfo) -> tuple[ExecutionInfo, list[Event]]:
        store = StateStore(settings.resolved_database_url)
        try:
            return info, list_events(store, info.id)
        finally:
            store.close()

    if request.param == "embedded":
        def run(pipeline: Pipeline, inputs: dict[str, Any],
                **overrides: Any) -> tuple[ExecutionInfo, list[Event]]:
            settings = Settings(home=tmp_path / "home", database_url=database_url,
                                **overrides)

            async def main() -> ExecutionInfo:
                async with JobEngine(settings=settings) as engine:
                    return await engine.run(pipeline, {"dir": str(tmp_path), **inputs},
                                            raise_on_failure=False)

            return collect(settings, asyncio.run(main()))

        yield run
        return

    factory = request.getfixturevalue("cluster_factory")

    def run_on_workers(pipeline: Pipeline, inputs: dict[str, Any],
                       **overrides: Any) -> tuple[ExecutionInfo, list[Event]]:
        cluster: Cluster = factory(database_url, **overrides)
        cluster.wait_registered(cluster.worker())
        info = cluster.wait(cluster.submit(pipeline, **inputs))
        return collect(cluster.settings, info)

    yield run_on_workers


def test_a_retry_delay_is_capped_by_the_setting_in_both_modes(run_in_mode: Runner) -> None:
    """A step asking for 120 s between attempts, under retry_max_delay=0.5, waits about 0.5 s
    (jitter is 10%), then fails for good after its one retry."""
    info, events = run_in_mode(wp.patient, {}, retry_initial_delay=0.05, retry_max_delay=0.5)
    assert info.status.value == "failed"
    retrying = [e for e in events if e.type == "step.retrying"]
    assert len(retrying) == 1
    assert 0.45 <= retrying[0].data["delay"] <= 0.5
    started = [e.ts for e in events if e.type == "step.started"]
    assert len(started) == 2
    assert 0.4 <= started[1] - started[0] < 5
    assert "failed after 2 attempts: RuntimeError: attempt 2 failed" in (info.error or "")


@pytest.mark.parametrize(("mode", "says"), [
    ("initial", "would do nothing: 'join' takes no parameters"),
    ("differs", "names the existing instance piece:"),
    ("differs_later", "names the existing instance piece:"),
    ("again", None),
])
def test_a_spawn_whose_dependencies_would_be_dropped_is_refused(
        run_in_mode: Runner, mode: str, says: str | None) -> None:
    info, events = run_in_mode(wp.footgun, {"mode": mode})
    if says is None:
        assert info.status.value == "completed"
        return
    assert info.status.value == "failed"
    assert says in (info.error or "")
    assert "StepParamsError" in (info.error or "")
    assert not [e for e in events if e.type == "step.retrying"]  # permanent: not retried
