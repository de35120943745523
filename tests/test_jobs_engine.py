"""What only the embedded engine has, on each state backend (SQLite file and PostgreSQL): the
issue's example as written (closures), refusal of an invalid pipeline before anything is
stored, a scheduler that blocking steps do not block, and stopping the in-process engine.
The job semantics shared with the workers are tested in both modes by test_jobs_modes.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from framepipe import (
    ExecutionStatus,
    JobEngine,
    Pipeline,
    Settings,
    StepContext,
    StepStatus,
)
from framepipe.backends.state import StateStore, executions
from framepipe.errors import (
    PipelineCycleError,
    UnknownDependencyError,
    UnknownStepError,
)
from framepipe.jobs.control import request_cancel
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.records import get_execution

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def sd_import_pipeline(calls: Counter[str]) -> Pipeline:
    """The issue's example, counting how often each step key runs."""
    pipeline = Pipeline("sd_import")

    @pipeline.step()
    def scan(ctx: StepContext) -> dict[str, Any]:
        calls[ctx.step_key] += 1
        files = ctx.inputs["files"]
        for f in files:
            copied = ctx.spawn_step("copy", params={"path": f})
            ctx.spawn_step("render", params={"path": f}, depends_on=[copied])
        return {"count": len(files)}

    @pipeline.step(retries=3)
    def copy(ctx: StepContext, path: str) -> dict[str, Any]:
        calls[ctx.step_key] += 1
        ctx.progress(50, f"copying {path}")
        return {f"copied:{path}": True}

    @pipeline.step(depends_on=["scan"], weight=5)
    def render(ctx: StepContext, path: str) -> dict[str, Any]:
        calls[ctx.step_key] += 1
        assert ctx.data[f"copied:{path}"] is True
        assert ctx.data["count"] == len(ctx.inputs["files"])
        return {f"rendered:{path}": True}

    return pipeline


def test_issue_example_runs_as_written(settings: Settings) -> None:
    calls: Counter[str] = Counter()
    pipeline = sd_import_pipeline(calls)
    files = ["a.mp4", "b.mp4", "c.mp4"]

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline, {"files": files})

    info = run(main())
    assert info.status is ExecutionStatus.COMPLETED
    assert info.progress == 100.0
    assert info.data == {
        "count": 3,
        **{f"copied:{f}": True for f in files},
        **{f"rendered:{f}": True for f in files},
    }
    assert len(info.steps) == 7
    assert all(n == 1 for n in calls.values()) and len(calls) == 7
    steps = {s.key: s for s in info.steps}
    for f in files:
        copy = steps[f"copy:{step_key_of('copy', f)}"]
        render = steps[f"render:{step_key_of('render', f)}"]
        assert render.depends_on == ["scan", copy.key]
        assert render.spawned_by == "scan" and copy.spawned_by == "scan"
        assert render.started_at is not None and copy.finished_at is not None
        assert render.started_at >= copy.finished_at
        assert render.started_at >= steps["scan"].finished_at  # type: ignore[operator]
        assert render.weight == 5.0


def step_key_of(name: str, path: str) -> str:
    from framepipe import step_key

    return step_key(name, {"path": path}).split(":")[1]


def test_invalid_pipeline_is_refused_before_anything_is_stored(settings: Settings) -> None:
    pipeline = Pipeline("cyclic")

    @pipeline.step(depends_on=["b"])
    def a(ctx: StepContext) -> None: ...

    @pipeline.step(depends_on=["a"])
    def b(ctx: StepContext) -> None: ...

    other = Pipeline("dangling")

    @other.step(depends_on=["ghost"])
    def c(ctx: StepContext) -> None: ...

    async def main() -> list[Any]:
        async with JobEngine(settings=settings) as engine:
            with pytest.raises(PipelineCycleError, match="pipeline 'cyclic'"):
                await engine.submit(pipeline)
            with pytest.raises(UnknownDependencyError, match="pipeline 'dangling', step 'c'"):
                await engine.submit(other)
            from framepipe.jobs.records import list_executions

            return await asyncio.to_thread(list_executions, engine.store)

    assert run(main()) == []


def test_blocking_steps_do_not_block_the_scheduler(settings: Settings) -> None:
    pipeline = Pipeline("blocking")
    release = threading.Event()

    @pipeline.step()
    def slow(ctx: StepContext) -> dict[str, Any]:
        assert release.wait(30), "the chain never ran while this step blocked"
        return {"slow_done": time.time()}

    @pipeline.step()
    def chain(ctx: StepContext) -> None:
        ctx.spawn_step("link", {"i": 0}, depends_on=[ctx.step_key])

    @pipeline.step()
    def link(ctx: StepContext, i: int) -> dict[str, Any]:
        if i < 5:
            ctx.spawn_step("link", {"i": i + 1}, depends_on=[ctx.step_key])
        else:
            release.set()
        return {f"link{i}": time.time()}

    @pipeline.step()
    async def async_step(ctx: StepContext) -> dict[str, Any]:
        await asyncio.sleep(0.01)
        ctx.progress(100)
        return {"async": True}

    async def main() -> Any:
        async with JobEngine(settings=settings, concurrency=3) as engine:
            return await engine.run(pipeline)

    info = run(main())
    assert info.data["async"] is True
    assert info.data["link5"] <= info.data["slow_done"]


def test_stop_interrupts_and_retry_resumes(settings: Settings) -> None:
    pipeline = Pipeline("interruptible")
    started = threading.Event()
    runs: Counter[str] = Counter()

    @pipeline.step()
    def done_first(ctx: StepContext) -> None:
        runs["done_first"] += 1

    @pipeline.step(depends_on=["done_first"])
    def long(ctx: StepContext) -> None:
        runs["long"] += 1
        started.set()
        while runs["long"] == 1:
            ctx.progress(10)
            time.sleep(0.01)

    async def first_run() -> str:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(pipeline)
            await asyncio.to_thread(started.wait, 10)
        return execution_id

    execution_id = run(first_run())

    async def second_run() -> tuple[Any, Any]:
        async with JobEngine(settings=settings) as engine:
            before = await asyncio.to_thread(get_execution, engine.store, execution_id)
            await engine.retry(execution_id, pipeline)
            return before, await engine.wait(execution_id)

    before, after = run(second_run())
    assert before.status is ExecutionStatus.INTERRUPTED
    assert before.step("long").status is StepStatus.PENDING
    assert after.status is ExecutionStatus.COMPLETED
    assert runs == {"done_first": 1, "long": 2}


def _changed_pipelines() -> tuple[Pipeline, Pipeline]:
    """A pipeline whose step fails, and its next version, where that step is renamed."""
    v1 = Pipeline("changed")

    @v1.step()
    def extract(ctx: StepContext) -> dict[str, Any]:
        return {"x": 1}

    @v1.step(depends_on=["extract"])
    def thumbs(ctx: StepContext) -> None:
        raise RuntimeError("bug in thumbs")

    v2 = Pipeline("changed")
    v2.add_step(extract)

    @v2.step(depends_on=["extract"])
    def thumbnails(ctx: StepContext) -> dict[str, Any]:
        return {"thumbs": True}

    return v1, v2


def test_a_retry_refused_because_the_pipeline_changed_leaves_the_execution_as_it_was(
    settings: Settings,
) -> None:
    """A retry with a pipeline that no longer defines one of the execution's steps is refused
    before the execution is taken over: it stays failed, with its owner, error and run
    count, and a retry with a pipeline that fits still resumes it."""
    v1, v2 = _changed_pipelines()

    async def main() -> tuple[ExecutionInfo, ExecutionInfo, ExecutionInfo]:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(v1)
            first = await engine.wait(execution_id, raise_on_failure=False)
            with pytest.raises(UnknownStepError, match="'thumbs', which the pipeline no longer"):
                await engine.retry(execution_id, v2)
            refused = await asyncio.to_thread(get_execution, engine.store, execution_id)
            await engine.retry(execution_id, v1)
            again = await asyncio.wait_for(engine.wait(execution_id, raise_on_failure=False), 30)
        return first, refused, again

    first, refused, again = run(main())
    assert first.status is ExecutionStatus.FAILED
    assert (refused.status, refused.owner, refused.error, refused.runs, refused.finished_at) == (
        first.status,
        first.owner,
        first.error,
        first.runs,
        first.finished_at,
    )
    assert again.status is ExecutionStatus.FAILED
    assert again.runs == 2


def test_a_retry_that_fails_after_the_take_over_gives_the_execution_back(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong between taking an execution over and running it again, the
    execution is left as it was, not running with nobody running it."""
    v1, _v2 = _changed_pipelines()

    def broken(*_args: Any) -> None:
        raise RuntimeError("could not build the execution")

    async def main() -> tuple[ExecutionInfo, ExecutionInfo]:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(v1)
            first = await engine.wait(execution_id, raise_on_failure=False)
            with monkeypatch.context() as patch:
                patch.setattr("framepipe.jobs.engine.ExecState", broken)
                with pytest.raises(RuntimeError, match="could not build"):
                    await engine.retry(execution_id, v1)
            return first, await asyncio.to_thread(get_execution, engine.store, execution_id)

    first, after = run(main())
    assert (after.status, after.owner, after.error, after.runs) == (
        ExecutionStatus.FAILED,
        first.owner,
        first.error,
        first.runs,
    )


def stored_row(store: StateStore, execution_id: str) -> dict[str, Any]:
    """Every column of the execution as stored."""
    with store.read() as conn:
        row = conn.execute(sa.select(executions).where(executions.c.id == execution_id))
        return dict(row.mappings().one())


def test_a_retry_given_back_keeps_a_pending_cancel_request(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An execution that failed with a cancel request its engine had not acted on yet (made
    through the store by another process while it ran) still has it pending after a retry
    that failed after the take-over, and the heartbeat it had: every stored column is as it
    was. A cancel requested while the retry held the execution (flagged for this engine) is
    not dropped either."""
    running, released = threading.Event(), threading.Event()
    pipeline = Pipeline("given_back")

    @pipeline.step(retries=0)
    def blocked(ctx: StepContext) -> None:
        if ctx.inputs.get("block"):
            running.set()
            released.wait(10)
        raise RuntimeError("failed")

    # A heartbeat too slow to see the cancel request before the step fails.
    slow = settings.model_copy(update={"heartbeat_interval": 30.0})

    def broken(*_args: Any) -> None:
        raise RuntimeError("could not build the execution")

    async def main(other: StateStore) -> list[dict[str, Any]]:
        async with JobEngine(settings=slow) as engine:
            pending = await engine.submit(pipeline, {"block": True})
            assert await asyncio.to_thread(running.wait, 10)
            assert await asyncio.to_thread(request_cancel, other, pending) == []  # flagged
            released.set()
            first = await engine.wait(pending, raise_on_failure=False)
            assert first.status is ExecutionStatus.FAILED
            before = await asyncio.to_thread(stored_row, other, pending)

            held = await engine.submit(pipeline)
            await engine.wait(held, raise_on_failure=False)
            held_before = await asyncio.to_thread(stored_row, other, held)

            def cancel_then_break(*_args: Any) -> None:
                assert request_cancel(other, held) == []  # running: flagged for this engine
                raise RuntimeError("could not build the execution")

            with monkeypatch.context() as patch:
                patch.setattr("framepipe.jobs.engine.ExecState", broken)
                with pytest.raises(RuntimeError, match="could not build"):
                    await engine.retry(pending, pipeline)
                patch.setattr("framepipe.jobs.engine.ExecState", cancel_then_break)
                with pytest.raises(RuntimeError, match="could not build"):
                    await engine.retry(held, pipeline)
            after = await asyncio.to_thread(stored_row, other, pending)
            held_after = await asyncio.to_thread(stored_row, other, held)
        return [before, after, held_before, held_after]

    with StateStore(slow.resolved_database_url) as other:
        before, after, held_before, held_after = run(main(other))
    assert before["cancel_requested"] is True
    assert after == before
    assert held_before["cancel_requested"] is False
    assert held_after == {**held_before, "cancel_requested": True}
