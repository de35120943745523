"""The job semantics users rely on, run in both modes from one suite: the embedded engine, and
real ``framepipe worker`` processes on Redis and the database. A rule that holds in one mode
and not the other is a bug this suite is here to catch."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

import worker_pipelines as wp
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.events import Event
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import list_events
from test_jobs_workers import Cluster, cluster_factory  # noqa: F401 - the fixture


class Mode:
    """One way to run executions: ``embedded`` (a JobEngine in this process) or ``workers``
    (real ``framepipe worker`` processes). Calling it runs an execution to its end and
    returns it with its stored events; :meth:`retry` resumes one the same way."""

    def __init__(self, name: str, tmp_path: Path, database_url: str,
                 factory: Callable[..., Cluster] | None) -> None:
        self.name = name
        self.dir = tmp_path / "steps"  # where steps leave files (the cluster's, on workers)
        self.dir.mkdir(exist_ok=True)
        self.tmp_path = tmp_path
        self.database_url = database_url
        self._factory = factory
        self._cluster: Cluster | None = None
        self.settings = Settings(home=tmp_path / "home", database_url=database_url)

    def _setup(self, overrides: dict[str, Any]) -> None:
        if self._factory is None:
            self.settings = Settings(home=self.tmp_path / "home",
                                     database_url=self.database_url, **overrides)
        elif self._cluster is None:
            self._cluster = self._factory(self.database_url, **overrides)
            self._cluster.wait_registered(self._cluster.worker())
            self.settings = self._cluster.settings
            self.dir = self._cluster.dir

    def _events(self, info: ExecutionInfo) -> tuple[ExecutionInfo, list[Event]]:
        store = StateStore(self.settings.resolved_database_url)
        try:
            return info, list_events(store, info.id)
        finally:
            store.close()

    def _engine(self, work: Callable[[JobEngine], Any]) -> Any:
        async def main() -> Any:
            async with JobEngine(settings=self.settings) as engine:
                return await work(engine)

        return asyncio.run(main())

    def __call__(self, pipeline: Pipeline, inputs: dict[str, Any],
                 **overrides: Any) -> tuple[ExecutionInfo, list[Event]]:
        self._setup(overrides)
        full = {"dir": str(self.dir), **inputs}

        async def run(engine: JobEngine) -> ExecutionInfo:
            execution_id = await engine.submit(pipeline, full)
            return await engine.wait(execution_id, raise_on_failure=False)

        return self._events(self._engine(run))

    def retry(self, info: ExecutionInfo, pipeline: Pipeline) -> tuple[ExecutionInfo, list[Event]]:
        async def again(engine: JobEngine) -> ExecutionInfo:
            execution_id = await engine.retry(info.id, pipeline)
            return await engine.wait(execution_id, raise_on_failure=False)

        return self._events(self._engine(again))


Runner = Mode


@pytest.fixture(params=["embedded", "workers"])
def run_in_mode(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Mode:
    """The mode under test; see :class:`Mode`."""
    factory = request.getfixturevalue("cluster_factory") if request.param == "workers" else None
    return Mode(request.param, tmp_path, database_url, factory)


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


def _started(events: list[Event]) -> Counter[str]:
    return Counter(e.step_key for e in events if e.type == "step.started" and e.step_key)


def test_fail_fast_then_retry_resumes_without_running_completed_steps_again(
        run_in_mode: Runner) -> None:
    """wk_chain: first -> second -> flaky (fails twice, then passes) -> gated (fails until
    its gate file exists). The execution fails at gated; a retry runs gated alone."""
    info, events = run_in_mode(wp.chain, {})
    assert info.status.value == "failed"
    assert "step 'gated' failed after 1 attempt: FileNotFoundError" in (info.error or "")
    steps = {s.key: s for s in info.steps}
    assert steps["flaky"].status.value == "completed"
    assert steps["flaky"].output == {"c": 3, "flaky_attempt": 3}
    assert [e.data["attempt"] for e in events if e.type == "step.retrying"] == [1, 2]
    assert _started(events) == {"first": 1, "second": 1, "flaky": 3, "gated": 1}
    progress = [e for e in events if e.type == "step.progress" and e.step_key == "first"]
    assert progress and progress[0].data["progress"] == 50.0
    (run_in_mode.dir / "gate").touch()
    again, all_events = run_in_mode.retry(info, wp.chain)
    assert again.status.value == "completed"
    assert again.progress == 100.0
    assert again.data["d"] == 4
    assert _started(all_events) == {"first": 1, "second": 1, "flaky": 3, "gated": 2}


def test_an_output_over_the_limit_fails_the_step_without_retries(run_in_mode: Runner) -> None:
    info, events = run_in_mode(wp.bloated, {"size": 5000}, max_step_output_bytes=1000)
    assert info.status.value == "failed"
    assert "StepOutputError" in (info.error or "")
    assert "more than the 1000-byte limit" in (info.error or "")
    assert _started(events) == {"big": 1}


_graphs = st.integers(min_value=1, max_value=12).flatmap(
    lambda n: st.lists(st.lists(st.integers(min_value=0, max_value=max(0, n - 1)),
                                max_size=3), min_size=n, max_size=n))


def test_spawned_dags_run_every_step_once_after_its_dependencies(run_in_mode: Runner) -> None:
    """Property, in both modes: for any DAG spawned at run time (key dependencies on earlier
    nodes, a name dependency on every node), every step runs exactly once and starts only
    after everything it depends on finished."""

    @given(raw=_graphs)
    @fuzz_settings(max_examples=12, deadline=None, database=None,
                   suppress_health_check=list(HealthCheck))
    def check(raw: list[list[int]]) -> None:
        deps = [sorted({d for d in ds if d < i}) for i, ds in enumerate(raw)]
        info, events = run_in_mode(wp.dag, {"deps": deps})
        assert info.status.value == "completed", info.error
        assert set(_started(events).values()) == {1}
        steps = {s.key: s for s in info.steps}
        assert len(steps) == len(deps) + 2
        nodes = {s.params["i"]: s for s in info.steps if s.name == "node"}
        for i, ds in enumerate(deps):
            for d in ds:
                assert nodes[d].finished_at <= nodes[i].started_at, (i, d)  # type: ignore[operator]
        last_node = max(s.finished_at or 0 for s in nodes.values())
        assert last_node <= (steps["gather"].started_at or 0)

    check()
