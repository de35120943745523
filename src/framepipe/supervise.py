"""Keep a long-lived thing alive: a capture subprocess, a pipeline task, a worker.

A :class:`Supervisor` runs one *session* of its target at a time. A target is an async
function ``target(ctx)``: it opens its capture, calls ``ctx.started(pid)``, then calls
``ctx.alive()`` for every frame until the capture ends (return) or fails (raise). A session
runs once it called ``started()`` and delivered a frame: until its first frame it is
*starting*, whatever ``started()`` said (a camera that accepts the connection and never
sends is not running)::

    async def capture(ctx: SupervisorContext) -> None:
        proc = await asyncio.create_subprocess_exec("gst-launch-1.0", ...)
        try:
            ctx.started(proc.pid)
            ...                       # read frames, ctx.alive() for each
            code = await proc.wait()
            raise CaptureExitedError("capture exited", exit_code=code)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    sup = Supervisor("station_1", capture, stall_timeout=5.0)
    await sup.start()
    ...
    await sup.stop()

Guarantees:

* Death is noticed at once: the supervising task awaits the session task itself; nothing polls.
* A stall (no ``alive()`` for ``stall_timeout`` seconds once running, or no first frame
  within ``start_timeout`` of the launch) is detected by a timer that never fires early; the
  session is cancelled and the failure recorded as a
  :class:`~framepipe.errors.SourceStalledError`.
* Failures are restarted after ``backoff.delay(attempt)`` (2, 4, 8 ... 60 s with jitter by
  default) until ``max_attempts`` consecutive failures; a run that stayed up for
  ``healthy_after`` seconds after its first frame resets the count (a session that never
  delivers a frame never does, however long its process lives). Then, by default, the
  supervisor gives up (state ``failed``, event ``failed``); with
  ``after_attempts="keep_trying"`` it keeps trying
  every ``retry_delay`` seconds (the backoff's cap by default) in state ``retrying`` (event
  ``retrying`` once, health ``retrying_since`` and ``next_attempt_at``) until a session
  delivers a frame again (event ``recovered``, health back to normal).
* A failure whose exception is ``permanent`` (True for
  :class:`~framepipe.errors.InvalidSourceError`: a local file that is not a video, so
  every session would fail alike) is not restarted: state ``failed`` and event ``failed``
  (with ``permanent``) at once, whatever ``max_attempts`` and ``after_attempts`` say.
* The log stays short while a thing stays down: a failure is logged in full when it begins a
  run of failures or differs in kind from the one before; a repeat is one line (the restart
  with its error). One line says it is back: ``Persistent pipeline started``, or after
  retrying at the cap ``Pipeline is back after ...`` instead.
* With ``loop`` (a looped recording, one pass per session), a session that returns normally
  after at least one frame is the end of a pass: the next starts at once, not counted as a
  failure.
* Only one session runs at a time; a new one is launched only after the previous one ended
  (cleanup included).
* ``stop()`` cancels the session (the target sees ``CancelledError`` and must clean up) or the
  backoff sleep, and returns once the session has ended.
* Every state change is visible in :attr:`Supervisor.health` (a
  :class:`~framepipe.health.HealthState` machine: starting -> running (the first frame) ->
  stalled/backoff -> starting ... -> failed or stopped), in the logs (``[station_1] Pipeline
  subprocess died (exit code: -9)``) and as ``on_event`` callbacks.
* Nothing dies silently: a bug in the supervisor itself is logged with its traceback and ends
  the supervisor in state ``failed``; a raising ``on_event`` callback is logged and ignored.
* No URL's secret shows: every URL in a failure's text (health ``last_error``, the events, the
  log messages) and in a logged stderr line is shown by :func:`framepipe.urls.safe_url` (its
  password and secret query values masked). The traceback logged for an exception of an
  unexpected type is the exception's own.

The module is one concept, one supervisor's state machine: a :class:`SupervisorContext` writes
its supervisor's per-frame fields and hands ``started()`` to it, so it means nothing apart from
:class:`Supervisor`. The machine's states and its snapshot are in :mod:`framepipe.health`; its
parts with a state of their own beside it: the stall watchdog
(:mod:`framepipe.supervise_stall`), the answer to a failure and the restart rule
(:mod:`framepipe.supervise_restarts`), the health record, log and ``on_event`` callback
(:mod:`framepipe.supervise_report`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Awaitable
from typing import Literal, Protocol

from framepipe.backoff import Backoff
from framepipe.health import Health, HealthState
from framepipe.supervise_report import EventCallback, Reporter, describe_error, format_delay
from framepipe.supervise_restarts import Restarts
from framepipe.supervise_stall import StallWatchdog

__all__ = [
    "EventCallback",
    "SupervisedTarget",
    "Supervisor",
    "SupervisorContext",
]


class SupervisedTarget(Protocol):
    """One session of a supervised thing: runs until it ends (return) or fails (raise)."""

    def __call__(self, ctx: SupervisorContext, /) -> Awaitable[None]: ...


class SupervisorContext:
    """What one session of a supervised target receives.

    A context belongs to one session: once that session ended, its ``started()`` and
    ``alive()`` calls are ignored, so a lingering thread cannot mask a stall of the next one.
    """

    __slots__ = ("_active", "_framed", "_opened", "_restarts", "_sup", "_watch", "attempt", "name")

    def __init__(self, supervisor: Supervisor, attempt: int) -> None:
        self._sup = supervisor
        self._watch = supervisor._watch
        self._restarts = supervisor._restarts
        self._active = True
        self._opened = False  # started() was handled
        self._framed = False  # alive() was called
        self.name = supervisor.name
        """The supervised component's name (``station_1``)."""
        self.attempt = attempt
        """Consecutive failures before this session (0 for a first or healthy start)."""

    def started(self, pid: int | None = None) -> None:
        """The capture is open (``pid``: its process, shown in the health at once). The
        session runs at its first frame: state -> running, the healthy timer armed, logs
        ``Persistent pipeline started (PID: n)``, event ``started``; until then it is starting
        and ``start_timeout`` applies.

        Call it once per session; later calls are ignored. Safe to call from another thread
        (the update is then handed to the event loop).
        """
        sup = self._sup
        if threading.get_ident() != sup._loop_thread and sup._loop is not None:
            sup._loop.call_soon_threadsafe(sup._on_started, self, pid)
            return
        sup._on_started(self, pid)

    def alive(self) -> None:
        """A frame arrived: resets the stall timer and counts the frame.

        Cheap enough to call for every frame (a flag test, a counter, a clock read). Only the
        session's first frame (it begins running) and the first after retrying at the cap
        touch the event loop (from another thread, handed to it), so it may also be called
        from a thread.
        """
        if self._active:
            sup = self._sup
            sup._frames += 1
            self._watch.last_frame = time.monotonic()
            if not self._framed:
                self._framed = True
                if threading.get_ident() == sup._loop_thread:
                    sup._on_first_frame(self)
                elif sup._loop is not None:
                    sup._loop.call_soon_threadsafe(sup._on_first_frame, self)
            restarts = self._restarts
            if restarts.retrying:
                restarts.retrying = False
                if sup._loop is not None:
                    sup._loop.call_soon_threadsafe(restarts.recovered, self.attempt)

    def waiting(self) -> None:
        """The source is alive but waits for the pipeline to take its frame: resets the stall
        timer without counting a frame (waiting for a slow pipeline is not a stall)."""
        if self._active:
            self._watch.last_frame = time.monotonic()

    def __repr__(self) -> str:
        return f"SupervisorContext({self.name!r}, attempt={self.attempt})"


class Supervisor:
    """Runs ``target`` sessions one after another, restarting failures with backoff.

    ``name`` is the component name used in logs (``[station_1] ...``), health and events.
    ``what`` names the thing in log lines (``Pipeline stalled``, ``Restarting pipeline``).
    ``max_attempts=None`` restarts forever. ``stall_timeout=None`` disables stall detection;
    ``start_timeout`` (default: ``stall_timeout``) bounds launch -> the first frame (a
    capture slow to open its input gets a longer one).
    ``restart_on_end`` says whether a session that returns normally is restarted (a live
    camera: it counts as a failure for backoff and ``max_attempts``) or ends the supervisor in
    state ``stopped`` (a file). ``loop`` makes a normal end after frames the end of one pass
    of a looped recording: the next session starts at once. ``after_attempts`` says what
    happens after ``max_attempts`` consecutive failures: ``"fail"`` (give up) or
    ``"keep_trying"`` (every ``retry_delay`` seconds, default the backoff's maximum, until a
    session delivers a frame).

    Events (``on_event(type, data)``, data always with ``name``): ``started`` {pid, attempt}
    (the session's first frame),
    ``died`` {error, exit_code}, ``stalled`` {seconds, error}, ``restarting`` {delay, attempt,
    retrying, next_attempt_at}, ``failed`` {error, attempts}, ``retrying`` {error, attempts,
    delay, next_attempt_at} (once when retrying at the cap begins), ``recovered`` {attempts,
    down_seconds}, ``stopped`` {}, ``ended`` {restart}.
    """

    def __init__(
        self,
        name: str,
        target: SupervisedTarget,
        *,
        backoff: Backoff | None = None,
        max_attempts: int | None = 5,
        stall_timeout: float | None = None,
        start_timeout: float | None = None,
        healthy_after: float = 30.0,
        restart_on_end: bool = True,
        loop: bool = False,
        after_attempts: Literal["fail", "keep_trying"] = "fail",
        retry_delay: float | None = None,
        on_event: EventCallback | None = None,
        what: str = "pipeline",
        description: str | None = None,
    ) -> None:
        if not name:
            raise ValueError("a supervisor needs a name")
        if max_attempts is not None and max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1 or None, got {max_attempts}")
        if stall_timeout is not None and stall_timeout <= 0:
            raise ValueError(f"stall_timeout must be > 0 or None, got {stall_timeout}")
        if start_timeout is not None and start_timeout <= 0:
            raise ValueError(f"start_timeout must be > 0 or None, got {start_timeout}")
        if healthy_after < 0:
            raise ValueError(f"healthy_after must be >= 0, got {healthy_after}")
        if after_attempts not in ("fail", "keep_trying"):
            raise ValueError(
                f"after_attempts must be 'fail' or 'keep_trying', not {after_attempts!r}"
            )
        if retry_delay is not None and retry_delay <= 0:
            raise ValueError(f"retry_delay must be > 0 or None, got {retry_delay}")
        self.name = name
        self.what = what
        self._target = target
        self._restart_on_end = restart_on_end or loop
        self._loop_on_end = loop
        if description is None:
            description = getattr(target, "__qualname__", None) or repr(target)
        self._report = Reporter(name, what, description, on_event)
        self._health = self._report.health
        self._log = self._report.log
        self._What = self._report.What
        backoff = backoff if backoff is not None else Backoff(2.0, 2.0, 60.0, 0.1)
        self._restarts = Restarts(
            self._report,
            backoff=backoff,
            max_attempts=max_attempts,
            after_attempts=after_attempts,
            retry_delay=retry_delay if retry_delay is not None else backoff.maximum,
            healthy_after=healthy_after,
        )
        self._watch = StallWatchdog(
            self._report,
            stall_timeout=stall_timeout,
            start_timeout=start_timeout if start_timeout is not None else stall_timeout,
        )
        self._frames = 0  # alive() calls over all sessions, counted by SupervisorContext
        # lifecycle
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._closed = False
        # the current session
        self._session: asyncio.Task[None] | None = None
        self._session_running = False  # the session called started() and delivered a frame
        self._session_first_frame = 0

    # ------------------------------------------------------------------ public API

    @property
    def health(self) -> Health:
        """A snapshot of the current health (a copy: later changes do not show in it)."""
        last_frame_at = None
        if self._frames:
            last_frame_at = time.time() - (time.monotonic() - self._watch.last_frame)
        return dataclasses.replace(self._health, frames=self._frames, last_frame_at=last_frame_at)

    @property
    def running(self) -> bool:
        """True from ``start()`` until the supervisor ends (stopped, ended or failed)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Launch the supervising task and return at once (the first session starts on the
        next loop iteration). Raises ``RuntimeError`` if already started or stopped."""
        if self._closed:
            raise RuntimeError(f"supervisor {self.name!r} was stopped; create a new one")
        if self._task is not None:
            raise RuntimeError(f"supervisor {self.name!r} is already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._report.enter(HealthState.STARTING)
        self._task = self._loop.create_task(self._supervise(), name=f"supervise:{self.name}")

    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (a grace period)
        """Stop supervising: cancel the running session (or the backoff sleep), wait up to
        ``timeout`` seconds for it to end, then state -> stopped and ``Pipeline stopped``.

        A session that ignores its cancellation longer than ``timeout`` is abandoned with a
        warning. Calling ``stop()`` again (or after the supervisor ended) only waits; the
        state of a supervisor that had failed stays ``failed``.
        """
        first = not self._closed
        self._closed = True
        self._stopping = True
        self._watch.stop()
        task = self._task
        if task is None:
            if first:
                self._finish_stopped()
                self._done.set()
            return
        if task.done():
            return
        self._wake.set()
        session = self._session
        if session is not None and not session.done():
            session.cancel()
        done, _ = await asyncio.wait((task,), timeout=timeout)
        if not done:
            self._log.warning(
                "%s did not stop within %s; abandoning its session",
                self._What,
                format_delay(timeout),
            )
            task.cancel()
            await asyncio.wait((task,), timeout=1.0)
            self._finish_stopped()

    async def wait(self) -> Health:
        """Wait until the supervisor ends (stopped, ended or failed); return its health.

        Raises ``RuntimeError`` if it was never started (nor stopped)."""
        if self._task is None and not self._closed:
            raise RuntimeError(f"supervisor {self.name!r} is not started")
        await self._done.wait()
        return self.health

    async def __aenter__(self) -> Supervisor:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"Supervisor({self.name!r}, state={self._health.state.value})"

    # ------------------------------------------------------------------ supervising task

    async def _supervise(self) -> None:
        try:
            while not self._stopping:
                outcome = await self._run_session()
                if self._stopping:
                    stall = self._watch.stall
                    if isinstance(outcome, Exception) and (
                        stall is None or outcome is not stall.error
                    ):
                        self._log.warning(
                            "%s raised while stopping: %s", self._What, describe_error(outcome)
                        )
                    break
                if (
                    outcome is None
                    and self._loop_on_end
                    and self._frames > self._session_first_frame
                ):
                    self._report.clear_run()
                    self._health.attempt = 0
                    self._log.info("%s reached the end of its input; next pass", self._What)
                    self._report.emit("ended", {"restart": True, "next_pass": True})
                    continue
                if outcome is None and not self._restart_on_end:
                    self._report.clear_run()
                    self._report.enter(HealthState.STOPPED)
                    self._log.info("%s ended", self._What)
                    self._report.emit("ended", {"restart": False})
                    return
                delay = self._restarts.failed(outcome, self._watch.stall)
                if delay is None:
                    return
                if await self._sleep(delay):
                    break
                self._health.restarts += 1
            self._finish_stopped()
        except asyncio.CancelledError:
            self._finish_stopped()
            raise
        except Exception as exc:
            self._log.exception("Supervisor of %s crashed", self.what)
            self._report.clear_run()
            self._health.last_error = f"supervisor crashed: {describe_error(exc)}"
            self._report.enter(HealthState.FAILED)
            self._report.emit(
                "failed", {"error": self._health.last_error, "attempts": self._health.attempt}
            )
        finally:
            session = self._session
            if session is not None and not session.done():
                session.cancel()
            self._watch.end()
            self._restarts.ended()
            self._done.set()

    async def _call_target(self, ctx: SupervisorContext) -> None:
        await self._target(ctx)

    async def _run_session(self) -> BaseException | None:
        """Run one session to its end; return its failure (None: it returned normally)."""
        assert self._loop is not None
        ctx = SupervisorContext(self, self._health.attempt)
        self._session_running = False
        self._session_first_frame = self._frames
        self._report.clear_run()
        self._restarts.launched()
        self._report.enter(HealthState.STARTING)
        task = self._loop.create_task(self._call_target(ctx), name=f"{self.name}:session")
        self._session = task
        self._watch.watch(self._loop, task)
        try:
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            ctx._active = False
            self._watch.end()
            self._restarts.ended()
            self._session = None
        if self._watch.stall is not None:
            return self._watch.stall.error
        if task.cancelled():
            return asyncio.CancelledError("the session was cancelled outside the supervisor")
        return task.exception()

    async def _sleep(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; return True at once when ``stop()`` is called."""
        try:
            await asyncio.wait_for(self._wake.wait(), delay)
        except TimeoutError:
            return self._stopping
        return True

    # ------------------------------------------------------------------ session callbacks

    def _on_started(self, ctx: SupervisorContext, pid: int | None) -> None:
        if not ctx._active or ctx._opened or self._stopping or self._watch.stall is not None:
            return
        ctx._opened = True
        self._watch.opened()
        self._health.pid = pid
        if ctx._framed:  # its first frame came before started()
            self._on_running(ctx)

    def _on_first_frame(self, ctx: SupervisorContext) -> None:
        if ctx._opened and not self._session_running:
            self._on_running(ctx)

    def _on_running(self, ctx: SupervisorContext) -> None:
        """The session called ``started()`` and delivered a frame: it runs."""
        if (
            not ctx._active
            or self._session_running
            or self._stopping
            or self._watch.stall is not None
        ):
            return
        assert self._loop is not None
        self._session_running = True
        h = self._health
        pid = h.pid
        self._report.enter(HealthState.RUNNING)
        h.started_at = h.since
        if h.retrying_since is not None:
            pass  # back from retrying at the cap: the line that says so names the pid
        elif pid is None:
            self._log.info("Persistent %s started", self.what)
        else:
            self._log.info("Persistent %s started (PID: %d)", self.what, pid)
        self._watch.running()
        self._restarts.running(self._loop)
        self._report.emit("started", {"pid": pid, "attempt": ctx.attempt})

    def _finish_stopped(self) -> None:
        """State -> stopped, once; a failed or already stopped supervisor keeps its state."""
        if self._health.state in (HealthState.STOPPED, HealthState.FAILED):
            return
        self._report.clear_run()
        self._report.enter(HealthState.STOPPED)
        self._log.info("%s stopped", self._What)
        self._report.emit("stopped", {})
