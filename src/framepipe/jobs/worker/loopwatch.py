"""A worker's watch on its event loop (:class:`LoopWatch`).

The event loop renews the leases of the steps the worker runs and runs its ``async def``
steps, so a step that blocks it (a blocking upload, ``time.sleep``, CPU work in an ``async``
step) stops the renewals: blocked for a lease, the worker loses every step it holds, and
another worker takes them over.

* a timer on the loop marks it alive every ``lease / 12`` seconds (at most 0.25 s); a thread
  checks the mark and, while the loop has not run for a third of the lease, warns once per
  stall (not per check), naming the step whose code holds the loop (else the steps running)
  and the line it is blocked at, so the cause is in the log before the lease is lost; once the
  loop runs again it logs how long the stall lasted;
* a stall of the whole process (SIGSTOP, a suspended machine) is not taken for a blocked loop:
  the watching thread, stopped too, sees that it woke late itself.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from pathlib import Path

from framepipe.jobs.worker.runs import Run, Runs
from framepipe.logs import get_logger

__all__ = ["LoopWatch"]

_log = get_logger("jobs.worker")


class LoopWatch:
    """Warns when the event loop of worker ``worker_id`` has not run for a third of its
    ``lease`` (:meth:`start` on the loop, :meth:`stop` from it)."""

    def __init__(self, *, runs: Runs, worker_id: str, lease: float) -> None:
        self._runs = runs
        self._id = worker_id
        self._lease = lease
        self.every = min(lease / 12, 0.25)
        self.threshold = lease / 3
        self._beat = time.monotonic()
        self._warned: float | None = None  # the beat after which the last warned stall began
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Watch ``loop`` (called on it)."""
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._tick()
        threading.Thread(target=self._watch, name="framepipe-loopwatch", daemon=True).start()

    def stop(self) -> None:
        """Stop watching (the thread ends within ``every`` seconds)."""
        self._stop.set()
        if self._timer is not None:
            self._timer.cancel()

    def _tick(self) -> None:
        now = time.monotonic()
        last, self._beat = self._beat, now
        if self._warned == last:
            _log.info(
                "Worker %s: its event loop runs again after %.1f s (lease %g s)",
                self._id,
                now - last,
                self._lease,
            )
        if not self._stop.is_set():
            assert self._loop is not None
            self._timer = self._loop.call_later(self.every, self._tick)

    def _watch(self) -> None:
        checked = time.monotonic()
        while not self._stop.wait(self.every):
            now = time.monotonic()
            process_stalled = now - checked > self.every + self.threshold / 2
            checked = now
            beat = self._beat
            if process_stalled or now - beat < self.threshold or beat == self._warned:
                continue
            self._warned = beat
            try:
                self._warn(now - beat)
            except Exception:  # never let the watch take the worker down
                _log.exception("Worker %s: the event loop watch failed", self._id)

    def _warn(self, stalled: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        stack = traceback.extract_stack(frame) if frame is not None else []
        assert self._loop is not None
        task = asyncio.current_task(self._loop)
        live = self._runs.live()
        holder = next((r for r in live if r.task is not None and r.task is task), None)
        if holder is not None:
            who = f"async step {_name(holder)} holds it"
        else:
            running = [_name(r) for r in live if r.began is not None]
            who = "no step's code holds it" + (
                f" (steps running: {', '.join(running)})" if running else ""
            )
        _log.warning(
            "Worker %s: its event loop has not run for %.1f s, a third of the %g s lease: %s, "
            "blocked %s; if it stays blocked for the lease, this worker's steps lose their "
            "leases and are taken over. Run blocking work of async steps in a thread (await "
            "asyncio.to_thread(...)), or raise FRAMEPIPE_LEASE_SECONDS",
            self._id,
            stalled,
            self._lease,
            who,
            _where(stack, holder),
        )


def _name(run: Run) -> str:
    c = run.claimed
    return f"{c.key} of {c.execution_id[:8]} (attempt {c.attempt})"


def _where(stack: traceback.StackSummary | list[traceback.FrameSummary], run: Run | None) -> str:
    """Where the loop's thread is: its innermost frame, and the innermost one in the file of
    ``run``'s step function when that is another."""
    if not stack:
        return "at an unknown line"
    inner = stack[-1]
    text = f"at {_frame(inner)}"
    step = run.pipeline.get(run.claimed.name) if run is not None and run.pipeline else None
    code = getattr(step.fn, "__code__", None) if step is not None else None
    if code is not None:
        own = [f for f in stack if f.filename == code.co_filename]
        if own and own[-1] is not inner:
            text += f", called from {_frame(own[-1])}"
    return text


def _frame(f: traceback.FrameSummary) -> str:
    return f"{Path(f.filename).name}:{f.lineno} in {f.name}"
