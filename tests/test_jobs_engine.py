"""The job engine, end to end on each state backend (SQLite file and PostgreSQL)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from framepipe import (
    Event,
    ExecutionStatus,
    JobEngine,
    Ledger,
    Pipeline,
    Settings,
    StepContext,
    StepStatus,
    file_identity,
)
from framepipe.errors import (
    ExecutionFailedError,
    ExecutionStateError,
    PipelineCycleError,
    UnknownDependencyError,
)
from framepipe.jobs.records import get_execution, list_events

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
    assert info.data == {"count": 3, **{f"copied:{f}": True for f in files},
                         **{f"rendered:{f}": True for f in files}}
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


def test_spawning_an_existing_key_is_idempotent(settings: Settings) -> None:
    pipeline = Pipeline("dupes")
    runs: Counter[str] = Counter()

    @pipeline.step()
    def start(ctx: StepContext) -> dict[str, Any]:
        keys = {ctx.spawn_step("work", {"n": 1}) for _ in range(3)}
        keys.add(ctx.spawn_step("work", params={"n": 1}))
        assert ctx.spawn_step("start") == "start"  # parameterless: its one instance
        return {"keys": sorted(keys)}

    @pipeline.step()
    def work(ctx: StepContext, n: int) -> None:
        runs[ctx.step_key] += 1

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline)

    info = run(main())
    assert len(info.data["keys"]) == 1
    assert [s.name for s in info.steps] == ["start", "work"]
    assert list(runs.values()) == [1]


def test_retries_with_backoff_then_success(settings: Settings) -> None:
    pipeline = Pipeline("flaky")
    attempts: list[float] = []

    @pipeline.step(retries=3, retry_delay=0.05)
    def flaky(ctx: StepContext) -> dict[str, Any]:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError(f"try {len(attempts)}")
        return {"attempt": ctx.attempt}

    async def main() -> Any:
        async with JobEngine(settings=settings.model_copy(update={"retry_max_delay": 10})) as e:
            info = await e.run(pipeline)
            return info, await asyncio.to_thread(list_events, e.store, info.id)

    info, events = run(main())
    step = info.step("flaky")
    assert (step.status, step.attempt, step.failures) == (StepStatus.COMPLETED, 3, 2)
    assert info.data == {"attempt": 3}
    retrying = [e for e in events if e.type == "step.retrying"]
    assert [e.data["error"] for e in retrying] == ["ConnectionError: try 1",
                                                  "ConnectionError: try 2"]
    # exponential: the second wait is about twice the first (±10 % jitter each)
    first, second = attempts[1] - attempts[0], attempts[2] - attempts[1]
    assert first >= 0.045 and second >= 0.09
    assert retrying[1].data["delay"] > retrying[0].data["delay"]


def test_failure_is_fast_and_retry_resumes_without_rerunning(settings: Settings,
                                                            tmp_path: Path) -> None:
    pipeline = Pipeline("resume")
    runs: Counter[str] = Counter()
    fixed = tmp_path / "fixed"

    @pipeline.step()
    def first(ctx: StepContext) -> dict[str, Any]:
        runs["first"] += 1
        return {"first": 1}

    @pipeline.step(depends_on=["first"], retries=1)
    def breaks(ctx: StepContext) -> dict[str, Any]:
        runs["breaks"] += 1
        if not fixed.exists():
            raise ValueError("disk full")
        return {"breaks": 1}

    @pipeline.step(depends_on=["breaks"])
    def after(ctx: StepContext) -> dict[str, Any]:
        runs["after"] += 1
        return {"after": ctx.data["first"] + ctx.data["breaks"]}

    @pipeline.step(depends_on=["first"])
    def sibling_later(ctx: StepContext) -> None:
        runs["sibling"] += 1

    async def main() -> tuple[Any, Any]:
        async with JobEngine(settings=settings, concurrency=1) as engine:
            with pytest.raises(ExecutionFailedError) as failed:
                await engine.run(pipeline)
            err = failed.value
            info = await asyncio.to_thread(get_execution, engine.store, err.execution_id)
            fixed.write_text("ok")
            await engine.retry(info.id)
            return info, await engine.wait(info.id)

    failed, done = run(main())
    assert failed.status is ExecutionStatus.FAILED
    assert "pipeline 'resume', step 'breaks' failed after 2 attempts: ValueError: disk full" \
        in failed.error
    assert failed.step("breaks").status is StepStatus.FAILED
    assert "ValueError: disk full" in failed.errors["breaks"]
    assert failed.step("first").status is StepStatus.COMPLETED
    assert failed.step("after").status is StepStatus.PENDING
    assert done.status is ExecutionStatus.COMPLETED
    assert done.runs == 2
    assert done.data == {"first": 1, "breaks": 1, "after": 2}
    assert runs["first"] == 1  # completed steps are not run again
    assert runs["breaks"] == 3 and runs["after"] == 1


def test_retry_of_completed_execution_is_refused(settings: Settings) -> None:
    pipeline = Pipeline("once")

    @pipeline.step()
    def only(ctx: StepContext) -> None: ...

    async def main() -> None:
        async with JobEngine(settings=settings) as engine:
            info = await engine.run(pipeline)
            with pytest.raises(ExecutionStateError, match="has completed"):
                await engine.retry(info.id)

    run(main())


def test_step_errors_name_pipeline_step_and_cause(settings: Settings) -> None:
    pipeline = Pipeline("bad")

    @pipeline.step(retries=3)
    def returns_junk(ctx: StepContext) -> dict[str, Any]:
        return {"ok": 1, "frame": object()}

    async def main() -> ExecutionFailedError:
        async with JobEngine(settings=settings) as engine:
            with pytest.raises(ExecutionFailedError) as err:
                await engine.run(pipeline)
            return err.value

    err = run(main())
    assert "pipeline 'bad', step 'returns_junk'" in str(err)
    assert "not JSON-serialisable (key 'frame': object)" in err.errors["returns_junk"]
    assert err.status == "failed"


def test_output_error_is_not_retried(settings: Settings) -> None:
    pipeline = Pipeline("big")

    @pipeline.step(retries=5)
    def huge(ctx: StepContext) -> dict[str, Any]:
        return {"video": "x" * 5000}

    async def main() -> Any:
        s = settings.model_copy(update={"max_step_output_bytes": 1000})
        async with JobEngine(settings=s) as engine:
            return await engine.run(pipeline, raise_on_failure=False)

    info = run(main())
    assert info.step("huge").attempt == 1
    assert "store paths, not contents" in info.errors["huge"]


def test_spawn_errors_name_what_is_wrong(settings: Settings) -> None:
    pipeline = Pipeline("spawner")

    @pipeline.step()
    def unknown_step(ctx: StepContext) -> None:
        ctx.spawn_step("missing", {"a": 1})

    @pipeline.step()
    def unknown_dep(ctx: StepContext) -> None:
        ctx.spawn_step("work", {"n": 1}, depends_on=["work:000000000000"])

    @pipeline.step()
    def wrong_params(ctx: StepContext) -> None:
        ctx.spawn_step("work", {"m": 1})

    @pipeline.step()
    def unserialisable(ctx: StepContext) -> None:
        ctx.spawn_step("work", {"n": {1, 2}})

    @pipeline.step()
    def work(ctx: StepContext, n: int) -> None: ...

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline, raise_on_failure=False)

    info = run(main())
    errors = info.errors
    assert "UnknownStepError: pipeline 'spawner', step 'unknown_step': spawn_step names " \
        "unknown step 'missing'" in errors["unknown_step"]
    assert "which is no step of this execution" in errors.get("unknown_dep", "") or \
        info.step("unknown_dep").status is StepStatus.PENDING
    assert info.status is ExecutionStatus.FAILED
    assert all(s.attempt <= 1 for s in info.steps)


def test_each_spawn_error_alone(settings: Settings) -> None:
    cases = {
        "dep": (lambda ctx: ctx.spawn_step("work", {"n": 1}, depends_on=["work:0000"]),
                "UnknownDependencyError", "which is no step of this execution"),
        "params": (lambda ctx: ctx.spawn_step("work", {"m": 1}),
                   "StepParamsError", "missing parameter(s) n; unexpected parameter(s) m"),
        "json": (lambda ctx: ctx.spawn_step("work", {"n": {1, 2}}),
                 "StepParamsError", "not JSON-serialisable"),
        "cycle": (lambda ctx: ctx.spawn_step("work", {"n": 1}, depends_on=["tail"]),
                  "PipelineCycleError", "waits for every 'work' step"),
    }
    for label, (body, kind, text) in cases.items():
        pipeline = Pipeline(f"spawn_{label}")
        pipeline.add_step(body, name="start")
        pipeline.add_step(lambda ctx, n: None, name="work")
        pipeline.add_step(lambda ctx: None, name="tail", depends_on=["work"])

        async def main(p: Pipeline = pipeline) -> Any:
            async with JobEngine(settings=settings) as engine:
                return await engine.run(p, raise_on_failure=False)

        info = run(main())
        error = info.errors["start"]
        assert error.startswith(f"{kind}: pipeline '{pipeline.name}', step 'start'"), error
        assert text in error, error


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


def test_weighted_progress_events_are_persisted_and_published(settings: Settings) -> None:
    pipeline = Pipeline("weights")
    seen_progress = threading.Event()

    @pipeline.step(weight=1)
    def light(ctx: StepContext) -> None: ...

    @pipeline.step(depends_on=["light"], weight=3)
    def heavy(ctx: StepContext) -> None:
        ctx.progress(50, "half way")
        assert seen_progress.wait(10)

    async def main() -> tuple[Any, list[Event], list[Event]]:
        async with JobEngine(settings=settings) as engine:
            def listener(event: Event) -> None:
                if event.type == "step.progress":
                    seen_progress.set()

            engine.bus.add_listener(listener)
            execution_id = await engine.submit(pipeline)
            received: list[Event] = []
            async with engine.bus.subscribe(execution_id) as sub:
                async for event in sub:
                    received.append(event)
                    if event.type.startswith("execution.") and event.type != "execution.started":
                        break
            info = await engine.wait(execution_id)
            stored = await asyncio.to_thread(list_events, engine.store, execution_id)
            return info, received, stored

    info, received, stored = run(main())
    progress = [e for e in stored if e.type == "step.progress"]
    assert len(progress) == 1
    assert progress[0].data["progress"] == 50 and progress[0].data["message"] == "half way"
    assert progress[0].data["execution_progress"] == pytest.approx((1 * 100 + 3 * 50) / 4)
    assert info.progress == 100.0
    types = [e.type for e in stored]
    assert types[:2] == ["execution.created", "execution.started"]
    assert types[-1] == "execution.completed"
    assert types.count("step.started") == 2 and types.count("step.completed") == 2
    ids = [e.id for e in stored]
    assert ids == sorted(ids)
    # the subscriber saw the same committed events (after it subscribed), in order
    assert [e.id for e in received] == [i for i in ids if i >= received[0].id]


def test_name_dependency_waits_for_every_instance_even_nested(settings: Settings) -> None:
    pipeline = Pipeline("fan")
    order: list[str] = []
    lock = threading.Lock()

    @pipeline.step()
    def fan(ctx: StepContext) -> None:
        for i in range(20):
            ctx.spawn_step("leaf", {"i": i})

    @pipeline.step()
    def leaf(ctx: StepContext, i: int) -> dict[str, Any]:
        if i < 3:
            ctx.spawn_step("leaf", {"i": 100 + i})  # spawned later, by a leaf
        time.sleep(0.001)
        with lock:
            order.append(f"leaf{i}")
        return {f"leaf{i}": True}

    @pipeline.step(depends_on=["leaf"])
    def join(ctx: StepContext) -> dict[str, Any]:
        with lock:
            order.append("join")
        return {"leaves": sum(1 for k in ctx.data if k.startswith("leaf"))}

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline)

    info = run(main())
    assert info.data["leaves"] == 23
    assert order[-1] == "join" and len(order) == 24


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


def test_cancel_stops_running_and_pending_steps(settings: Settings, tmp_path: Path) -> None:
    pipeline = Pipeline("cancellable")
    started = threading.Event()

    @pipeline.step()
    def long(ctx: StepContext) -> None:
        started.set()
        for i in range(1000):
            ctx.progress(i / 10)
            time.sleep(0.01)

    @pipeline.step(depends_on=["long"])
    def later(ctx: StepContext) -> None: ...

    async def main() -> tuple[Any, Any]:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(pipeline)
            await asyncio.to_thread(started.wait, 10)
            await engine.cancel(execution_id)
            cancelled = await engine.wait(execution_id, raise_on_failure=False)
            await engine.retry(execution_id)
            return cancelled, execution_id

    cancelled, _ = run(main())
    assert cancelled.status is ExecutionStatus.CANCELLED
    assert {s.key: s.status for s in cancelled.steps} == {
        "long": StepStatus.CANCELLED, "later": StepStatus.CANCELLED}
    assert cancelled.step("long").attempt == 1


def test_cancel_from_another_process_through_the_store(settings: Settings) -> None:
    from framepipe.jobs.control import request_cancel

    pipeline = Pipeline("remote_cancel")
    started = threading.Event()

    @pipeline.step()
    def long(ctx: StepContext) -> None:
        started.set()
        while True:
            ctx.progress(1)
            time.sleep(0.01)

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(pipeline)
            await asyncio.to_thread(started.wait, 10)
            # what `framepipe jobs cancel` does, through its own store connection
            from framepipe.backends.state import StateStore

            with StateStore(settings.resolved_database_url) as other:
                assert request_cancel(other, execution_id[:10]) == []
            return await engine.wait(execution_id, raise_on_failure=False)

    info = run(main())
    assert info.status is ExecutionStatus.CANCELLED


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


def test_ledger_imports_only_new_files_and_only_on_success(settings: Settings,
                                                           tmp_path: Path) -> None:
    card = tmp_path / "card"
    card.mkdir()
    for name in ("a.mp4", "b.mp4", "c.mp4"):
        (card / name).write_bytes(name.encode() * 100)
    pipeline = Pipeline("importer")
    copied: list[str] = []

    @pipeline.step()
    def scan(ctx: StepContext) -> dict[str, Any]:
        files = {file_identity(p, card): p.name for p in sorted(card.iterdir())}
        new = ctx.ledger.filter_new(files)
        for identity in new:
            ctx.spawn_step("copy", {"identity": identity, "name": files[identity]})
        return {"new": len(new)}

    @pipeline.step()
    def copy(ctx: StepContext, identity: str, name: str) -> None:
        if name == "z_bad.mp4":
            raise OSError("card removed")
        ctx.objects.put(f"imports/{name}", (card / name).read_bytes())
        copied.append(name)
        ctx.ledger.record(identity, size=(card / name).stat().st_size, meta={"name": name})

    async def main() -> list[Any]:
        results = []
        async with JobEngine(settings=settings) as engine:
            results.append(await engine.run(pipeline))
            results.append(await engine.run(pipeline))
            (card / "d.mp4").write_bytes(b"new")
            # spawned after d.mp4, so both start together (fail-fast lets running steps finish)
            (card / "z_bad.mp4").write_bytes(b"broken")
            results.append(await engine.run(pipeline, raise_on_failure=False))
            ledger = Ledger(engine.store, "importer")
            entries = await asyncio.to_thread(ledger.entries)
            stored = [o.key for o in engine.objects.list("imports/")]
        return [*results, entries, stored]

    first, second, third, entries, stored = run(main())
    assert first.data["new"] == 3 and second.data["new"] == 0
    assert third.data["new"] == 2 and third.status is ExecutionStatus.FAILED
    assert sorted(copied) == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]
    names = sorted(e.meta["name"] for e in entries)
    assert names == ["a.mp4", "b.mp4", "c.mp4", "d.mp4"]  # z_bad.mp4 failed: not imported
    assert all(e.execution_id and e.step_key and e.step_key.startswith("copy:") for e in entries)
    assert stored == ["imports/a.mp4", "imports/b.mp4", "imports/c.mp4", "imports/d.mp4"]


def test_tempdirs_are_removed_after_success_and_failure(settings: Settings) -> None:
    pipeline = Pipeline("temps")
    made: list[Path] = []

    @pipeline.step()
    def ok(ctx: StepContext) -> None:
        d = ctx.tempdir()
        (d / "f").write_text("x")
        made.append(d)

    @pipeline.step(depends_on=["ok"])
    def fails(ctx: StepContext) -> None:
        d = ctx.tempdir()
        made.append(d)
        raise RuntimeError("boom")

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(pipeline, raise_on_failure=False)

    info = run(main())
    assert info.status is ExecutionStatus.FAILED
    assert len(made) == 2 and not any(d.exists() for d in made)
