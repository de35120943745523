"""Resuming a distributed execution with a new pipeline reference (the code moved): stored in
the resume's own transaction, and what a worker claims from then on carries it, also a worker
that had cached the execution's old one. On SQLite and the real PostgreSQL."""

from __future__ import annotations

from framepipe.backends.state import StateStore
from framepipe.jobs import dispatch
from framepipe.jobs.models import ExecutionStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import get_execution
from framepipe.jobs.rounds import Claimed, Outcome, Round

OLD, NEW = "/srv/old/moved.py:moved", "/srv/new/moved.py:moved"


def _pipeline() -> Pipeline:
    pipeline = Pipeline("moved")

    @pipeline.step()
    def only(ctx: object) -> dict[str, int]:
        return {"only": 1}

    return pipeline


def _fail(store: StateStore, c: Claimed) -> None:
    outcome = Outcome(
        c.execution_id, c.key, c.attempt, "failed", c.weight, c.progress, error="boom"
    )
    dispatch.commit_round(store, Round(outcomes=[outcome]))


def test_resume_with_a_new_reference_stores_it_and_claims_carry_it(store: StateStore) -> None:
    execution_id, ready, _ = dispatch.submit(store, _pipeline(), {}, ref=OLD)
    known: dispatch.Known = {}  # a worker's cache, kept across its claims
    claimed, _ = dispatch.claim(store, "w1", ready, lease=30.0, known=known)
    assert [c.pipeline_ref for c in claimed] == [OLD]
    _fail(store, claimed[0])
    assert get_execution(store, execution_id).status is ExecutionStatus.FAILED

    full_id, ready, _ = dispatch.resume(store, execution_id[:8], ref=NEW)
    assert full_id == execution_id
    info = get_execution(store, execution_id)
    assert (info.status, info.pipeline_ref, info.runs) == (ExecutionStatus.RUNNING, NEW, 2)
    claimed, _ = dispatch.claim(store, "w1", ready, lease=30.0, known=known)
    assert [c.pipeline_ref for c in claimed] == [NEW]  # not the reference cached before
    assert known[execution_id][1] == NEW

    _fail(store, claimed[0])
    _, ready, _ = dispatch.resume(store, execution_id)  # no reference given: the stored one
    assert get_execution(store, execution_id).pipeline_ref == NEW
    claimed, _ = dispatch.claim(store, "w2", ready, lease=30.0)
    assert [c.pipeline_ref for c in claimed] == [NEW]


def test_a_stale_delivery_of_a_cached_execution_claims_nothing(store: StateStore) -> None:
    _, ready, _ = dispatch.submit(store, _pipeline(), {}, ref=OLD)
    known: dispatch.Known = {}
    claimed, _ = dispatch.claim(store, "w1", ready, lease=30.0, known=known)
    assert len(claimed) == 1
    again, events = dispatch.claim(store, "w2", ready, lease=30.0, known=known)
    assert (again, events) == ([], [])
