"""A worker's writes to a step are fenced by the attempt it claimed *and* by being the worker
that holds it. A claim commits without waiting for the WAL flush: after a PostgreSQL crash
loses one, another worker can claim the step again under the same attempt number. The first
claimant then learns it lost the step at its next lease renewal (and stops running it), and
its outcome, progress and spawns are discarded; the second claimant's count. On SQLite and
the real PostgreSQL."""

from __future__ import annotations

import sqlalchemy as sa

from framepipe.backends.state import StateStore, steps
from framepipe.jobs import dispatch, leases
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import get_execution
from framepipe.jobs.rounds import Claimed, Outcome, ProgressUpdate, Round, Spawn
from framepipe.jobs.rules import plan_step

A, B = "host-a:101:aaaa", "host-b:202:bbbb"


def _pipeline() -> Pipeline:
    pipeline = Pipeline("fenced")

    @pipeline.step()
    def only(ctx: object) -> dict[str, int]:
        return {"only": 1}

    @pipeline.step()
    def child(ctx: object, i: int) -> dict[str, int]:
        return {"child": i}

    return pipeline


def _lose_claim(store: StateStore, c: Claimed) -> None:
    """What a crash that loses a non-durable claim leaves: the step ready, as before it."""
    with store.write() as conn:
        conn.execute(
            steps.update()
            .where(steps.c.execution_id == c.execution_id, steps.c.key == c.key)
            .values(
                status=StepStatus.READY.value,
                attempt=steps.c.attempt - 1,
                worker=None,
                lease_until=None,
            )
        )


def _done(c: Claimed, output: dict[str, int]) -> Outcome:
    return Outcome(c.execution_id, c.key, c.attempt, "done", c.weight, c.progress, output=output)


def test_the_first_claimant_of_a_lost_claim_is_fenced_off(store: StateStore) -> None:
    pipeline = _pipeline()
    execution_id, ready, _ = dispatch.submit(store, pipeline, {}, ref="/srv/fenced.py:fenced")
    (first,) = dispatch.claim(store, A, ready, lease=30.0)[0]
    _lose_claim(store, first)
    (second,) = dispatch.claim(store, B, ready, lease=30.0)[0]
    assert second.attempt == first.attempt  # the same attempt number, held by B

    lost, _ = leases.renew(
        store, A, [(execution_id, "only", first.attempt)], lease=30, concurrency=1
    )
    assert lost == {(execution_id, "only", first.attempt)}  # A hears it must stop
    kept, _ = leases.renew(
        store, B, [(execution_id, "only", second.attempt)], lease=30, concurrency=1
    )
    assert kept == set()

    spawn = Spawn(
        execution_id, "only", first.attempt, plan_step(pipeline, "child", {"i": 1}, "child#a")
    )
    progress = ProgressUpdate(execution_id, "only", first.attempt, first.weight, 0.0, 50.0, "A")
    late = dispatch.commit_round(
        store,
        Round(outcomes=[_done(first, {"by": 1})], progress=[progress], spawns=[spawn]),
        worker=A,
    )
    # the spawn, the progress report, the outcome: each fenced, each named
    assert late.fenced == [(execution_id, "only", first.attempt)] * 3
    with store.read() as conn:
        row = conn.execute(
            sa.select(steps.c.status, steps.c.worker, steps.c.progress, steps.c.message).where(
                steps.c.execution_id == execution_id, steps.c.key == "only"
            )
        ).one()
        keys = set(
            conn.execute(
                sa.select(steps.c.key).where(steps.c.execution_id == execution_id)
            ).scalars()
        )
    assert (row.status, row.worker, row.progress, row.message) == (
        StepStatus.RUNNING.value,
        B,
        0.0,
        None,
    )
    assert "child#a" not in keys

    failed = Outcome(execution_id, "only", first.attempt, "failed", first.weight, 0.0, error="A")
    assert dispatch.commit_round(store, Round(outcomes=[failed]), worker=A).fenced == [
        (execution_id, "only", first.attempt)
    ]

    result = dispatch.commit_round(store, Round(outcomes=[_done(second, {"by": 2})]), worker=B)
    assert result.fenced == []
    info = get_execution(store, execution_id)
    assert info.status is ExecutionStatus.COMPLETED
    assert info.data["by"] == 2  # the holder's outcome, not the first one to arrive
