"""Supervisor: real subprocesses and real asyncio tasks, killed, stalled, restarted and stopped.

Each test runs its own event loop with ``asyncio.run``. Waits are on events the supervisor
emits (never fixed sleeps); bounds on timing are generous, the precise figures belong to the
benchmarks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from framepipe import supervise_stall
from framepipe.backoff import Backoff
from framepipe.errors import CaptureExitedError, SourceError
from framepipe.health import Health, HealthState
from framepipe.sources import CommandSource
from framepipe.supervise import Supervisor, SupervisorContext
from framepipe.supervise_report import format_delay
from media import need_tool
from waiting import wait_until_async

FAST = Backoff(0.05, 2, 0.4, 0)
CHILD = "import time; print('x', flush=True); time.sleep(60)"


class Recorder:
    """An ``on_event`` callback that records (type, data, health state, time) and lets a test
    await the n-th event of a type."""

    def __init__(self) -> None:
        self.sup: Supervisor | None = None
        self.events: list[tuple[str, dict[str, Any], HealthState | None, float]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        state = self.sup.health.state if self.sup is not None else None
        self.events.append((event, dict(data), state, time.monotonic()))
        for pred, fut in self._waiters:
            if not fut.done() and pred():
                fut.set_result(None)

    def of(self, event: str) -> list[dict[str, Any]]:
        return [data for kind, data, _, _ in self.events if kind == event]

    def at(self, event: str, n: int = 1) -> float:
        return [t for kind, _, _, t in self.events if kind == event][n - 1]

    def types(self) -> list[str]:
        return [kind for kind, _, _, _ in self.events]

    async def until(self, event: str, count: int = 1, within: float = 5.0) -> None:
        def pred() -> bool:
            return len(self.of(event)) >= count

        if pred():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((pred, fut))
        await asyncio.wait_for(fut, within)


def lines(caplog: pytest.LogCaptureFixture, component: str) -> list[str]:
    """The messages logged for one component."""
    return [r.getMessage() for r in caplog.records if getattr(r, "component", None) == component]


def make_capture(
    procs: list[asyncio.subprocess.Process],
) -> Callable[[SupervisorContext], Awaitable[None]]:
    """A target running a real persistent child process, like a gst-launch capture."""

    async def capture(ctx: SupervisorContext) -> None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, stdout=asyncio.subprocess.PIPE
        )
        procs.append(proc)
        try:
            assert proc.stdout is not None
            await proc.stdout.readline()  # the capture is open: its first frame
            ctx.started(proc.pid)
            ctx.alive()
            code = await proc.wait()
            raise CaptureExitedError("capture exited", source_id=ctx.name, exit_code=code)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    return capture


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---------------------------------------------------------------------------- death


def test_killed_capture_is_noticed_at_once_and_restarted(logs: pytest.LogCaptureFixture) -> None:
    procs: list[asyncio.subprocess.Process] = []
    rec = Recorder()

    async def main() -> float:
        sup = Supervisor("station_1", make_capture(procs), backoff=FAST, on_event=rec)
        rec.sup = sup
        await sup.start()
        try:
            await rec.until("started")
            first = procs[0].pid
            assert sup.health.pid == first
            assert sup.health.state is HealthState.RUNNING
            t0 = time.monotonic()
            os.kill(first, signal.SIGKILL)
            await rec.until("died")
            noticed = rec.at("died") - t0
            await rec.until("started", 2)
            health = sup.health
            assert health.pid == procs[1].pid != first
            assert health.restarts == 1
            assert health.attempt == 1
            assert health.last_exit_code == -9
            assert health.state is HealthState.RUNNING
        finally:
            await sup.stop()
        assert all(p.returncode is not None for p in procs)
        assert gone(procs[1].pid)
        return noticed

    noticed = asyncio.run(main())
    assert noticed < 2.0
    assert rec.of("died")[0] == {
        "name": "station_1",
        "exit_code": -9,
        "error": "CaptureExitedError: [station_1] capture exited",
    }
    restarting = rec.of("restarting")[0]
    next_at = restarting.pop("next_attempt_at")
    assert restarting == {"name": "station_1", "delay": 0.05, "attempt": 1, "retrying": False}
    assert time.time() - 30 < next_at < time.time()
    assert [d["pid"] for d in rec.of("started")] == [procs[0].pid, procs[1].pid]
    assert [d["attempt"] for d in rec.of("started")] == [0, 1]
    messages = lines(logs, "station_1")
    assert messages == [
        f"Persistent pipeline started (PID: {procs[0].pid})",
        "Pipeline subprocess died (exit code: -9)",
        "Restarting pipeline in 0.05s (attempt 1)",
        f"Persistent pipeline started (PID: {procs[1].pid})",
        "Pipeline stopped",
    ]


def test_exit_with_stderr_tail_and_custom_what(logs: pytest.LogCaptureFixture) -> None:
    async def target(ctx: SupervisorContext) -> None:
        raise CaptureExitedError(
            "gst exited", exit_code=1, stderr_tail="Setting pipeline to PAUSED\nERROR: no element\n"
        )

    async def main() -> Health:
        sup = Supervisor("cam_what", target, backoff=FAST, max_attempts=1, what="capture")
        await sup.start()
        return await asyncio.wait_for(sup.wait(), 5)

    health = asyncio.run(main())
    assert health.state is HealthState.FAILED
    assert health.last_exit_code == 1
    messages = lines(logs, "cam_what")
    assert messages[0] == "Capture subprocess died (exit code: 1)"
    assert "ERROR: no element" in messages[1]
    assert "Setting pipeline to PAUSED" in messages[1]
    assert messages[2] == (
        "Capture failed after 1 attempt, no restart left: CaptureExitedError: gst exited"
    )


# ---------------------------------------------------------------------------- backoff


def test_backoff_schedule_then_failed_permanently(logs: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    sessions: list[int] = []

    async def target(ctx: SupervisorContext) -> None:
        sessions.append(ctx.attempt)
        raise RuntimeError("boom")

    async def main() -> tuple[Health, float]:
        sup = Supervisor(
            "cam_backoff", target, backoff=Backoff(0.01, 2, 0.04, 0), max_attempts=5, on_event=rec
        )
        rec.sup = sup
        t0 = time.monotonic()
        await sup.start()
        health = await asyncio.wait_for(sup.wait(), 5)
        elapsed = time.monotonic() - t0
        assert not sup.running
        await sup.stop()  # after the end: a no-op, the state stays failed
        assert sup.health.state is HealthState.FAILED
        return health, elapsed

    health, elapsed = asyncio.run(main())
    delays = [d["delay"] for d in rec.of("restarting")]
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.04])
    assert [d["attempt"] for d in rec.of("restarting")] == [1, 2, 3, 4]
    assert elapsed >= sum(delays)
    assert sessions == [0, 1, 2, 3, 4]
    assert rec.of("failed") == [
        {"name": "cam_backoff", "error": "RuntimeError: boom", "attempts": 5}
    ]
    assert "stopped" not in rec.types()
    assert health.state is HealthState.FAILED
    assert health.last_error == "RuntimeError: boom"
    assert health.restarts == 4
    assert health.attempt == 5
    # the first failure in full, each repeat of it one line, then the end
    assert lines(logs, "cam_backoff") == [
        "Pipeline failed: RuntimeError: boom",
        "Restarting pipeline in 0.01s (attempt 1)",
        "Restarting pipeline in 0.02s (attempt 2), failed again: RuntimeError: boom",
        "Restarting pipeline in 0.04s (attempt 3), failed again: RuntimeError: boom",
        "Restarting pipeline in 0.04s (attempt 4), failed again: RuntimeError: boom",
        "Pipeline failed after 5 attempts, no restart left: RuntimeError: boom",
    ]
    # an unexpected exception type is logged with its traceback
    failed = [r for r in logs.records if r.getMessage() == "Pipeline failed: RuntimeError: boom"]
    assert len(failed) == 1 and failed[0].exc_info


def test_max_attempts_none_restarts_forever() -> None:
    rec = Recorder()

    async def target(ctx: SupervisorContext) -> None:
        raise SourceError("unreachable", source_id=ctx.name)

    async def main() -> Health:
        sup = Supervisor(
            "cam_forever",
            target,
            backoff=Backoff(0.001, 1, 0.001, 0),
            max_attempts=None,
            on_event=rec,
        )
        await sup.start()
        await rec.until("restarting", 8)
        assert sup.running
        await sup.stop()
        return sup.health

    health = asyncio.run(main())
    assert health.state is HealthState.STOPPED
    assert health.attempt >= 8
    assert "failed" not in rec.types()


def test_format_delay() -> None:
    assert format_delay(2.0) == "2s"
    assert format_delay(60) == "60s"
    assert format_delay(0.05) == "0.05s"
    assert format_delay(0.1) == "0.1s"
    assert format_delay(2.134) == "2.13s"
    assert format_delay(1.5) == "1.5s"


# ---------------------------------------------------------------------------- stalls


def test_stall_is_detected_counted_and_restarted(logs: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    alive_at: list[float] = []
    cleanups: list[int] = []

    async def target(ctx: SupervisorContext) -> None:
        ctx.started()
        try:
            for _ in range(3):
                ctx.alive()
                alive_at.append(time.monotonic())
                await asyncio.sleep(0.01)
            await asyncio.Event().wait()  # hangs: no more frames
        finally:
            cleanups.append(ctx.attempt)

    async def main() -> Health:
        sup = Supervisor("cam_stall", target, backoff=FAST, stall_timeout=0.2, on_event=rec)
        rec.sup = sup
        await sup.start()
        try:
            await rec.until("started", 2)
            return sup.health
        finally:
            await sup.stop()

    health = asyncio.run(main())
    assert rec.at("stalled") - alive_at[2] >= 0.2  # never early
    assert rec.of("stalled")[0]["seconds"] >= 0.2
    assert [state for kind, _, state, _ in rec.events if kind == "stalled"] == [HealthState.STALLED]
    assert health.stalls == 1
    assert health.restarts == 1
    assert health.frames >= 3
    assert health.last_frame_at is not None
    assert health.last_error is not None
    assert health.last_error.startswith("SourceStalledError: ")
    assert cleanups[0] == 0  # the stalled session was cancelled and cleaned up
    assert len(cleanups) == 2  # the second one at stop()
    messages = lines(logs, "cam_stall")
    assert messages[0] == "Persistent pipeline started"
    assert messages[1].startswith("Pipeline stalled: no frame for 0.")
    assert messages[2] == "Restarting pipeline in 0.05s (attempt 1)"


def test_frames_keep_a_session_alive() -> None:
    rec = Recorder()

    async def target(ctx: SupervisorContext) -> None:
        ctx.started()
        for _ in range(60):
            ctx.alive()
            await asyncio.sleep(0.01)

    async def main() -> Health:
        sup = Supervisor(
            "cam_alive", target, backoff=FAST, stall_timeout=0.3, restart_on_end=False, on_event=rec
        )
        await sup.start()
        return await asyncio.wait_for(sup.wait(), 10)

    health = asyncio.run(main())
    assert health.stalls == 0
    assert health.frames == 60
    assert health.state is HealthState.STOPPED
    assert rec.types() == ["started", "ended"]


@pytest.mark.parametrize(("stall_timeout", "start_timeout"), [(10.0, 0.1), (0.1, None)])
def test_a_target_that_never_starts_is_a_stall(
    logs: pytest.LogCaptureFixture, stall_timeout: float, start_timeout: float | None
) -> None:
    rec = Recorder()

    async def target(ctx: SupervisorContext) -> None:
        ctx.alive()  # frames do not count before started()
        await asyncio.Event().wait()

    async def main() -> Health:
        sup = Supervisor(
            "cam_nostart",
            target,
            backoff=FAST,
            max_attempts=2,
            stall_timeout=stall_timeout,
            start_timeout=start_timeout,
            on_event=rec,
        )
        await sup.start()
        return await asyncio.wait_for(sup.wait(), 5)

    health = asyncio.run(main())
    assert health.state is HealthState.FAILED
    assert health.stalls == 2
    assert health.last_error is not None
    assert "not started within" in health.last_error
    assert rec.types() == ["stalled", "restarting", "stalled", "failed"]
    assert all(d["seconds"] >= 0.1 for d in rec.of("stalled"))
    messages = lines(logs, "cam_nostart")
    assert messages[0].startswith("Pipeline stalled: not started within 0.")


# ---------------------------------------------------------------------------- healthy runs


def test_a_healthy_run_resets_the_attempt_counter() -> None:
    rec = Recorder()
    sessions: list[int] = []
    seen_while_running: list[int] = []
    holder: list[Supervisor] = []

    async def target(ctx: SupervisorContext) -> None:
        sessions.append(ctx.attempt)
        ctx.started()
        ctx.alive()  # a run is healthy healthy_after seconds after its first frame
        if len(sessions) == 3:  # the third run stays up longer than healthy_after
            await asyncio.sleep(0.4)
            seen_while_running.append(holder[0].health.attempt)
        raise SourceError("lost the stream", source_id=ctx.name)

    async def main() -> None:
        sup = Supervisor("cam_healthy", target, backoff=FAST, healthy_after=0.15, on_event=rec)
        holder.append(sup)
        await sup.start()
        await rec.until("restarting", 3)
        await sup.stop()

    asyncio.run(main())
    assert [d["attempt"] for d in rec.of("restarting")] == [1, 2, 1]
    assert sessions == [0, 1, 2]
    assert seen_while_running == [0]


# ---------------------------------------------------------------------------- normal end


def test_a_target_that_ends_stops_the_supervisor(logs: pytest.LogCaptureFixture) -> None:
    rec = Recorder()

    async def target(ctx: SupervisorContext) -> None:
        ctx.started()
        ctx.alive()

    async def main() -> tuple[Health, bool]:
        sup = Supervisor("file_1", target, backoff=FAST, restart_on_end=False, on_event=rec)
        await sup.start()
        health = await asyncio.wait_for(sup.wait(), 5)
        return health, sup.running

    health, running = asyncio.run(main())
    assert not running
    assert health.state is HealthState.STOPPED
    assert health.restarts == 0
    assert rec.types() == ["started", "ended"]
    assert rec.of("ended") == [{"name": "file_1", "restart": False}]
    assert lines(logs, "file_1") == ["Persistent pipeline started", "Pipeline ended"]


def test_a_target_that_ends_is_restarted_when_asked() -> None:
    rec = Recorder()

    async def target(ctx: SupervisorContext) -> None:
        ctx.started()
        ctx.alive()

    async def main() -> Health:
        sup = Supervisor("live_1", target, backoff=FAST, restart_on_end=True, on_event=rec)
        await sup.start()
        await rec.until("started", 3)
        await sup.stop()
        return sup.health

    health = asyncio.run(main())
    assert health.restarts >= 2
    assert health.state is HealthState.STOPPED
    assert rec.of("ended")[0] == {"name": "live_1", "restart": True}


# ---------------------------------------------------------------------------- stop


def test_stop_during_backoff_is_prompt(logs: pytest.LogCaptureFixture) -> None:
    rec = Recorder()
    sessions: list[int] = []

    async def target(ctx: SupervisorContext) -> None:
        sessions.append(ctx.attempt)
        raise SourceError("unreachable", source_id=ctx.name)

    async def main() -> tuple[Health, float]:
        sup = Supervisor("cam_stop1", target, backoff=Backoff(30, 2, 60, 0), on_event=rec)
        rec.sup = sup
        await sup.start()
        await rec.until("restarting")
        assert sup.health.state is HealthState.BACKOFF
        t0 = time.monotonic()
        await sup.stop()
        elapsed = time.monotonic() - t0
        health = await asyncio.wait_for(sup.wait(), 1)
        return health, elapsed

    health, elapsed = asyncio.run(main())
    assert elapsed < 1.0
    assert sessions == [0]
    assert health.state is HealthState.STOPPED
    assert rec.types() == ["died", "restarting", "stopped"]
    assert rec.of("stopped") == [{"name": "cam_stop1"}]
    assert lines(logs, "cam_stop1")[-1] == "Pipeline stopped"


def test_stop_during_a_run_cancels_and_cleans_up(logs: pytest.LogCaptureFixture) -> None:
    procs: list[asyncio.subprocess.Process] = []
    rec = Recorder()

    async def main() -> tuple[Health, float]:
        sup = Supervisor("cam_stop2", make_capture(procs), backoff=FAST, on_event=rec)
        await sup.start()
        await rec.until("started")
        t0 = time.monotonic()
        await sup.stop()
        elapsed = time.monotonic() - t0
        with pytest.raises(RuntimeError, match="stopped"):
            await sup.start()
        await sup.stop()  # idempotent
        return sup.health, elapsed

    health, elapsed = asyncio.run(main())
    assert elapsed < 2.0
    assert len(procs) == 1
    assert procs[0].returncode == -signal.SIGKILL  # killed by the target's cleanup
    assert gone(procs[0].pid)
    assert health.state is HealthState.STOPPED
    assert health.pid is None
    assert health.uptime == 0.0
    assert rec.types() == ["started", "stopped"]
    assert lines(logs, "cam_stop2")[-1] == "Pipeline stopped"


def test_lifecycle_misuse_raises() -> None:
    async def target(ctx: SupervisorContext) -> None:
        ctx.started()
        await asyncio.Event().wait()

    async def main() -> None:
        sup = Supervisor("cam_misuse", target)
        with pytest.raises(RuntimeError, match="not started"):
            await sup.wait()
        await sup.start()
        with pytest.raises(RuntimeError, match="already started"):
            await sup.start()
        await sup.stop()
        never = Supervisor("cam_never", target)
        await never.stop()
        assert (await asyncio.wait_for(never.wait(), 1)).state is HealthState.STOPPED
        with pytest.raises(RuntimeError):
            await never.start()

    asyncio.run(main())
    with pytest.raises(ValueError, match="max_attempts"):
        Supervisor("x", target, max_attempts=0)
    with pytest.raises(ValueError, match="stall_timeout"):
        Supervisor("x", target, stall_timeout=0)


# ---------------------------------------------------------------------------- robustness


def test_a_raising_on_event_callback_does_not_stop_supervision(
    logs: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def bad_callback(event: str, data: dict[str, Any]) -> None:
        calls.append(event)
        raise ValueError("callback bug")

    async def main() -> Health:
        running = asyncio.Event()
        sessions: list[int] = []

        async def target(ctx: SupervisorContext) -> None:
            sessions.append(ctx.attempt)
            ctx.started()
            ctx.alive()
            if len(sessions) == 1:
                raise SourceError("lost", source_id=ctx.name)
            running.set()
            await asyncio.Event().wait()

        sup = Supervisor("cam_cb", target, backoff=FAST, on_event=bad_callback)
        await sup.start()
        await asyncio.wait_for(running.wait(), 5)
        health = sup.health
        await sup.stop()
        return health

    health = asyncio.run(main())
    assert health.state is HealthState.RUNNING
    assert health.restarts == 1
    assert calls == ["started", "died", "restarting", "started", "stopped"]
    raised = [r for r in logs.records if "on_event callback raised" in r.getMessage()]
    assert len(raised) == 5
    assert all(r.exc_info for r in raised)


def test_a_bug_in_the_supervisor_fails_it_loudly(logs: pytest.LogCaptureFixture) -> None:
    class BrokenBackoff(Backoff):
        def delay(self, attempt: int) -> float:
            raise ZeroDivisionError("bug in the supervisor")

    rec = Recorder()

    async def target(ctx: SupervisorContext) -> None:
        raise SourceError("lost", source_id=ctx.name)

    async def main() -> Health:
        sup = Supervisor("cam_bug", target, backoff=BrokenBackoff(), on_event=rec)
        await sup.start()
        return await asyncio.wait_for(sup.wait(), 5)

    health = asyncio.run(main())
    assert health.state is HealthState.FAILED
    assert health.last_error == "supervisor crashed: ZeroDivisionError: bug in the supervisor"
    assert rec.of("failed")[0]["error"] == health.last_error
    crashed = [r for r in logs.records if r.getMessage() == "Supervisor of pipeline crashed"]
    assert len(crashed) == 1
    assert crashed[0].exc_info is not None
    assert crashed[0].levelno == logging.ERROR


def test_started_from_a_thread_and_stale_contexts_are_ignored() -> None:
    rec = Recorder()
    contexts: list[SupervisorContext] = []

    async def target(ctx: SupervisorContext) -> None:
        contexts.append(ctx)
        if len(contexts) == 1:
            raise SourceError("lost", source_id=ctx.name)

        def open_and_deliver() -> None:  # a capture thread: started(), then its first frame
            ctx.started(4242)
            ctx.alive()

        await asyncio.to_thread(open_and_deliver)
        await asyncio.Event().wait()

    async def main() -> tuple[Health, Health]:
        sup = Supervisor("cam_thread", target, backoff=FAST, on_event=rec)
        await sup.start()
        await rec.until("started")
        before = sup.health
        contexts[0].started(1)  # the first session is over: ignored
        contexts[0].alive()
        after = sup.health
        await sup.stop()
        return before, after

    before, after = asyncio.run(main())
    assert before.pid == 4242
    assert before.state is HealthState.RUNNING
    assert after.pid == 4242
    assert after.frames == 1
    assert rec.of("started") == [{"name": "cam_thread", "pid": 4242, "attempt": 1}]


def test_health_state_machine_and_json() -> None:
    rec = Recorder()
    entry_states: list[HealthState] = []
    holder: list[Supervisor] = []

    async def target(ctx: SupervisorContext) -> None:
        entry_states.append(holder[0].health.state)
        ctx.started(os.getpid())
        ctx.alive()
        if len(entry_states) == 1:
            raise SourceError("lost", source_id=ctx.name)
        await asyncio.Event().wait()

    async def main() -> tuple[Health, Health, Health]:
        sup = Supervisor(
            "cam_states", target, backoff=FAST, on_event=rec, description="test pattern"
        )
        holder.append(sup)
        rec.sup = sup
        initial = sup.health
        await sup.start()
        await rec.until("started", 2)
        running = sup.health
        await sup.stop()
        return initial, running, sup.health

    initial, running, final = asyncio.run(main())
    assert initial.state is HealthState.STOPPED
    observed = [
        state for kind, _, state, _ in rec.events if kind in {"started", "restarting", "stopped"}
    ]
    assert [entry_states[0], observed[0], observed[1], entry_states[1], *observed[2:]] == [
        HealthState.STARTING,
        HealthState.RUNNING,
        HealthState.BACKOFF,
        HealthState.STARTING,
        HealthState.RUNNING,
        HealthState.STOPPED,
    ]
    assert running.uptime >= 0.0
    assert running.started_at is not None
    data = json.loads(json.dumps(running.to_dict()))
    assert data["name"] == "cam_states"
    assert data["state"] == "running"
    assert data["pid"] == os.getpid()
    assert data["restarts"] == 1
    assert data["frames"] == 2
    assert data["description"] == "test pattern"
    assert data["last_error"] == "SourceError: [cam_states] lost"
    assert "uptime" in data
    assert final.state is HealthState.STOPPED


def test_a_session_slow_to_honour_a_stall_is_reported(
    logs: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervise_stall, "_CANCEL_GRACE", 0.1)
    rec = Recorder()
    during_cleanup: list[HealthState] = []
    holder: list[Supervisor] = []

    async def target(ctx: SupervisorContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ctx.started()  # too late: ignored once the session stalled
            await asyncio.sleep(0.4)  # slow cleanup
            during_cleanup.append(holder[0].health.state)
            raise

    async def main() -> Health:
        sup = Supervisor("cam_slow", target, backoff=FAST, start_timeout=0.1, on_event=rec)
        holder.append(sup)
        await sup.start()
        await rec.until("restarting")
        health = sup.health
        await sup.stop()
        return health

    health = asyncio.run(main())
    assert during_cleanup[0] is HealthState.STALLED
    assert health.stalls == 1
    assert "started" not in rec.types()
    messages = lines(logs, "cam_slow")
    assert "Pipeline session ignores its cancellation after 0.1s; still waiting" in messages


def test_stop_bounds_a_session_that_ignores_cancellation(logs: pytest.LogCaptureFixture) -> None:
    cleaned: list[bool] = []

    async def target(ctx: SupervisorContext) -> None:
        ctx.started()
        ctx.alive()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            try:
                await asyncio.sleep(30)  # a cleanup that would hang
            finally:
                cleaned.append(True)
            raise

    async def main() -> tuple[Health, float]:
        rec = Recorder()
        sup = Supervisor("cam_stuck", target, backoff=FAST, on_event=rec)
        await sup.start()
        await rec.until("started")
        t0 = time.monotonic()
        await sup.stop(timeout=0.2)
        return sup.health, time.monotonic() - t0

    health, elapsed = asyncio.run(main())
    assert elapsed < 1.5
    assert cleaned == [True]
    assert health.state is HealthState.STOPPED
    messages = lines(logs, "cam_stuck")
    assert "Pipeline did not stop within 0.2s; abandoning its session" in messages
    assert messages[-1] == "Pipeline stopped"


def test_keep_trying_retries_at_the_cap_until_the_camera_is_back(
    logs: pytest.LogCaptureFixture,
) -> None:
    """``after_attempts="keep_trying"``: after ``max_attempts`` failures the supervisor says so
    once (``retrying``), then tries every ``retry_delay`` seconds in state ``retrying`` with
    the reason and the next attempt's time in its health; the first frame of a session that
    works again is ``recovered`` and the health is normal again."""
    rec = Recorder()
    camera_back = asyncio.Event()
    attempts: list[float] = []

    async def camera(ctx: SupervisorContext) -> None:
        attempts.append(time.monotonic())
        ctx.started(None)
        if not camera_back.is_set():
            raise SourceError("connection refused", source_id=ctx.name)
        while True:
            ctx.alive()
            await asyncio.sleep(0.01)

    async def main() -> tuple[Health, Health, Health]:
        sup = Supervisor(
            "station_1",
            camera,
            backoff=Backoff(0.01, 2, 0.3, 0),
            max_attempts=2,
            after_attempts="keep_trying",
            on_event=rec,
        )
        rec.sup = sup
        await sup.start()
        await rec.until("retrying")
        await rec.until("restarting", 4)
        waiting = sup.health
        camera_back.set()
        await rec.until("recovered", within=5)
        recovered = sup.health
        await sup.stop()
        return waiting, recovered, sup.health

    waiting, recovered, stopped = asyncio.run(main())
    assert waiting.state is HealthState.RETRYING
    assert waiting.last_error == "SourceError: [station_1] connection refused"
    assert waiting.retrying_since is not None and waiting.next_attempt_at is not None
    assert waiting.next_attempt_at > waiting.since
    assert waiting.to_dict()["state"] == "retrying"
    # announced once, never given up
    assert len(rec.of("retrying")) == 1 and "failed" not in rec.types()
    retrying = rec.of("retrying")[0]
    assert retrying["attempts"] == 2 and retrying["delay"] == 0.3
    assert retrying["error"] == "SourceError: [station_1] connection refused"
    # the schedule: 0.01 s, then the cap (0.3 s) for every further attempt
    restarts = rec.of("restarting")
    assert [r["delay"] for r in restarts[:4]] == [0.01, 0.3, 0.3, 0.3]
    assert [r["retrying"] for r in restarts[:4]] == [False, True, True, True]
    gaps = [b - a for a, b in itertools.pairwise(attempts[1:5])]
    assert all(gap >= 0.29 for gap in gaps), gaps
    # back: recovered once, the health normal again
    assert rec.of("recovered")[0]["attempts"] >= 4
    assert recovered.state is HealthState.RUNNING
    assert recovered.retrying_since is None and recovered.next_attempt_at is None
    assert stopped.state is HealthState.STOPPED
    # the log: the first failure and the retrying in full, one line per later attempt, one
    # line when it is back
    error = "SourceError: [station_1] connection refused"
    messages = lines(logs, "station_1")
    attempts = rec.of("recovered")[0]["attempts"]
    assert messages[:4] == [
        f"Pipeline failed: {error}",
        "Restarting pipeline in 0.01s (attempt 1)",
        f"Pipeline failed 2 times in a row: {error}; retrying every 0.3s until it is back",
        "Restarting pipeline in 0.3s (attempt 2)",
    ]
    assert messages[4:-2] == [
        f"Restarting pipeline in 0.3s (attempt {n}), failed again: {error}"
        for n in range(3, attempts + 1)
    ]
    assert messages[-2].startswith(f"Pipeline is back after {attempts} failed attempts (")
    assert messages[-2].endswith("down): persistent pipeline started")
    assert messages[-1] == "Pipeline stopped"


def test_keep_trying_and_loop_are_checked() -> None:
    async def target(ctx: SupervisorContext) -> None:
        return None

    with pytest.raises(ValueError, match="after_attempts must be 'fail' or 'keep_trying'"):
        Supervisor("x", target, after_attempts="forever")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_delay must be > 0"):
        Supervisor("x", target, retry_delay=0)


def test_loop_starts_the_next_pass_at_once_and_an_empty_pass_is_a_failure() -> None:
    rec = Recorder()
    passes: list[int] = []

    async def recording(ctx: SupervisorContext) -> None:
        passes.append(ctx.attempt)
        ctx.started(None)
        if len(passes) <= 3:
            for _ in range(5):
                ctx.alive()
        # the fourth pass delivers nothing: that is not a pass, it is a failure

    async def main() -> Health:
        sup = Supervisor(
            "rec", recording, backoff=Backoff(0.01, 1, 0.01, 0), loop=True, on_event=rec
        )
        rec.sup = sup
        await sup.start()
        await rec.until("restarting", 2)
        await sup.stop()
        return sup.health

    health = asyncio.run(main())
    ended = rec.of("ended")
    assert [e.get("next_pass") for e in ended[:3]] == [True, True, True]
    assert passes[:4] == [0, 0, 0, 0]  # passes are not failures
    assert rec.of("restarting")[0]["attempt"] == 1
    assert health.frames == 15


# ---------------------------------------------------------------------------- no frame yet


def command_capture(source: CommandSource) -> Callable[[SupervisorContext], Awaitable[None]]:
    """A target running ``source``'s sessions as a pipeline does: ``started(pid)`` when the
    process is up (before its first frame), ``alive()`` for every frame."""

    async def capture(ctx: SupervisorContext) -> None:
        async with contextlib.aclosing(source.frames(ctx.started)) as frames:
            async for _ in frames:
                ctx.alive()

    return capture


def test_a_camera_that_connects_and_never_sends_is_starting_and_runs_out_of_attempts() -> None:
    """ffmpeg connects to a camera that accepts the connection and never answers: its process
    is up (``started(pid)``) but no frame comes. The session is starting, not running (the
    pid shown), ``start_timeout`` ends it, and a run without frames is never healthy, however
    long it lasts: ``max_attempts`` holds (``healthy_after`` is shorter than each session)."""
    need_tool("ffmpeg")
    rec = Recorder()
    seen: list[Health] = []
    with socket.socket() as camera:
        camera.bind(("127.0.0.1", 0))
        camera.listen(8)  # accepts, never answers
        url = f"rtsp://127.0.0.1:{camera.getsockname()[1]}/cam"
        argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-rtsp_transport", "tcp"]
        source = CommandSource([*argv, "-i", url, "-f", "mjpeg", "-"], "hung_cam")

        async def main() -> Health:
            sup = Supervisor(
                "hung_cam",
                command_capture(source),
                backoff=FAST,
                max_attempts=2,
                start_timeout=1.0,
                stall_timeout=1.5,
                healthy_after=0.2,
                on_event=rec,
            )
            rec.sup = sup
            await sup.start()
            try:
                pid = await wait_until_async("the capture's process", lambda: source.pid, 20)
                await asyncio.sleep(0.5)  # past healthy_after, within start_timeout
                seen.append(sup.health)
                assert pid == seen[0].pid
                return await asyncio.wait_for(sup.wait(), 30)
            finally:
                await sup.stop()

        health = asyncio.run(main())
    assert seen[0].state is HealthState.STARTING
    assert seen[0].started_at is None and seen[0].frames == 0
    assert health.state is HealthState.FAILED
    assert health.attempt == 2 and health.stalls == 2 and health.frames == 0
    assert rec.types() == ["stalled", "restarting", "stalled", "failed"]
    assert all(d["seconds"] >= 1.0 for d in rec.of("stalled"))
    assert health.last_error is not None
    assert "not started within" in health.last_error and "no frame yet" in health.last_error


def test_start_timeout_bounds_the_wait_for_the_first_frame_not_stall_timeout() -> None:
    """A capture whose process is up at once but whose first frame takes a while (a camera
    slow to open) is starting until that frame: ``start_timeout`` applies, not the shorter
    ``stall_timeout``; the session then runs without a stall."""
    need_tool("ffmpeg")
    rec = Recorder()
    ffmpeg = "ffmpeg -hide_banner -loglevel error -re -f lavfi -i testsrc=size=160x120:rate=10"
    source = CommandSource(["sh", "-c", f"sleep 1.5; exec {ffmpeg} -f mjpeg -"], "slow_open")

    async def main() -> tuple[Health, Health]:
        sup = Supervisor(
            "slow_open",
            command_capture(source),
            backoff=FAST,
            stall_timeout=0.5,
            start_timeout=30.0,
            on_event=rec,
        )
        rec.sup = sup
        await sup.start()
        try:
            await wait_until_async("the capture's process", lambda: source.pid, 20)
            opening = sup.health
            await rec.until("started", within=30)
            await wait_until_async("5 frames", lambda: sup.health.frames >= 5, 30)
            return opening, sup.health
        finally:
            await sup.stop()

    opening, running = asyncio.run(main())
    assert opening.state is HealthState.STARTING and opening.pid is not None
    assert running.state is HealthState.RUNNING
    assert running.stalls == 0 and running.restarts == 0
    assert rec.of("started")[0]["pid"] == opening.pid
    assert "stalled" not in rec.types()
