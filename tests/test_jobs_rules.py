"""The scheduling rules both modes call (jobs/rules.py), on their own: the cases the
both-modes suite reaches only through whole executions, checked at their edges."""

from __future__ import annotations

import asyncio
from pathlib import Path

from framepipe import Pipeline, StepContext
from framepipe.backoff import Backoff
from framepipe.errors import StepCancelledError
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.outcomes import RetryPolicy
from framepipe.jobs.rules import (
    after_failure,
    execution_progress,
    failed_error,
    interrupted_status,
    plan_step,
    released_by_names,
    stuck_error,
)
from framepipe.jobs.running import run_attempt, run_attempt_async

p = Pipeline("rules")


@p.step()
def start(ctx: StepContext) -> None:
    pass


@p.step(depends_on=["start"])
def work(ctx: StepContext, i: int) -> dict[str, int]:
    return {f"w{i}": i}


@p.step(depends_on=["work"])
def join(ctx: StepContext) -> None:
    pass


def test_dependencies_split_into_one_step_and_every_instance() -> None:
    plan = plan_step(p, "work", {"i": 1}, "work:x", ["join", "work:y", "start"], "start")
    assert plan.deps == ["start", "join", "work:y"]  # declared first, no repeats
    assert plan.key_deps == ["start", "join", "work:y"]  # parameterless names and keys
    assert plan.name_deps == []
    gather = plan_step(p, "join", {}, "join")
    assert gather.key_deps == [] and gather.name_deps == ["work"]


def test_name_waiters_are_released_only_when_none_of_their_names_is_open() -> None:
    waiters = {"b": ["work"], "a": ["work", "other"], "c": ["other"]}
    assert released_by_names(waiters, open_names=["other"]) == ["b"]
    assert released_by_names(waiters, open_names=[]) == ["a", "b", "c"]  # sorted: same order


def test_a_failed_attempt_retries_within_the_policy_only_while_the_execution_runs() -> None:
    policy = RetryPolicy(2, Backoff(initial=1.0, maximum=3.0, jitter=0.0))
    assert after_failure(1, policy, permanent=False, running=True) == 1.0
    assert after_failure(2, policy, permanent=False, running=True) == 2.0
    assert after_failure(3, policy, permanent=False, running=True) is None  # spent
    assert after_failure(1, policy, permanent=True, running=True) is None
    assert after_failure(1, policy, permanent=False, running=False) is None  # failing fast


def test_messages_name_the_pipeline_the_step_and_what_waits() -> None:
    assert failed_error("p", "s:1", 1, "ValueError: bad\n\ntrace") == (
        "pipeline 'p', step 's:1' failed after 1 attempt: ValueError: bad"
    )
    assert "after 3 attempts" in failed_error("p", "s", 3, "E")
    shown = [(f"k{i}", ["d"]) for i in range(7)]
    text = stuck_error("p", 7, shown)
    assert text.startswith("pipeline 'p': no step can run any more (7 waiting: k0 waits for d;")
    assert "k4" in text and "k5" not in text  # the first five


def test_a_stopped_attempt_is_cancelled_only_with_a_cancelled_execution() -> None:
    assert interrupted_status(ExecutionStatus.CANCELLED) is StepStatus.CANCELLED
    assert interrupted_status(ExecutionStatus.INTERRUPTED) is StepStatus.PENDING


def test_progress_is_weighted_and_never_goes_back() -> None:
    assert execution_progress(0.0, 150.0, 3.0, completed=0, total=3) == 50.0
    assert execution_progress(60.0, 150.0, 3.0, completed=0, total=3) == 60.0  # spawned more
    assert execution_progress(0.0, 0.0, 0.0, completed=1, total=4) == 25.0  # all weights 0
    assert execution_progress(0.0, 500.0, 3.0, completed=3, total=3) == 100.0


def _ctx(tmp_path: Path, name: str, params: dict[str, int]) -> StepContext:
    return StepContext(
        pipeline=p,
        execution_id="e" * 32,
        step_key=name,
        step_name=name,
        attempt=1,
        inputs={},
        data={},
        params=params,
        store=None,  # type: ignore[arg-type]
        objects=lambda: None,  # type: ignore[arg-type,return-value]
        post=lambda _m: None,
        has_key=lambda _k: False,
    )


def test_an_attempt_returns_its_checked_output_or_its_error_and_leaves_no_tempdir(
    tmp_path: Path,
) -> None:
    made: list[Path] = []
    q = Pipeline("attempts")

    @q.step()
    def ok(ctx: StepContext) -> dict[str, int]:
        made.append(ctx.tempdir())
        return {"n": 1}

    @q.step()
    def bad(ctx: StepContext) -> object:
        made.append(ctx.tempdir())
        return {"n": object()}  # not storable

    ctx = _ctx(tmp_path, "ok", {})
    ctx.pipeline = q
    ran = run_attempt(q.steps["ok"], ctx, output_limit=1000)
    assert ran.output == {"n": 1} and ran.error is None
    ctx = _ctx(tmp_path, "bad", {})
    ctx.pipeline = q
    ran = run_attempt(q.steps["bad"], ctx, output_limit=1000)
    assert ran.output is None and type(ran.error).__name__ == "StepOutputError"
    assert made and not any(path.exists() for path in made)


def test_a_cancelled_async_attempt_returns_a_step_cancelled_error(tmp_path: Path) -> None:
    q = Pipeline("async_attempts")

    @q.step()
    async def slow(ctx: StepContext) -> None:
        await asyncio.sleep(60)

    async def main() -> object:
        ctx = _ctx(tmp_path, "slow", {})
        ctx.pipeline = q
        task = asyncio.create_task(run_attempt_async(q.steps["slow"], ctx, output_limit=1000))
        await asyncio.sleep(0.01)
        task.cancel()
        return (await task).error

    assert isinstance(asyncio.run(main()), StepCancelledError)


def test_an_output_over_the_limit_is_the_attempts_error(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, "work", {"i": 123456})
    ran = run_attempt(p.steps["work"], ctx, output_limit=10)
    assert ran.error is not None and "limit" in str(ran.error)
