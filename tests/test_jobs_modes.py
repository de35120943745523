"""The job semantics users rely on, run in both modes from one suite: the embedded engine, and
real ``framepipe worker`` processes on Redis and the database. A rule that holds in one mode
and not the other is a bug this suite is here to catch."""

from __future__ import annotations

import asyncio
import copy
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzz_settings
from hypothesis import strategies as st

import worker_pipelines as wp
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.errors import (
    ExecutionFailedError,
    ExecutionStateError,
    InvalidInputError,
    PipelineDefinitionError,
    UnknownStepError,
)
from framepipe.events import Event
from framepipe.jobs.control import request_cancel
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.keys import step_key
from framepipe.jobs.ledger import Ledger
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import get_execution, list_events, list_executions
from test_jobs_workers import Cluster, cluster_factory  # noqa: F401 - the fixture

T = TypeVar("T")


QUICK: dict[str, Any] = {
    "retry_initial_delay": 0.05,
    "retry_max_delay": 0.2,
    "heartbeat_interval": 0.2,
    "shutdown_grace": 2.0,
}
"""Settings of both modes unless a test overrides them: short retries, cancels seen quickly."""


class Mode:
    """One way to run executions: ``embedded`` (a JobEngine in this process) or ``workers``
    (real ``framepipe worker`` processes). Calling it runs an execution to its end and
    returns it with its stored events; :meth:`retry` resumes one the same way;
    :meth:`session` hands a test the engine to drive itself (submit, cancel, wait).

    Settings are fixed by the first call (``overrides`` on top of :data:`QUICK`): the workers
    are started then (one, running ``concurrency`` steps at once: 2 unless overridden).
    Steps leave files in :attr:`dir` (``inputs["dir"]``)."""

    def __init__(
        self, name: str, tmp_path: Path, database_url: str, factory: Callable[..., Cluster] | None
    ) -> None:
        self.name = name
        self.dir = tmp_path / "steps"  # where steps leave files (the cluster's, on workers)
        self.dir.mkdir(exist_ok=True)
        self.tmp_path = tmp_path
        self.database_url = database_url
        self._factory = factory
        self._cluster: Cluster | None = None
        self._overrides: dict[str, Any] | None = None
        self.settings = Settings(home=tmp_path / "home", database_url=database_url, **QUICK)

    @property
    def embedded(self) -> bool:
        return self._factory is None

    def _setup(self, overrides: dict[str, Any]) -> None:
        if self._overrides is not None:
            if overrides and overrides != self._overrides:
                raise ValueError(
                    f"settings are fixed by the first run ({self._overrides}); got {overrides}"
                )
            return
        self._overrides = overrides
        values = {**QUICK, **overrides}
        if self._factory is None:
            self.settings = Settings(
                home=self.tmp_path / "home", database_url=self.database_url, **values
            )
        else:
            self._cluster = self._factory(self.database_url, **values)
            worker = self._cluster.worker(concurrency=values.get("concurrency", 2))
            self._cluster.wait_registered(worker)
            self.settings = self._cluster.settings
            self.dir = self._cluster.dir

    def inputs(self, **inputs: Any) -> dict[str, Any]:
        """``inputs`` with the folder the steps write to."""
        return {"dir": str(self.dir), **inputs}

    def notes(self, log: str) -> list[str]:
        """The lines steps appended to ``log`` in :attr:`dir`."""
        return wp.notes(self.dir, log)

    def events(self, execution_id: str) -> list[Event]:
        store = StateStore(self.settings.resolved_database_url)
        try:
            return list_events(store, execution_id)
        finally:
            store.close()

    def session(self, work: Callable[[JobEngine], Awaitable[T]], **overrides: Any) -> T:
        """Run ``await work(engine)`` with a JobEngine of this mode: it runs the executions
        (embedded) or submits them to the workers and watches them through the store."""
        self._setup(overrides)

        async def main() -> T:
            async with JobEngine(settings=self.settings) as engine:
                return await work(engine)

        return asyncio.run(main())

    def __call__(
        self, pipeline: Pipeline, inputs: dict[str, Any], **overrides: Any
    ) -> tuple[ExecutionInfo, list[Event]]:
        async def run(engine: JobEngine) -> ExecutionInfo:
            execution_id = await engine.submit(pipeline, self.inputs(**inputs))
            return await engine.wait(execution_id, raise_on_failure=False)

        info = self.session(run, **overrides)
        return info, self.events(info.id)

    def retry(self, info: ExecutionInfo, pipeline: Pipeline) -> tuple[ExecutionInfo, list[Event]]:
        async def again(engine: JobEngine) -> ExecutionInfo:
            execution_id = await engine.retry(info.id, pipeline)
            return await engine.wait(execution_id, raise_on_failure=False)

        again_info = self.session(again)
        return again_info, self.events(again_info.id)


async def until(
    engine: JobEngine,
    execution_id: str,
    type_: str,
    key: str | None = None,
    *,
    attempt: int | None = None,
    within: float = 30.0,
) -> Event:
    """The first stored event of ``type_`` (of step ``key``, of ``attempt``), once there is one."""
    deadline = time.monotonic() + within
    while True:
        for e in await asyncio.to_thread(list_events, engine.store, execution_id):
            if (
                e.type == type_
                and key in (None, e.step_key)
                and (attempt is None or e.data.get("attempt") == attempt)
            ):
                return e
        if time.monotonic() > deadline:
            raise AssertionError(f"no {type_} event of {key or 'the execution'} in {within}s")
        await asyncio.sleep(0.02)


Runner = Mode


@pytest.fixture(params=["embedded", pytest.param("workers", marks=pytest.mark.slow)])
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


@pytest.mark.parametrize(
    ("mode", "says"),
    [
        ("initial", "would do nothing: 'join' takes no parameters"),
        ("differs", "names the existing instance piece:"),
        ("differs_later", "names the existing instance piece:"),
        ("again", None),
    ],
)
def test_a_spawn_whose_dependencies_would_be_dropped_is_refused(
    run_in_mode: Runner, mode: str, says: str | None
) -> None:
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
    run_in_mode: Runner,
) -> None:
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
    assert "store paths, not contents" in info.errors["big"]
    assert info.step("big").attempt == 1  # retries=2, but no retry can mend it
    assert _started(events) == {"big": 1}
    assert not [e for e in events if e.type == "step.retrying"]


def test_a_setting_error_fails_the_step_without_retries(run_in_mode: Runner) -> None:
    info, events = run_in_mode(wp.misconfigured, {})
    assert info.status.value == "failed"
    assert "failed after 1 attempt: ConfigError: MODEL_PATH is not set" in (info.error or "")
    assert info.step("load_model").attempt == 1  # retries=2, but no retry can mend it
    assert not [e for e in events if e.type == "step.retrying"]


_graphs = st.integers(min_value=1, max_value=25).flatmap(
    lambda n: st.lists(
        st.lists(st.integers(min_value=0, max_value=max(0, n - 1)), max_size=3),
        min_size=n,
        max_size=n,
    )
)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_spawned_dags_run_every_step_once_after_its_dependencies(
    run_in_mode: Runner, concurrency: int
) -> None:
    """Property, in both modes, with one step at a time or several: for any DAG spawned at
    run time (key dependencies on earlier nodes, and with or without a step waiting for
    every node by name), every step runs exactly once and starts only after everything it
    depends on finished."""

    @given(raw=_graphs, with_gather=st.booleans())
    @fuzz_settings(
        max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(raw: list[list[int]], with_gather: bool) -> None:
        deps = [sorted({d for d in ds if d < i}) for i, ds in enumerate(raw)]
        pipeline = wp.dag if with_gather else wp.dag_bare
        info, events = run_in_mode(pipeline, {"deps": deps}, concurrency=concurrency)
        assert info.status.value == "completed", info.error
        assert set(_started(events).values()) == {1}
        steps = {s.key: s for s in info.steps}
        assert len(steps) == len(deps) + (2 if with_gather else 1)
        nodes = {s.params["i"]: s for s in info.steps if s.name == "node"}
        assert sorted(nodes) == list(range(len(deps)))
        for i, ds in enumerate(deps):
            for d in ds:
                assert nodes[d].finished_at <= nodes[i].started_at, (i, d)  # type: ignore[operator]
        if with_gather:
            last_node = max(s.finished_at or 0 for s in nodes.values())
            assert last_node <= (steps["gather"].started_at or 0)

    check()


FINAL = ("execution.completed", "execution.failed", "execution.cancelled", "execution.interrupted")


def _statuses(info: ExecutionInfo) -> dict[str, str]:
    return {s.key: s.status.value for s in info.steps}


def test_spawning_an_existing_key_is_idempotent(run_in_mode: Runner) -> None:
    info, events = run_in_mode(wp.dupes, {})
    assert info.status.value == "completed", info.error
    assert len(info.data["keys"]) == 1
    work = info.data["keys"][0]
    assert [s.name for s in info.steps] == ["start", "work"]
    assert run_in_mode.notes("runs.log") == [work]  # ran once
    assert _started(events) == {"start": 1, work: 1}
    assert [e.step_key for e in events if e.type == "step.spawned"] == [work]


def test_spawned_steps_keep_their_dependencies_spawner_and_weight(run_in_mode: Runner) -> None:
    """The issue's example: scan spawns a copy and a render per file; each render waits for
    scan (declared) and its copy (given to the spawn), in that order, records who spawned it
    and its weight, and starts after both finished. Every step runs once."""
    files = ["a.mp4", "b.mp4", "c.mp4"]
    info, events = run_in_mode(wp.sd_import, {"files": files})
    assert info.status.value == "completed", info.error
    assert info.progress == 100.0
    assert info.data == {
        "count": 3,
        **{f"copied:{f}": True for f in files},
        **{f"rendered:{f}": True for f in files},
    }
    assert len(info.steps) == 7
    assert set(_started(events).values()) == {1} and len(_started(events)) == 7
    steps = {s.key: s for s in info.steps}
    for f in files:
        copy = steps[step_key("copy", {"path": f})]
        render = steps[step_key("render", {"path": f})]
        assert render.depends_on == ["scan", copy.key]
        assert copy.depends_on == []
        assert render.spawned_by == "scan" and copy.spawned_by == "scan"
        assert render.weight == 5.0 and copy.weight == 1.0
        assert render.started_at is not None and copy.finished_at is not None
        assert render.started_at >= copy.finished_at
        assert render.started_at >= steps["scan"].finished_at  # type: ignore[operator]


def test_retries_with_backoff_then_success(run_in_mode: Runner) -> None:
    """flaky fails twice with retry_delay=0.05, then passes: each wait is at least the
    delay, the second about twice the first (exponential, 10% jitter each)."""
    info, events = run_in_mode(wp.backoff, {}, retry_max_delay=10)
    assert info.status.value == "completed", info.error
    step = info.step("flaky")
    assert (step.status.value, step.attempt, step.failures) == ("completed", 3, 2)
    assert info.data == {"attempt": 3}
    assert info.errors == {}  # a step that passed in the end keeps no error
    retrying = [e for e in events if e.type == "step.retrying"]
    assert [e.data["error"] for e in retrying] == [
        "ConnectionError: try 1",
        "ConnectionError: try 2",
    ]
    assert [e.data["attempt"] for e in retrying] == [1, 2]
    assert 0.045 <= retrying[0].data["delay"] <= 0.055
    assert 0.09 <= retrying[1].data["delay"] <= 0.11
    began = [float(t) for t in run_in_mode.notes("attempts.log")]
    assert len(began) == 3
    first, second = began[1] - began[0], began[2] - began[1]
    assert first >= retrying[0].data["delay"] and second >= retrying[1].data["delay"]
    assert first < 5 and second < 5


def test_step_errors_name_pipeline_step_and_cause(run_in_mode: Runner) -> None:
    """An output that cannot be stored fails the execution with an error naming the
    pipeline, the step and the cause (what wait() raises says it too), and is not retried
    (retries=3)."""

    async def run(engine: JobEngine) -> ExecutionFailedError:
        execution_id = await engine.submit(wp.junk, run_in_mode.inputs())
        with pytest.raises(ExecutionFailedError) as failed:
            await engine.wait(execution_id)
        return failed.value

    err = run_in_mode.session(run)
    assert "of pipeline 'wk_junk' failed: pipeline 'wk_junk', step 'returns_junk'" in str(err)
    assert "not JSON-serialisable (key 'frame': object)" in err.errors["returns_junk"]
    assert err.status == "failed"
    info = run_in_mode.session(lambda engine: engine.wait(err.execution_id, raise_on_failure=False))
    assert (info.error or "").startswith(
        "pipeline 'wk_junk', step 'returns_junk' failed after 1 attempt: StepOutputError: "
        "pipeline 'wk_junk', step 'returns_junk'"
    ), info.error
    events = run_in_mode.events(info.id)
    assert _started(events) == {"returns_junk": 1}
    assert not [e for e in events if e.type == "step.retrying"]


@pytest.mark.parametrize(
    ("case", "kind", "says"),
    [
        ("step", "UnknownStepError", "spawn_step names unknown step 'missing'"),
        (
            "key",
            "UnknownDependencyError",
            "spawn_step('work') depends on 'work:0000', which is no step of this execution",
        ),
        (
            "name",
            "UnknownDependencyError",
            "spawn_step('work') depends on 'ghost', which is no step of this pipeline",
        ),
        ("params", "StepParamsError", "missing parameter(s) n; unexpected parameter(s) m"),
        ("json", "StepParamsError", "params.n: is a set, which is not JSON"),
        ("cycle", "PipelineCycleError", "would wait for tail, which waits for every 'work' step"),
    ],
)
def test_spawn_errors_name_what_is_wrong(
    run_in_mode: Runner, case: str, kind: str, says: str
) -> None:
    """Each spawn error alone: the spawning step fails at once (not retried, though it has
    retries=2) with the error's type, the pipeline, the step and what is wrong; nothing
    is spawned."""
    info, events = run_in_mode(wp.spawner, {"case": case})
    assert info.status.value == "failed"
    error = info.errors["start"]
    assert error.startswith(f"{kind}: pipeline 'wk_spawner', step 'start'"), error
    assert says in error.splitlines()[0], error
    assert (info.error or "").startswith(
        f"pipeline 'wk_spawner', step 'start' failed after 1 attempt: {kind}: "
    ), info.error
    assert _started(events) == {"start": 1}
    assert not [e for e in events if e.type in ("step.retrying", "step.spawned")]
    assert {s.name for s in info.steps} == {"start", "tail"}


def test_weighted_progress_events_are_persisted_and_published(run_in_mode: Runner) -> None:
    """light (weight 1) then heavy (weight 3), which reports 50%: the stored report says the
    execution is (1*100 + 3*50) / 4 = 62.5% done, each completion says how far the execution
    got, and a subscriber sees the committed events in their stored order."""

    async def watch(engine: JobEngine) -> tuple[ExecutionInfo, list[Event]]:
        execution_id = await engine.submit(wp.weights, run_in_mode.inputs())
        received: list[Event] = []
        async with engine.bus.subscribe(execution_id) as sub:
            waiting = asyncio.create_task(engine.wait(execution_id))  # workers: polls
            async for event in sub:
                received.append(event)
                if event.type in FINAL:
                    break
            return await waiting, received

    info, received = run_in_mode.session(watch)
    stored = run_in_mode.events(info.id)
    progress = [e for e in stored if e.type == "step.progress"]
    assert len(progress) == 1
    assert progress[0].step_key == "heavy"
    assert progress[0].data["progress"] == 50 and progress[0].data["message"] == "half way"
    assert progress[0].data["execution_progress"] == pytest.approx((1 * 100 + 3 * 50) / 4)
    completed = [
        (e.step_key, e.data["execution_progress"]) for e in stored if e.type == "step.completed"
    ]
    assert completed == [("light", pytest.approx(25.0)), ("heavy", pytest.approx(100.0))]
    assert info.progress == 100.0
    types = [e.type for e in stored]
    assert types[:2] == ["execution.created", "execution.started"]
    assert types[-1] == "execution.completed"
    assert types.count("step.started") == 2 and types.count("step.completed") == 2
    ids = [e.id for e in stored]
    assert ids == sorted(ids)
    # the subscriber saw the same committed events (after it subscribed), in order
    assert received and [e.id for e in received] == [i for i in ids if i >= received[0].id]
    assert received[-1].type == "execution.completed"


@pytest.mark.parametrize("fail", [False, True], ids=["completes", "fails"])
def test_a_steps_last_progress_report_is_kept(run_in_mode: Runner, fail: bool) -> None:
    """A step reports three times and ends at once, before the engine or its worker commits:
    the reports in between may be coalesced, but the last one is stored on the step and
    published before the step's end, whether it completed or failed."""
    info, events = run_in_mode(wp.last_word, {"fail": fail})
    assert info.status.value == ("failed" if fail else "completed"), info.error
    step = info.step("chatty")
    assert step.message == "copied 12 files, 3 skipped"
    types = [e.type for e in events if e.step_key == "chatty"]
    reports = [e for e in events if e.type == "step.progress"]
    assert reports, types
    assert reports[-1].data["message"] == "copied 12 files, 3 skipped"
    assert reports[-1].data["progress"] == 90
    end = "step.failed" if fail else "step.completed"
    assert types.index(end) > max(i for i, t in enumerate(types) if t == "step.progress"), types


def test_name_dependency_waits_for_every_instance_even_nested(run_in_mode: Runner) -> None:
    """join waits for every leaf: the 20 fan spawns and the 3 that leaves spawn."""
    info, events = run_in_mode(wp.fan, {})
    assert info.status.value == "completed", info.error
    assert info.data["leaves"] == 23
    order = run_in_mode.notes("order.log")
    assert order[-1] == "join" and len(order) == 24 and len(set(order)) == 24
    steps = {s.key: s for s in info.steps}
    leaves = [s for s in info.steps if s.name == "leaf"]
    assert len(leaves) == 23
    assert all((s.finished_at or 0) <= (steps["join"].started_at or 0) for s in leaves)
    assert set(_started(events).values()) == {1}


def test_cancel_stops_running_and_pending_steps(run_in_mode: Runner) -> None:
    """Cancelling while long runs: long stops at its next progress report and later never
    starts, both end cancelled; a retry of the cancelled execution runs long again."""

    async def cancel(engine: JobEngine) -> tuple[ExecutionInfo, ExecutionInfo]:
        execution_id = await engine.submit(wp.cancellable, run_in_mode.inputs())
        await until(engine, execution_id, "step.progress", "long")  # its loop runs
        await engine.cancel(execution_id)
        assert (await engine.wait(execution_id, raise_on_failure=False)).status.value == "cancelled"
        await until(engine, execution_id, "step.cancelled", "long")  # stopped, not finished
        cancelled = await asyncio.to_thread(get_execution, engine.store, execution_id)
        assert await engine.retry(execution_id) == execution_id
        await until(engine, execution_id, "step.started", "long", attempt=2)
        await engine.cancel(execution_id)
        await engine.wait(execution_id, raise_on_failure=False)
        await until(engine, execution_id, "step.cancelled", "long", attempt=2)
        return cancelled, await asyncio.to_thread(get_execution, engine.store, execution_id)

    cancelled, again = run_in_mode.session(cancel)
    assert cancelled.status.value == "cancelled"
    assert cancelled.error == "cancelled by request"
    assert _statuses(cancelled) == {"long": "cancelled", "later": "cancelled"}
    assert cancelled.step("long").attempt == 1
    events = run_in_mode.events(cancelled.id)
    assert [
        e.data["attempt"] for e in events if e.type == "step.cancelled" and e.step_key == "long"
    ] == [1, 2]
    assert "later" not in _started(events)
    for e in events:
        if e.type == "execution.cancelled":
            assert set(e.data) == PAYLOADS["execution.failed"], e
        elif e.type == "step.cancelled":
            assert set(e.data) == {"attempt"}, e
    assert [e.type for e in events].count("execution.cancelled") == 2
    assert again.status.value == "cancelled" and again.runs == 2
    assert _statuses(again) == {"long": "cancelled", "later": "cancelled"}


def test_a_cancelled_execution_runs_nothing_once_wait_returns(run_in_mode: Runner) -> None:
    """When wait() says cancelled, no step of the execution runs any more: every step is
    cancelled, and a retry at once starts long again as a new attempt. (Workers used to
    report the execution cancelled while long still ran, and a retry adopted that attempt.)"""

    async def cancel(engine: JobEngine) -> tuple[ExecutionInfo, Event]:
        execution_id = await engine.submit(wp.cancellable, run_in_mode.inputs())
        await until(engine, execution_id, "step.progress", "long")
        await engine.cancel(execution_id)
        cancelled = await engine.wait(execution_id, raise_on_failure=False)
        assert cancelled.status.value == "cancelled"
        assert _statuses(cancelled) == {"long": "cancelled", "later": "cancelled"}
        await engine.retry(execution_id)
        restarted = await until(engine, execution_id, "step.started", "long", attempt=2, within=10)
        await engine.cancel(execution_id)
        await engine.wait(execution_id, raise_on_failure=False)
        return restarted

    assert run_in_mode.session(cancel).data["attempt"] == 2


def test_cancel_from_another_process_through_the_store(run_in_mode: Runner) -> None:
    """What ``framepipe jobs cancel`` does, through a store connection of its own: the
    engine (embedded, within its heartbeat) or the worker (at its next lease renewal) sees
    the request and stops the running step; the pending one never starts."""

    async def cancel(engine: JobEngine) -> tuple[ExecutionInfo, list[Event]]:
        execution_id = await engine.submit(wp.cancellable, run_in_mode.inputs())
        await until(engine, execution_id, "step.progress", "long")

        def from_elsewhere() -> list[Event]:
            with StateStore(run_in_mode.settings.resolved_database_url) as other:
                return request_cancel(other, execution_id[:10])

        committed = await asyncio.to_thread(from_elsewhere)
        assert (await engine.wait(execution_id, raise_on_failure=False)).status.value == "cancelled"
        await until(engine, execution_id, "step.cancelled", "long")
        info = await asyncio.to_thread(get_execution, engine.store, execution_id)
        return info, committed

    info, committed = run_in_mode.session(cancel)
    assert info.status.value == "cancelled"
    assert _statuses(info) == {"long": "cancelled", "later": "cancelled"}
    events = run_in_mode.events(info.id)
    assert "later" not in _started(events)
    # what it returns is what it committed (embedded: nothing, the engine stops the run)
    assert {e.type for e in committed} <= {"execution.cancelled"}
    assert [e.id for e in committed] == [e.id for e in events if e.id in {c.id for c in committed}]
    if run_in_mode.embedded:
        assert committed == []


def test_fail_fast_lets_running_steps_finish_and_keep_their_results(run_in_mode: Runner) -> None:
    """boom fails while slowpoke runs: nothing new starts (after_slow, though slowpoke
    completes), slowpoke finishes and its output is kept, and the execution is reported
    failed only then."""
    info, events = run_in_mode(wp.failfast, {})
    assert info.status.value == "failed"
    assert (info.error or "").startswith(
        "pipeline 'wk_failfast', step 'boom' failed after 1 attempt: RuntimeError: boom"
    )
    assert _statuses(info) == {"slowpoke": "completed", "boom": "failed", "after_slow": "pending"}
    assert info.data == {"slow": True}
    assert _started(events) == {"slowpoke": 1, "boom": 1}
    types = [(e.type, e.step_key) for e in events]
    assert types.index(("step.failed", "boom")) < types.index(("step.completed", "slowpoke"))
    assert types[-1] == ("execution.failed", None)


def test_failure_is_fast_and_retry_resumes_without_rerunning(run_in_mode: Runner) -> None:
    """breaks fails twice (retries=1): the execution fails with an error naming the
    pipeline, the step, the attempts and the cause, and after never starts. Once the cause is
    fixed, a retry runs breaks with a fresh budget and then after; first is not run again."""
    failed, _ = run_in_mode(wp.resume, {})
    assert failed.status.value == "failed"
    assert (failed.error or "").startswith(
        "pipeline 'wk_resume', step 'breaks' failed after 2 attempts: ValueError: disk full"
    )
    assert "ValueError: disk full" in failed.errors["breaks"]
    assert failed.step("breaks").status.value == "failed"
    assert failed.step("first").status.value == "completed"
    assert failed.step("after").status.value == "pending"
    (run_in_mode.dir / "fixed").write_text("ok")
    done, _ = run_in_mode.retry(failed, wp.resume)
    assert done.status.value == "completed", done.error
    assert done.runs == 2
    assert done.data == {"first": 1, "breaks": 1, "after": 2}
    breaks = done.step("breaks")  # attempts go on counting; the failures start afresh
    assert (breaks.attempt, breaks.failures, breaks.error) == (3, 0, None)
    assert done.errors == {}
    runs = Counter(run_in_mode.notes("runs.log"))
    assert runs["first"] == 1  # completed steps are not run again
    assert runs["breaks"] == 3 and runs["after"] == 1


def test_a_retry_checks_the_pipeline_it_is_given_and_stores_its_reference(
    run_in_mode: Runner,
) -> None:
    """A pipeline given to a retry (the code moved) must bear the execution's pipeline name and
    define every step it has; a refusal leaves the execution as it was. Accepted, the reference
    given with it is stored with the execution (where workers load it from), in both modes."""
    failed, _ = run_in_mode(wp.resume, {})
    assert failed.status.value == "failed"
    shrunk = Pipeline("wk_resume")  # the same name, and no step "breaks" any more
    shrunk.step("first")(wp.resume_first)

    async def refused(engine: JobEngine) -> ExecutionInfo:
        with pytest.raises(ExecutionStateError, match="is of pipeline 'wk_resume', not 'wk_dupes'"):
            await engine.retry(failed.id, wp.dupes)
        with pytest.raises(UnknownStepError, match="has step 'breaks', which the pipeline no"):
            await engine.retry(failed.id, shrunk)
        with pytest.raises(InvalidInputError, match="ref: a pipeline reference needs the pipeline"):
            await engine.retry(failed.id, ref="worker_pipelines:resume")
        return await asyncio.to_thread(get_execution, engine.store, failed.id)

    unchanged = run_in_mode.session(refused)
    assert (unchanged.status.value, unchanged.runs) == ("failed", 1)
    assert unchanged.pipeline_ref == wp.resume.ref

    (run_in_mode.dir / "fixed").write_text("ok")
    moved = "worker_pipelines:resume"  # another spelling of where it is, as a move would give

    async def again(engine: JobEngine) -> ExecutionInfo:
        execution_id = await engine.retry(failed.id[:8], wp.resume, ref=moved)
        return await engine.wait(execution_id, raise_on_failure=False)

    done = run_in_mode.session(again)
    assert (done.status.value, done.runs, done.pipeline_ref) == ("completed", 2, moved)


@pytest.mark.slow
def test_an_execution_on_workers_is_not_resumed_with_a_pipeline_they_cannot_load(
    request: pytest.FixtureRequest, database_url: str, tmp_path: Path
) -> None:
    """A pipeline with no reference (defined interactively) cannot be loaded by the workers:
    a retry on workers given one is refused with the reason, and the execution is not resumed."""
    mode = Mode("workers", tmp_path, database_url, request.getfixturevalue("cluster_factory"))
    failed, _ = mode(wp.resume, {})
    interactive = copy.copy(wp.resume)  # its steps, and no module or file to load it from
    interactive.module_ref = None

    async def refused(engine: JobEngine) -> ExecutionInfo:
        with pytest.raises(PipelineDefinitionError, match="workers load a pipeline by reference"):
            await engine.retry(failed.id, interactive)
        return await asyncio.to_thread(get_execution, engine.store, failed.id)

    unchanged = mode.session(refused)
    assert (unchanged.status.value, unchanged.runs) == ("failed", 1)


def test_retry_of_a_completed_execution_is_refused(run_in_mode: Runner) -> None:
    info, _ = run_in_mode(wp.dupes, {})
    assert info.status.value == "completed"

    async def again(engine: JobEngine) -> None:
        with pytest.raises(
            ExecutionStateError,
            match=f"execution {info.id[:12]} of pipeline 'wk_dupes' has "
            "completed; nothing to retry",
        ):
            await engine.retry(info.id, wp.dupes)

    run_in_mode.session(again)


def test_ledger_imports_only_new_files_and_only_on_success(
    run_in_mode: Runner, tmp_path: Path
) -> None:
    card = tmp_path / "card"
    card.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (card / name).write_bytes(name.encode() * 100)
    first, _ = run_in_mode(wp.importer, {"card": str(card)})
    second, _ = run_in_mode(wp.importer, {"card": str(card)})
    (card / "d.mp4").write_bytes(b"new")
    # z_bad.mp4 fails while d.mp4 is being copied: fail-fast lets that running copy finish
    (card / "z_bad.mp4").write_bytes(b"broken")
    third, _ = run_in_mode(wp.importer, {"card": str(card)})

    async def kept(engine: JobEngine) -> tuple[list[Any], list[str]]:
        entries = await asyncio.to_thread(Ledger(engine.store, "wk_importer").entries)
        return entries, [o.key for o in engine.objects.list("imports/")]

    entries, stored = run_in_mode.session(kept)
    assert first.status.value == "completed" and second.status.value == "completed"
    assert first.data["new"] == 3 and second.data["new"] == 0
    assert third.data["new"] == 2 and third.status.value == "failed"
    assert "OSError: card removed" in (third.error or "")
    assert sorted(run_in_mode.notes("copied.log")) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    names = sorted(e.meta["name"] for e in entries)
    assert names == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]  # z_bad.mp4 failed: not imported
    assert all(e.execution_id and e.step_key and e.step_key.startswith("copy:") for e in entries)
    assert stored == ["imports/a.mp4", "imports/b.mp4", "imports/c.mp4", "imports/d.mp4"]


def test_tempdirs_are_removed_after_success_and_failure(run_in_mode: Runner) -> None:
    info, _ = run_in_mode(wp.temps, {})
    assert info.status.value == "failed"
    assert "RuntimeError: boom" in info.errors["fails"]
    made = [Path(p) for p in run_in_mode.notes("tempdirs.log")]
    assert len(made) == 2 and not any(d.exists() for d in made)


@pytest.mark.parametrize("case", ["name", "key"])
def test_an_execution_where_no_step_can_run_any_more_fails(run_in_mode: Runner, case: str) -> None:
    """Waits that can never end (see wk_stuck): once the steps that can run have run, the
    execution fails, naming what each stuck step waits for, instead of hanging."""
    info, events = run_in_mode(wp.stuck, {"case": case})
    assert info.status.value == "failed"
    hold, blocked, free = info.data["hold"], info.data["blocked"], info.data["free"]
    waits = "tail" if case == "name" else "part"
    assert info.error == (
        "pipeline 'wk_stuck': no step can run any more (3 waiting: tail waits for part; "
        f"{hold} waits for {waits}; {blocked} waits for {hold})"
    )
    assert _statuses(info) == {
        "start": "completed",
        "tail": "pending",
        hold: "pending",
        blocked: "pending",
        free: "completed",
    }
    assert _started(events) == {"start": 1, free: 1}
    assert [e.type for e in events if e.type.startswith("execution.")] == [
        "execution.created",
        "execution.started",
        "execution.failed",
    ]


def test_the_final_event_says_how_far_the_execution_got(run_in_mode: Runner) -> None:
    """The execution's last event carries the progress it ended at: the stored one, which
    the last step.completed announced (start and part 0 of 5 equal steps: 40%)."""
    info, events = run_in_mode(wp.stuck, {"case": "key"})
    assert info.status.value == "failed" and info.progress == 40.0
    completed = [e.data["execution_progress"] for e in events if e.type == "step.completed"]
    assert completed == [20.0, 40.0]
    assert events[-1].type == "execution.failed"
    assert events[-1].data["progress"] == info.progress


PAYLOADS: dict[str, set[str]] = {
    "execution.created": {"pipeline", "inputs"},
    "execution.started": {"run"},
    "execution.retried": {"run"},
    "execution.completed": {"error", "progress", "steps", "duration"},
    "execution.failed": {"error", "progress", "steps", "duration"},
    "step.spawned": {"name", "params", "depends_on", "spawned_by"},
    "step.started": {"attempt"},
    "step.progress": {"progress", "message", "execution_progress"},
    "step.retrying": {"attempt", "error", "delay"},
    "step.failed": {"attempt", "error", "traceback"},
    "step.completed": {"attempt", "duration", "execution_progress"},
}
"""What each event's data holds in both modes; workers add which worker ran a step
(step.started) and the mode (execution.started, execution.retried)."""
WORKERS_ADD = {"worker", "mode"}


def test_events_carry_the_same_data_in_both_modes(run_in_mode: Runner) -> None:
    """Every kind of event of a run that spawns, reports progress, retries, fails and is
    resumed to completion carries the same fields in both modes."""
    spawned, spawning = run_in_mode(wp.sd_import, {"files": ["a.mp4"]})
    weighed, weighing = run_in_mode(wp.weights, {})
    failed, _ = run_in_mode(wp.resume, {})
    (run_in_mode.dir / "fixed").write_text("ok")
    done, resumed = run_in_mode.retry(failed, wp.resume)
    assert {spawned.status.value, weighed.status.value, done.status.value} == {"completed"}
    events = spawning + weighing + resumed
    assert {e.type for e in events} == set(PAYLOADS)
    for e in events:
        extra = set() if run_in_mode.embedded else WORKERS_ADD
        assert PAYLOADS[e.type] <= set(e.data) <= PAYLOADS[e.type] | extra, e


def test_large_inputs_stay_on_the_execution_and_out_of_its_created_event(
    run_in_mode: Runner,
) -> None:
    """execution.created goes to every live subscriber and events page: inputs over 16 KiB of
    JSON are left out of it (with their size), small ones carried; the execution keeps both."""
    files = [f"DCIM/100GOPRO/GX{n:06d}.MP4" for n in range(1000)]  # a card's file list
    big, big_events = run_in_mode(wp.dupes, {"files": files})
    small, small_events = run_in_mode(wp.dupes, {"files": files[:2]})
    assert big.status.value == small.status.value == "completed"
    (created,) = [e for e in big_events if e.type == "execution.created"]
    assert created.data["inputs"] is None
    assert created.data["inputs_bytes"] > 16 * 1024
    assert created.data["pipeline"] == "wk_dupes"
    assert big.inputs["files"] == files
    (created,) = [e for e in small_events if e.type == "execution.created"]
    assert created.data["inputs"]["files"] == files[:2] and "inputs_bytes" not in created.data


def test_a_completed_step_says_how_long_it_took(run_in_mode: Runner) -> None:
    info, events = run_in_mode(wp.failfast, {})
    slowpoke = info.step("slowpoke")
    completed = [e for e in events if e.type == "step.completed"]
    assert [e.step_key for e in completed] == ["slowpoke"]
    assert completed[0].data["duration"] == pytest.approx(
        (slowpoke.finished_at or 0) - (slowpoke.started_at or 0), abs=0.05
    )
    assert completed[0].data["duration"] >= 0.5  # it sleeps 0.5 s


def test_an_error_whose_message_cannot_be_read_still_fails_the_step_clearly(
    run_in_mode: Runner,
) -> None:
    """A step raising an exception whose ``str()`` itself raises is retried and then fails
    like any other, its error named by type; the scheduler neither dies nor hangs."""
    info, events = run_in_mode(wp.unprintable, {})
    assert info.status.value == "failed"
    assert _started(events) == {"shout": 2}
    assert (info.error or "").endswith(
        "failed after 2 attempts: Unprintable: <its message could not be read: RuntimeError>"
    )


def test_the_execution_progress_events_announce_never_goes_back(run_in_mode: Runner) -> None:
    """Two steps climbing side by side, their reports coalesced per step between commits:
    the events carry the execution's progress in the order it was reached, so a browser
    following them never sees the bar go back."""
    info, events = run_in_mode(wp.lockstep, {})
    assert info.status.value == "completed"
    seen = [e.data["execution_progress"] for e in events if "execution_progress" in e.data]
    assert len(seen) > 4
    assert seen == sorted(seen), seen


def test_on_submit_pins_what_the_steps_see_and_its_refusal_stores_nothing(
    run_in_mode: Runner,
) -> None:
    """A pipeline's ``on_submit`` runs at the submit, in both modes, with the object store:
    what it returns is what is stored and what every step reads; what it raises refuses the
    submit before anything is stored."""

    async def put(engine: JobEngine) -> str | None:
        return (await asyncio.to_thread(engine.objects.put, "clips/a.mp4", b"first")).version

    version = run_in_mode.session(put)
    assert version
    info, _ = run_in_mode(wp.pinned, {"clip": "clips/a.mp4"})
    assert info.status.value == "completed"
    assert info.data == {"clip": "clips/a.mp4", "version": version}
    assert info.inputs["clip_version"] == version

    async def refused(engine: JobEngine) -> list[Any]:
        with pytest.raises(InvalidInputError, match=r"no clip 'clips/b\.mp4' to pin"):
            await engine.submit(wp.pinned, run_in_mode.inputs(clip="clips/b.mp4"))
        return await asyncio.to_thread(list_executions, engine.store, pipeline="wk_pinned")

    assert [x.id for x, _done, _total in run_in_mode.session(refused)] == [info.id]
