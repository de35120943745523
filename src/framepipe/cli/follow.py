"""Following one execution to its end (``run``, ``jobs retry``, ``demo``): the progress view,
the summary, and Ctrl-C / SIGTERM.

Guarantees: the first SIGINT or SIGTERM asks the client to interrupt the execution (running
steps get ``shutdown_grace`` seconds) and the command then exits ``128 + signal`` with the
``jobs retry`` hint; a second one exits at once with the same code. A signal that arrives
before the execution exists interrupts it as soon as it does. Without a signal the exit code is
0 for a completed execution and 1 otherwise, each failed step named on stderr.
"""

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from framepipe.cli.common import (
    STATUS_STYLE,
    console,
    dump_json,
    duration,
    first_line,
    flush_std,
    say,
)
from framepipe.cli.progress import ProgressView
from framepipe.config import Settings
from framepipe.jobs.client import JobClient
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepStatus

__all__ = ["Begin", "follow", "follow_and_exit"]

Begin = Callable[[JobClient], Awaitable[str]]
"""Starts the execution to follow (submit or retry) on the client given; returns its id."""


@dataclass
class _Run:
    signum: int | None = None
    execution_id: str | None = None
    interrupting: asyncio.Task[None] | None = None


def _hint(err: Console, execution_id: str | None) -> None:
    if execution_id is None:
        say(err, "interrupted before the execution started", "yellow")
    else:
        say(err, f"interrupted: resume with `framepipe jobs retry {execution_id}`", "yellow")


async def follow(
    settings: Settings,
    begin: Begin,
    *,
    label: str,
    quiet: bool,
    as_json: bool,
    concurrency: int | None,
) -> tuple[int, bool]:
    """Start an execution with ``begin`` and follow it to its end with the progress display and
    Ctrl-C / SIGTERM handling. Returns (exit code, interrupted by a signal)."""
    loop = asyncio.get_running_loop()
    err, out = console(stderr=True), console()
    state = _Run()
    client = JobClient(settings=settings, concurrency=concurrency)
    view = None if quiet else ProgressView(err, label)
    began = time.monotonic()

    def on_signal(signum: int) -> None:
        if state.signum is not None:
            if view is not None:
                view.stop()
            _hint(err, state.execution_id)
            flush_std()
            os._exit(128 + signum)
        state.signum = signum
        say(
            err,
            f"{signal.Signals(signum).name}: stopping; running steps get "
            f"{settings.shutdown_grace:g}s to stop (send it again to exit at once)",
            "yellow",
        )
        if state.execution_id is not None and state.interrupting is None:
            state.interrupting = loop.create_task(client.interrupt())

    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        async with client:
            await client.start(engine=True)
            for sig in signals:
                loop.add_signal_handler(sig, on_signal, sig)
            remove_listener = None
            try:
                if view is not None:
                    remove_listener = client.bus.add_listener(view.on_event)
                    view.start()
                execution_id = await begin(client)
                state.execution_id = execution_id
                if state.signum is not None and state.interrupting is None:
                    state.interrupting = loop.create_task(client.interrupt())
                if view is not None:
                    view.prime(await client.get(execution_id))
                info = await client.wait(execution_id, raise_on_failure=False)
                if state.interrupting is not None:
                    await state.interrupting
            finally:
                if view is not None:
                    view.stop()
                if remove_listener is not None:
                    remove_listener()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)

    if as_json:
        dump_json(info.to_dict())
    else:
        _summary(out, info, time.monotonic() - began)
    return _outcome(err, info, state.signum)


def _outcome(err: Console, info: ExecutionInfo, signum: int | None) -> tuple[int, bool]:
    """Say why an execution did not complete; (exit code, interrupted by a signal)."""
    if info.status is ExecutionStatus.COMPLETED:
        return 0, signum is not None
    for key, text in info.errors.items():
        say(err, f"step '{key}' failed: {first_line(text)}", "red")
    if info.status is ExecutionStatus.INTERRUPTED or signum is not None:
        _hint(err, info.id)
    elif not info.errors:
        say(err, f"execution {info.status.value}: {first_line(info.error) or 'no error'}", "red")
    if signum is not None:
        return 128 + signum, True
    return 1, False


def _summary(out: Console, info: ExecutionInfo, took: float) -> None:
    done = sum(1 for s in info.steps if s.status is StepStatus.COMPLETED)
    line = Text()
    line.append(info.status.value, style=f"bold {STATUS_STYLE.get(info.status.value, '')}")
    line.append(f"  pipeline {info.pipeline}  execution {info.id}")
    out.print(line, soft_wrap=True)
    keys = ", ".join(info.data) if info.data else "(none)"
    say(
        out,
        f"  duration {duration(took)} · steps {done}/{len(info.steps)} · "
        f"progress {info.progress:.0f}% · data: {keys}",
    )


def follow_and_exit(
    settings: Settings,
    begin: Begin,
    *,
    label: str,
    quiet: bool,
    as_json: bool,
    concurrency: int | None,
) -> NoReturn:
    """:func:`follow` in a new event loop, then exit with its code."""
    code, interrupted = asyncio.run(
        follow(settings, begin, label=label, quiet=quiet, as_json=as_json, concurrency=concurrency)
    )
    if interrupted:
        # Step threads may still be running (they were asked to stop and given the grace
        # period); the store already holds the state, so leave without waiting for them.
        flush_std()
        os._exit(code)
    raise typer.Exit(code)
