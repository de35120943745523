"""A worker's runs (``framepipe.jobs.worker.runs``) when a step it handed back comes back to it,
and when a claim reaches its event loop too late for its lease.

A worker hands back the claimed steps it has not started when its steps turn out long; a
hand-back is not an attempt, so the same commit round can claim the step again for the same
worker under the same attempt number. That claim must run the step: it was taken for a run
still held here ("delivered again while it runs here; not started twice"), so the step ran
nowhere until its lease lapsed and another attempt took it."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from framepipe import Pipeline, StepContext
from framepipe.backends.objects import LocalObjectStore
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.jobs.loading import KnownPipelines
from framepipe.jobs.rounds import Claimed
from framepipe.jobs.worker.runs import Run, Runs
from framepipe.jobs.worker.window import ClaimWindow
from waiting import wait_until_async

pipeline = Pipeline("handback_again")
gate = threading.Event()
ran: list[str] = []


@pipeline.step()
def hold(ctx: StepContext) -> dict[str, Any]:
    """Keeps the worker's one thread busy until the test opens the gate."""
    gate.wait(30)
    ran.append("hold")
    return {}


@pipeline.step()
def queued(ctx: StepContext) -> dict[str, Any]:
    ran.append("queued")
    return {}


def _claimed(name: str, attempt: int = 1) -> Claimed:
    return Claimed(
        execution_id="e" * 32,
        key=name,
        name=name,
        params={},
        attempt=attempt,
        weight=1.0,
        progress=0.0,
        pipeline=pipeline.name,
        pipeline_ref=None,
        inputs={},
        input_roots=None,
        ready_at=None,
        started_at=time.time(),
    )


def test_a_step_handed_back_and_claimed_again_in_the_same_round_runs(tmp_path: Path) -> None:
    gate.clear()
    ran.clear()
    lock = threading.Lock()
    stopping = threading.Event()
    window = ClaimWindow(lock, concurrency=1, prefetch=2, stopping=stopping)
    objects = LocalObjectStore(tmp_path / "objects")
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        runs = Runs(
            window=window,
            settings=Settings(home=tmp_path),
            store=store,
            worker_id="w1",
            pipelines=KnownPipelines([pipeline]),
            objects=lambda: objects,
            stopping=stopping,
            reported=lambda: None,
        )

        async def scenario() -> list[str]:
            runs.open(asyncio.get_running_loop())
            first = Run(_claimed("hold"), pipeline)
            second = Run(_claimed("queued"), pipeline)
            runs.start_all([first, second])  # one thread: "queued" waits behind "hold"
            await wait_until_async("the first step to begin", lambda: first.began is not None)
            runs.hand_back_queued()  # steps are long: "queued" is given back, not started
            assert second.handed_back
            handback = [o for _r, o in runs.take_reports().outcomes]
            assert [(o.key, o.kind, o.ran) for o in handback] == [("queued", "handback", False)]

            again = Run(_claimed("queued"), pipeline)  # the round claims it again: attempt 1
            runs.start_all([again])
            runs.committed(second, handback[0])  # the hand-back's commit forgets the old run
            assert runs.get(again.ident) is again
            gate.set()
            await wait_until_async("the step claimed again to run", lambda: "queued" in ran)
            runs.close()
            return list(ran)

        try:
            assert asyncio.run(scenario()) == ["hold", "queued"]
        finally:
            gate.set()
    objects.close()


def test_a_claim_that_reaches_the_loop_too_late_for_its_lease_is_handed_back(
    tmp_path: Path,
) -> None:
    """A claim made while the event loop was blocked (by the reader thread, or in a round)
    reaches the loop with a lease never renewed: it lapses before the next renewal, and
    another worker may run the step by then. It is handed back (not an attempt) instead of
    started: it was started, and the step ran twice, once on each worker."""
    ran.clear()
    lock = threading.Lock()
    stopping = threading.Event()
    window = ClaimWindow(lock, concurrency=2, prefetch=1, stopping=stopping)
    objects = LocalObjectStore(tmp_path / "objects")
    with StateStore(f"sqlite:///{tmp_path / 'state.db'}") as store:
        runs = Runs(
            window=window,
            settings=Settings(home=tmp_path, lease_seconds=1.5),
            store=store,
            worker_id="w1",
            pipelines=KnownPipelines([pipeline]),
            objects=lambda: objects,
            stopping=stopping,
            reported=lambda: None,
        )

        async def scenario() -> None:
            runs.open(asyncio.get_running_loop())
            assert window.take_free() == 2  # the slots the two claims hold
            late = _claimed("queued")
            late.started_at -= 1.2  # more than 2/3 of the lease ago
            stale = Run(late, pipeline)
            runs.start_all([stale])
            assert stale.handed_back and stale.began is None
            assert runs.get(stale.ident) is None
            outcomes = [o for _r, o in runs.take_reports().outcomes]
            assert [(o.key, o.kind, o.ran) for o in outcomes] == [("queued", "handback", False)]
            assert window.take_free() == 1  # its slot was given back

            fresh = Run(_claimed("queued", attempt=2), pipeline)
            runs.start_all([fresh])
            await wait_until_async("the fresh claim to run", lambda: "queued" in ran)
            runs.close()

        asyncio.run(scenario())
    objects.close()
    assert ran == ["queued"]
