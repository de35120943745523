"""A step that kills its own process, and engines in several processes on one store."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from framepipe import ExecutionStatus, JobEngine, Settings, StepStatus
from framepipe.jobs.loading import load_pipeline
from framepipe.jobs.records import get_execution, list_executions

pytestmark = pytest.mark.slow  # engine processes killed mid-step

SCRIPT = textwrap.dedent("""
    import asyncio, os, sys
    from pathlib import Path
    from framepipe import JobEngine, Pipeline, StepContext

    work = Path(__file__).parent
    pipeline = Pipeline("crashy")

    @pipeline.step()
    def first(ctx: StepContext) -> dict:
        with open(work / "runs.log", "a") as fh:
            fh.write("first\\n")
        return {"first": True}

    @pipeline.step(depends_on=["first"], retries=2)
    def killer(ctx: StepContext) -> dict:
        with open(work / "runs.log", "a") as fh:
            fh.write("killer\\n")
        if not (work / "fixed").exists():
            os._exit(9)  # dies without raising: no exception reaches the engine
        return {"killer": True}

    async def main() -> None:
        async with JobEngine() as engine:
            if sys.argv[2] == "run":
                info = await engine.run(pipeline, raise_on_failure=False)
            else:
                await engine.retry(sys.argv[3], pipeline)
                info = await engine.wait(sys.argv[3], raise_on_failure=False)
            print(info.id, info.status.value)

    if __name__ == "__main__":
        asyncio.run(main())
""")


def _env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env["FRAMEPIPE_HOME"] = str(settings.home)
    env["FRAMEPIPE_DATABASE_URL"] = settings.resolved_database_url
    env["FRAMEPIPE_HEARTBEAT_INTERVAL"] = "0.2"
    return env


def _script(tmp_path: Path, *args: str, settings: Settings) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "crashy.py"
    path.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(path), "-", *args],
        env=_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _latest(settings: Settings) -> str:
    from framepipe.backends.state import StateStore

    with StateStore(settings.resolved_database_url) as store:
        return list_executions(store, limit=1)[0][0].id


def test_step_killing_its_process_is_reported_and_resumable(
    settings: Settings, tmp_path: Path
) -> None:
    proc = _script(tmp_path, "run", settings=settings)
    assert proc.returncode == 9, proc.stderr
    execution_id = _latest(settings)
    pipeline = load_pipeline(f"{tmp_path / 'crashy.py'}:crashy")

    async def main() -> tuple[object, object]:
        async with JobEngine(settings=settings) as engine:  # starting recovers the orphan
            before = await asyncio.to_thread(get_execution, engine.store, execution_id)
            (tmp_path / "fixed").write_text("")
            await engine.retry(execution_id, pipeline)
            return before, await engine.wait(execution_id)

    before, after = asyncio.run(main())
    assert before.status is ExecutionStatus.INTERRUPTED  # type: ignore[attr-defined]
    error = before.error  # type: ignore[attr-defined]
    assert "pipeline 'crashy'" in error and "step(s) killer ran" in error
    killer = before.step("killer")  # type: ignore[attr-defined]
    assert killer.status is StepStatus.PENDING and killer.crashes == 1
    assert "died without the step raising" in killer.error
    assert before.step("first").status is StepStatus.COMPLETED  # type: ignore[attr-defined]
    assert after.status is ExecutionStatus.COMPLETED  # type: ignore[attr-defined]
    assert after.data == {"first": True, "killer": True}  # type: ignore[attr-defined]
    runs = (tmp_path / "runs.log").read_text().split()
    assert runs == ["first", "killer", "killer"]  # first was not run again


def test_step_that_keeps_killing_its_process_is_failed_as_poison(
    settings: Settings, tmp_path: Path
) -> None:
    assert _script(tmp_path, "run", settings=settings).returncode == 9
    execution_id = _latest(settings)
    for _ in range(2):
        proc = _script(tmp_path, "retry", execution_id, settings=settings)
        assert proc.returncode == 9, proc.stderr
    from framepipe.backends.state import StateStore
    from framepipe.jobs.recovery import recover_orphans

    with StateStore(settings.resolved_database_url) as store:
        events = recover_orphans(store, max_step_crashes=3, journal_dir=settings.run_dir)
        info = get_execution(store, execution_id)
    assert info.status is ExecutionStatus.FAILED
    assert info.step("killer").status is StepStatus.FAILED
    assert info.step("killer").crashes == 3
    assert "StepCrashedError: pipeline 'crashy', step 'killer'" in info.errors["killer"]
    assert [e.type for e in events] == ["step.failed", "execution.failed"]
    assert (tmp_path / "runs.log").read_text().split().count("first") == 1


MULTI = textwrap.dedent("""
    import asyncio, sys
    from framepipe import JobEngine, Pipeline

    pipeline = Pipeline("multi")

    @pipeline.step()
    def fan(ctx):
        for i in range(150):
            ctx.spawn_step("leaf", {"i": i})

    @pipeline.step()
    def leaf(ctx, i):
        ctx.progress(50)
        return {f"leaf{i}": i}

    @pipeline.step(depends_on=["leaf"])
    def join(ctx):
        return {"total": sum(v for k, v in ctx.data.items() if k.startswith("leaf"))}

    async def main():
        async with JobEngine() as engine:
            for _ in range(3):
                info = await engine.run(pipeline)
                assert info.data["total"] == sum(range(150)), info.data
        print("ok")

    asyncio.run(main())
""")


def test_engines_in_several_processes_share_one_store(settings: Settings, tmp_path: Path) -> None:
    path = tmp_path / "multi.py"
    path.write_text(MULTI)
    procs = [
        subprocess.Popen(
            [sys.executable, str(path)],
            env=_env(settings),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [p.communicate(timeout=170) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err
        assert out.strip() == "ok"
        assert "database is locked" not in err
    from framepipe.backends.state import StateStore

    with StateStore(settings.resolved_database_url) as store:
        rows = list_executions(store, limit=100)
    assert len(rows) == 12
    assert all(
        info.status is ExecutionStatus.COMPLETED and done == total == 152
        for info, done, total in rows
    )
