"""The ``framepipe`` command line.

::

    framepipe run FILE.py:PIPELINE --input key=value ...   run one execution to its end
    framepipe jobs list | show ID | retry ID | cancel ID    executions in the state store
    framepipe worker                                        run distributed job steps
    framepipe serve --pipeline FILE.py:NAME                 the HTTP API and live events
    framepipe demo                                          the embedded demo
    framepipe db upgrade | current                          the state database's schema

Exit codes: 0 done; 1 the execution failed or was cancelled, or a framepipe error (unknown id,
not retryable ...); 2 bad usage, a bad pipeline definition or bad settings; 130 / 143 when
Ctrl-C / SIGTERM interrupted the execution (it stays resumable with ``framepipe jobs retry``).
Progress and messages go to stderr, results (summaries, tables, ``--json``) to stdout.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import sqlalchemy as sa
import typer
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from framepipe import __version__
from framepipe.backends.state import SCHEMA_HEAD, StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import (
    ConfigError,
    FramepipeError,
    InvalidInputError,
    MissingDependencyError,
    PipelineDefinitionError,
    StateStoreError,
)
from framepipe.events import Event
from framepipe.jobs.client import JobClient, check_retryable
from framepipe.jobs.loading import LoadedPipeline, resolve_pipeline, resolve_target
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.sync_client import SyncJobClient
from framepipe.logs import configure_logging

__all__ = ["app", "main"]

MAX_STEP_ROWS = 8

app = typer.Typer(name="framepipe", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_show_locals=False,
                  help="Video pipelines that keep running: batch jobs, embedded or distributed.")
jobs_app = typer.Typer(no_args_is_help=True, help="Executions in the state store.")
db_app = typer.Typer(no_args_is_help=True, help="The state database's schema.")
app.add_typer(jobs_app, name="jobs")
app.add_typer(db_app, name="db")

_STATUS_STYLE = {
    "pending": "dim", "ready": "blue", "running": "cyan", "retrying": "yellow",
    "completed": "green", "failed": "red", "cancelled": "magenta", "interrupted": "yellow",
}


# -- plumbing -------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A CLI usage problem: printed as one line, exit code 2."""


@dataclass
class _Globals:
    overrides: dict[str, Any] = field(default_factory=dict)


class _StderrProxy:
    """A stream that always writes to the current ``sys.stderr``, so log lines go through Rich's
    live-display redirection (and through test runners that swap the stream)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _console(*, stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False)


def _say(console: Console, message: str, style: str | None = None) -> None:
    console.print(Text(message, style=style or ""), soft_wrap=True)


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def _die(message: str, code: int) -> NoReturn:
    _say(_console(stderr=True), f"error: {_one_line(message)}", "red")
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn framepipe's errors into one red line on stderr and the documented exit code."""
    try:
        yield
    except _UsageError as exc:
        _die(str(exc), 2)
    except (ConfigError, PipelineDefinitionError, MissingDependencyError,
            InvalidInputError) as exc:
        _die(str(exc), 2)
    except FramepipeError as exc:
        _die(str(exc), 1)
    except sa.exc.SQLAlchemyError as exc:
        _die(f"state database error: {getattr(exc, 'orig', None) or exc}", 1)
    except KeyboardInterrupt:
        _die("interrupted", 130)


def _settings(ctx: typer.Context, **extra: Any) -> Settings:
    globals_ = ctx.find_object(_Globals) or _Globals()
    overrides = {**globals_.overrides, **{k: v for k, v in extra.items() if v is not None}}
    settings = load_settings(**overrides)
    configure_logging(settings.log_level, stream=_StderrProxy())
    return settings


def _open_store(settings: Settings, *, migrate: bool = True) -> StateStore:
    """The state store (for the schema commands and the service; executions go through the
    job client, which opens its own)."""
    return StateStore(settings.resolved_database_url,
                      sqlite_synchronous=settings.sqlite_synchronous, migrate=migrate)


def _flush_std() -> None:
    for handler in logging.getLogger("framepipe").handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _when(ts: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return datetime.fromtimestamp(ts).strftime(fmt) if ts else "-"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _first_line(text: str | None) -> str:
    if not text:
        return ""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _status_text(status: str) -> Text:
    return Text(status, style=_STATUS_STYLE.get(status, ""))


def _dump_json(value: Any) -> None:
    typer.echo(json.dumps(value, default=str, indent=2))


# -- inputs ---------------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(name)


def _parse_value(text: str) -> Any:
    """JSON when ``text`` is valid JSON (numbers, lists, objects, true/false/null), else the
    string itself (NaN and Infinity stay strings: they cannot be stored)."""
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return text


def parse_inputs(pairs: list[str], inputs_json: Path | None = None) -> dict[str, Any]:
    """The execution's inputs from ``--inputs-json FILE`` then ``--input KEY=VALUE`` pairs
    (which win); a key given several times becomes a list of its values."""
    inputs: dict[str, Any] = {}
    if inputs_json is not None:
        try:
            loaded = json.loads(inputs_json.read_text(encoding="utf-8"))
        except OSError as exc:
            raise _UsageError(f"--inputs-json {inputs_json}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise _UsageError(f"--inputs-json {inputs_json}: not valid JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise _UsageError(f"--inputs-json {inputs_json}: must hold a JSON object, "
                              f"not {type(loaded).__name__}")
        inputs.update(loaded)
    given: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _UsageError(f"--input {pair!r}: expected KEY=VALUE")
        given.setdefault(key, []).append(_parse_value(value))
    for key, values in given.items():
        inputs[key] = values[0] if len(values) == 1 else values
    return inputs


# -- the progress display ------------------------------------------------------------------------


class _ProgressView:
    """One overall bar and one bar per running step (at most ``max_rows``, then "+N more")."""

    def __init__(self, console: Console, label: str, *, max_rows: int = MAX_STEP_ROWS) -> None:
        self.max_rows = max_rows
        self.overall = Progress(
            TextColumn("{task.description}", markup=False, style="bold"), BarColumn(),
            TaskProgressColumn(), TextColumn("{task.fields[steps]}", markup=False),
            TimeElapsedColumn(), console=console)
        self.rows = Progress(
            TextColumn("  {task.description}", markup=False), BarColumn(bar_width=24),
            TaskProgressColumn(), TextColumn("{task.fields[message]}", markup=False, style="dim"),
            console=console)
        self.overall_task = self.overall.add_task(label, total=100, steps="")
        self.shown: dict[str, TaskID] = {}
        self.hidden: dict[str, tuple[float, str]] = {}
        self.known: set[str] = set()
        self.done: set[str] = set()
        self.progress = 0.0
        self.live = Live(self, console=console, transient=True, refresh_per_second=8)
        self._count()

    def __rich__(self) -> RenderableType:
        parts: list[RenderableType] = [self.overall]
        if self.shown:
            parts.append(self.rows)
        if self.hidden:
            parts.append(Text(f"  +{len(self.hidden)} more running", style="dim"))
        return Group(*parts)

    def start(self) -> None:
        self.live.start()

    def stop(self) -> None:
        self.live.stop()

    def prime(self, info: ExecutionInfo) -> None:
        """Take the steps already in the store (initial ones, completed before a retry)."""
        self.known.update(s.key for s in info.steps)
        self.done.update(s.key for s in info.steps if s.status is StepStatus.COMPLETED)
        self._set_overall(info.progress)

    def on_event(self, event: Event) -> None:
        kind, key, data = event.type, event.step_key, event.data
        if key is not None:
            if kind == "step.spawned":
                self.known.add(key)
            elif kind == "step.started":
                self.known.add(key)
                self._show(key)
            elif kind == "step.progress":
                self._update(key, float(data.get("progress") or 0.0),
                             str(data.get("message") or ""))
            elif kind == "step.completed":
                self.done.add(key)
                self._hide(key)
            elif kind in ("step.failed", "step.cancelled", "step.interrupted", "step.retrying"):
                self._hide(key)
        value = data.get("execution_progress")
        if value is None and kind.startswith("execution."):
            value = data.get("progress")
        if isinstance(value, (int, float)):
            self._set_overall(float(value))
        self._count()

    def _set_overall(self, value: float) -> None:
        self.progress = max(self.progress, value)
        self.overall.update(self.overall_task, completed=self.progress)

    def _count(self) -> None:
        self.overall.update(self.overall_task, steps=f"{len(self.done)}/{len(self.known)} steps")

    def _show(self, key: str, pct: float = 0.0, message: str = "") -> None:
        if key in self.shown:
            self.rows.update(self.shown[key], completed=pct, message=message)
        elif len(self.shown) < self.max_rows:
            self.hidden.pop(key, None)
            task = self.rows.add_task(key, total=100, message=message)
            self.rows.update(task, completed=pct)
            self.shown[key] = task
        else:
            self.hidden[key] = (pct, message)

    def _update(self, key: str, pct: float, message: str) -> None:
        if key in self.shown:
            self.rows.update(self.shown[key], completed=pct, message=message)
        elif key in self.hidden:
            self.hidden[key] = (pct, message)

    def _hide(self, key: str) -> None:
        self.hidden.pop(key, None)
        task = self.shown.pop(key, None)
        if task is None:
            return
        self.rows.remove_task(task)
        if self.hidden:
            promoted = next(iter(self.hidden))
            pct, message = self.hidden.pop(promoted)
            self._show(promoted, pct, message)


# -- following an execution (run and retry) ----------------------------------------------------


@dataclass
class _Run:
    signum: int | None = None
    execution_id: str | None = None
    interrupting: asyncio.Task[None] | None = None


def _hint(console: Console, execution_id: str | None) -> None:
    if execution_id is None:
        _say(console, "interrupted before the execution started", "yellow")
    else:
        _say(console, f"interrupted: resume with `framepipe jobs retry {execution_id}`",
             "yellow")


Begin = Callable[[JobClient], Awaitable[str]]


async def _follow(settings: Settings, begin: Begin, *, label: str, quiet: bool, as_json: bool,
                  concurrency: int | None) -> tuple[int, bool]:
    """Start an execution with ``begin`` and follow it to its end with the progress display and
    Ctrl-C / SIGTERM handling. Returns (exit code, interrupted by a signal)."""
    loop = asyncio.get_running_loop()
    err, out = _console(stderr=True), _console()
    state = _Run()
    client = JobClient(settings=settings, concurrency=concurrency)
    view = None if quiet else _ProgressView(err, label)
    began = time.monotonic()

    def on_signal(signum: int) -> None:
        if state.signum is not None:
            if view is not None:
                view.stop()
            _hint(err, state.execution_id)
            _flush_std()
            os._exit(128 + signum)
        state.signum = signum
        _say(err, f"{signal.Signals(signum).name}: stopping; running steps get "
                  f"{settings.shutdown_grace:g}s to stop (send it again to exit at once)",
             "yellow")
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
        _dump_json(info.to_dict())
    else:
        _summary(out, info, time.monotonic() - began)
    if info.status is ExecutionStatus.COMPLETED:
        return 0, state.signum is not None
    for key, text in info.errors.items():
        _say(err, f"step '{key}' failed: {_first_line(text)}", "red")
    if info.status is ExecutionStatus.INTERRUPTED or state.signum is not None:
        _hint(err, info.id)
    elif not info.errors:
        _say(err, f"execution {info.status.value}: {_first_line(info.error) or 'no error'}",
             "red")
    if state.signum is not None:
        return 128 + state.signum, True
    return 1, False


def _summary(console: Console, info: ExecutionInfo, duration: float) -> None:
    done = sum(1 for s in info.steps if s.status is StepStatus.COMPLETED)
    line = Text()
    line.append(info.status.value, style=f"bold {_STATUS_STYLE.get(info.status.value, '')}")
    line.append(f"  pipeline {info.pipeline}  execution {info.id}")
    console.print(line, soft_wrap=True)
    keys = ", ".join(info.data) if info.data else "(none)"
    _say(console, f"  duration {_duration(duration)} · steps {done}/{len(info.steps)} · "
                  f"progress {info.progress:.0f}% · data: {keys}")


def _follow_and_exit(settings: Settings, begin: Begin, *, label: str, quiet: bool,
                     as_json: bool, concurrency: int | None) -> NoReturn:
    code, interrupted = asyncio.run(_follow(settings, begin, label=label, quiet=quiet,
                                            as_json=as_json, concurrency=concurrency))
    if interrupted:
        # Step threads may still be running (they were asked to stop and given the grace
        # period); the store already holds the state, so leave without waiting for them.
        _flush_std()
        os._exit(code)
    raise typer.Exit(code)


# -- commands -------------------------------------------------------------------------------------


def _version(value: bool) -> None:
    if value:
        typer.echo(f"framepipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    home: Annotated[Path | None, typer.Option(
        "--home", help="Folder of the embedded state and objects (FRAMEPIPE_HOME).")] = None,
    database_url: Annotated[str | None, typer.Option(
        "--database-url", help="State database URL (FRAMEPIPE_DATABASE_URL).")] = None,
    log_level: Annotated[str | None, typer.Option(
        "--log-level", help="DEBUG, INFO, WARNING, ERROR (FRAMEPIPE_LOG_LEVEL).")] = None,
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """framepipe: video pipelines that keep running."""
    overrides = {"home": home, "database_url": database_url, "log_level": log_level}
    ctx.obj = _Globals({k: v for k, v in overrides.items() if v is not None})


ConcurrencyOpt = Annotated[int | None, typer.Option(
    "--concurrency", "-c", min=1, help="Steps run at once (default: the setting).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


@app.command()
def run(
    ctx: typer.Context,
    *,
    ref: Annotated[str, typer.Argument(metavar="FILE.py:PIPELINE",
                                       help="FILE.py:NAME or package.module:NAME.")],
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", metavar="KEY=VALUE",
        help="An input; VALUE is parsed as JSON when it is valid JSON. Repeat a key for a "
             "list.")] = None,
    inputs_json: Annotated[Path | None, typer.Option(
        "--inputs-json", metavar="FILE", help="A JSON object of inputs.")] = None,
    concurrency: ConcurrencyOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run one execution of a job pipeline to its end, with a progress display; or run a live
    App / StreamPipeline until Ctrl-C or SIGTERM stops it gracefully."""
    with _errors():
        settings = _settings(ctx)
        values = parse_inputs(inputs or [], inputs_json)
        resolved = resolve_target(ref)
        if not isinstance(resolved.target, Pipeline):
            from framepipe.live import run_live

            raise typer.Exit(run_live(resolved.target, settings, _console(stderr=True)))
        loaded = LoadedPipeline(resolved.target, resolved.ref)

        async def begin(client: JobClient) -> str:
            return await client.submit(loaded.pipeline, values, ref=loaded.ref)

        _follow_and_exit(settings, begin, label=loaded.pipeline.name, quiet=quiet,
                         as_json=as_json, concurrency=concurrency)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    *,
    status: Annotated[list[str] | None, typer.Option(
        "--status", "-s", help="Only this status (repeatable).")] = None,
    pipeline: Annotated[str | None, typer.Option("--pipeline", "-p",
                                                 help="Only this pipeline.")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List executions, newest first."""
    with _errors():
        known = [s.value for s in ExecutionStatus]
        for value in status or []:
            if value not in known:
                raise _UsageError(f"--status {value!r}: use one of {', '.join(known)}")
        settings = _settings(ctx)
        with SyncJobClient(settings=settings) as client:
            rows = client.list(status=status or None, pipeline=pipeline, limit=limit,
                               with_inputs=as_json)
    if as_json:
        _dump_json([row.to_dict() for row in rows])
        return
    console = _console()
    if not rows:
        _say(console, "no executions", "dim")
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=True)
    table.add_column("id", no_wrap=True)
    table.add_column("pipeline", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    table.add_column("progress", justify="right", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in rows:
        table.add_row(row.id[:12], row.pipeline, _status_text(row.status.value),
                      f"{row.progress:.0f}%", f"{row.steps_done}/{row.steps_total}",
                      _when(row.created_at, "%m-%d %H:%M:%S"),
                      Text(_first_line(row.error), style="red"))
    console.print(table)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    *,
    execution_id: Annotated[str, typer.Argument(metavar="ID", help="Id or unique prefix.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one execution with its steps."""
    with _errors():
        settings = _settings(ctx)
        with SyncJobClient(settings=settings) as client:
            info = client.get(execution_id)
    if as_json:
        _dump_json(info.to_dict())
        return
    console = _console()
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold", no_wrap=True)
    header.add_column(overflow="fold")
    duration = (info.finished_at - info.started_at
                if info.finished_at and info.started_at else None)
    header.add_row("execution", info.id)
    header.add_row("pipeline", info.pipeline)
    header.add_row("ref", info.pipeline_ref or "-")
    header.add_row("status", _status_text(info.status.value))
    header.add_row("progress", f"{info.progress:.1f}%")
    header.add_row("runs", str(info.runs))
    header.add_row("created", _when(info.created_at))
    header.add_row("started", _when(info.started_at))
    header.add_row("finished", _when(info.finished_at))
    header.add_row("duration", _duration(duration))
    header.add_row("inputs", Text(json.dumps(info.inputs, default=str)))
    if info.error:
        header.add_row("error", Text(info.error, style="red"))
    console.print(header)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=True,
                  title=f"steps ({len(info.steps)})", title_justify="left")
    table.add_column("key", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("failures", justify="right", no_wrap=True)
    table.add_column("progress", justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis", ratio=1)
    for s in info.steps:
        took = s.finished_at - s.started_at if s.finished_at and s.started_at else None
        table.add_row(s.key, _status_text(s.status.value), str(s.attempt), str(s.failures),
                      f"{s.progress:.0f}%", _duration(took),
                      Text(_first_line(s.error), style="red"))
    console.print(table)
    _say(console, f"data: {', '.join(info.data) if info.data else '(none)'}")


@jobs_app.command("retry")
def jobs_retry(
    ctx: typer.Context,
    *,
    execution_id: Annotated[str, typer.Argument(metavar="ID", help="Id or unique prefix.")],
    pipeline_ref: Annotated[str | None, typer.Option(
        "--pipeline", metavar="FILE.py:NAME",
        help="Load the pipeline from here instead of the reference stored with it.")] = None,
    concurrency: ConcurrencyOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Resume a failed, cancelled or interrupted execution; completed steps are not re-run."""
    with _errors():
        settings = _settings(ctx)
        with SyncJobClient(settings=settings) as client:
            info = client.get(execution_id, with_steps=False)
        check_retryable(info)
        ref = pipeline_ref or info.pipeline_ref
        if not ref:
            raise _UsageError(
                f"execution {info.id[:12]} of pipeline '{info.pipeline}' has no stored "
                "pipeline reference: pass --pipeline FILE.py:NAME")
        loaded = resolve_pipeline(ref)
        full_id = info.id

        async def begin(client: JobClient) -> str:
            return await client.retry(full_id, loaded.pipeline)

        _follow_and_exit(settings, begin, label=loaded.pipeline.name, quiet=quiet,
                         as_json=as_json, concurrency=concurrency)


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    *,
    execution_id: Annotated[str, typer.Argument(metavar="ID", help="Id or unique prefix.")],
) -> None:
    """Cancel an execution (at once, or through the process running it)."""
    with _errors():
        settings = _settings(ctx)
        with SyncJobClient(settings=settings) as client:
            result = client.cancel(execution_id)
    console = _console()
    if result.cancelled:
        _say(console, f"cancelled execution {result.execution_id}", "magenta")
    else:
        _say(console, f"cancel requested: the process running execution "
                      f"{result.execution_id} stops it within its heartbeat interval")


@app.command()
def worker(
    ctx: typer.Context,
    *,
    concurrency: ConcurrencyOpt = None,
    broker_url: Annotated[str | None, typer.Option(
        "--broker-url", help="Redis URL of the job broker (FRAMEPIPE_BROKER_URL).")] = None,
    pipelines: Annotated[list[str] | None, typer.Option(
        "--pipeline", "-p", metavar="FILE.py:NAME",
        help="Load this pipeline up front (others load from each execution's stored "
             "reference). Repeatable.")] = None,
) -> None:
    """Run the steps of distributed executions until SIGTERM or Ctrl-C: start any number, on
    any number of machines, with the same FRAMEPIPE_DATABASE_URL and FRAMEPIPE_BROKER_URL."""
    from framepipe.jobs.output_tail import OutputTail
    from framepipe.jobs.worker import Worker

    with _errors():
        tail = OutputTail().start()
        settings = _settings(ctx, broker_url=broker_url)
        loaded = tuple(resolve_pipeline(ref).pipeline for ref in pipelines or [])
        engine = Worker(settings, concurrency=concurrency, pipelines=loaded,
                        output_tail=tail.text)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, engine.request_stop)
            await engine.run()

        asyncio.run(main())
    _flush_std()
    # Steps handed back after the grace period may still run in their threads, which
    # cannot be stopped from outside; their results are discarded, so leave without them.
    os._exit(0)


@app.command()
def serve(
    ctx: typer.Context,
    *,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    pipelines: Annotated[list[str] | None, typer.Option(
        "--pipeline", "-p", metavar="FILE.py:NAME",
        help="A pipeline the service may start. Repeatable.")] = None,
    live: Annotated[list[str] | None, typer.Option(
        "--app", metavar="FILE.py:NAME",
        help="A live App (or StreamPipeline) to run inside the service, its sources "
             "controllable over the API. Repeatable.")] = None,
    no_token: Annotated[bool, typer.Option(
        "--no-token", help="Serve a loopback address without a token (any local user and "
                           "program may then use it; web pages still may not).")] = False,
) -> None:
    """Serve the HTTP API, the dashboard and the WebSocket of live events.

    Every route but /health needs the bearer token: FRAMEPIPE_API_TOKEN, or else one made for
    this run and printed with the dashboard's URL (as Jupyter does). A token is required to
    bind anything but a loopback address."""
    import ipaddress
    import secrets

    with _errors():
        settings = _settings(ctx)
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback and not settings.api_token:
            raise _UsageError(f"refusing to serve on {host} without a token: set "
                              "FRAMEPIPE_API_TOKEN (or bind 127.0.0.1)")
        token = settings.api_token
        if token is None and not no_token:
            token = secrets.token_urlsafe(24)
        store = _open_store(settings)
        problem = store.check_writable()
        if problem is not None:
            store.close()
            raise StateStoreError(f"the state database {store.safe_url} is {problem}")
        from framepipe.server import create_app

        loaded = [resolve_pipeline(ref).pipeline for ref in pipelines or []]
        from framepipe.app import App
        from framepipe.stream.pipeline import StreamPipeline

        hosted: list[App] = []
        for ref in live or []:
            target = resolve_target(ref).target
            if isinstance(target, StreamPipeline):
                single = App(target.name, settings=settings)
                single.add_pipeline(target)
                target = single
            if not isinstance(target, App):
                raise _UsageError(f"--app {ref}: a job pipeline is not a live app (use "
                                  "--pipeline)")
            hosted.append(target)
        application = create_app(settings, pipelines=loaded, apps=hosted, store=store,
                                 token=token or "")
        try:
            import uvicorn
        except ModuleNotFoundError as exc:
            raise MissingDependencyError("uvicorn", "server", "framepipe serve") from exc

        shown = f"[{host}]" if ":" in host else host
        link = f"http://{shown}:{port}/"
        if token and settings.api_token is None:
            link += f"#token={token}"
            _say(_console(), "A token was made for this run (set FRAMEPIPE_API_TOKEN to choose "
                             "one; --no-token for none on loopback).")
        _say(_console(), f"Dashboard: {link}")
        try:
            uvicorn.run(application, host=host, port=port,
                        log_level=settings.log_level.lower(),
                        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace)))
        finally:
            store.close()


@app.command()
def sources(ctx: typer.Context) -> None:
    """Sources of the live apps running from this home: state, fps, restarts, last error."""
    with _errors():
        from framepipe.live import sources_table

        table = sources_table(_settings(ctx))
        if table is None:
            _say(_console(), "no live app has run from this home")
            raise typer.Exit(0)
        _console().print(table)


@app.command()
def health(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Health of the live apps running from this home (state, performance score, uptime)."""
    with _errors():
        from framepipe.app import read_snapshots
        from framepipe.live import health_table

        settings = _settings(ctx)
        if as_json:
            _dump_json(read_snapshots(settings))
            raise typer.Exit(0)
        table = health_table(settings)
        if table is None:
            _say(_console(), "no live app has run from this home")
            raise typer.Exit(0)
        _console().print(table)


@app.command()
def demo(
    ctx: typer.Context,
    *,
    home: Annotated[Path | None, typer.Option(
        "--home", help="Folder for the demo's state, objects and card.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run the demo on embedded defaults: import clips from a generated SD card, twice.

    The second round adds a clip to the card: the ledger makes it import only that one."""
    with _errors():
        from framepipe.demo import pipeline as demo_pipeline
        from framepipe.demo import prepare_card

        settings = _settings(ctx, **({"home": home} if home is not None else {}))
        card = (settings.home / "demo-card").resolve()
        err, out = _console(stderr=True), _console()

        async def begin(client: JobClient) -> str:
            return await client.submit(demo_pipeline, {"card": str(card)},
                                       ref="framepipe.demo:demo_import")

        for round_, clips in ((1, 3), (2, 4)):
            prepare_card(card, clips)
            _say(err, f"round {round_}: the card {card} holds {clips} clips", "bold")
            code, interrupted = asyncio.run(_follow(
                settings, begin, label=f"demo_import (round {round_})",
                quiet=quiet, as_json=False, concurrency=None))
            if code or interrupted:
                _flush_std()
                os._exit(code)
        _say(out, f"objects: {settings.resolved_objects_url} (imports/, thumbnails/, reports/)")
        _say(out, "next: framepipe jobs list · framepipe jobs show <id>")
    raise typer.Exit(0)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the state database's schema."""
    with _errors():
        settings = _settings(ctx)
        with _open_store(settings, migrate=False) as store:
            before = store.current_revision()
            store.migrate()
            after = store.current_revision()
            url = store.safe_url
    console = _console()
    if before == after:
        _say(console, f"database {url} is at revision {after} (head)")
    else:
        _say(console, f"database {url} upgraded from revision {before or 'none'} to {after}",
             "green")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Print the state database's schema revision and URL."""
    with _errors():
        settings = _settings(ctx)
        with _open_store(settings, migrate=False) as store:
            revision = store.current_revision()
            url = store.safe_url
    note = ("(head)" if revision == SCHEMA_HEAD
            else f"(head is {SCHEMA_HEAD}: run `framepipe db upgrade`)")
    console = _console()
    _say(console, f"revision {revision or 'none'} {note}")
    _say(console, f"url {url}")


@db_app.command("prune-events")
def db_prune_events(
    ctx: typer.Context,
    *,
    older_than: Annotated[str, typer.Option(
        "--older-than", metavar="DURATION",
        help="Delete live apps' events older than this: 3600, 30m, 12h, 7d, 2w.")],
) -> None:
    """Delete live apps' events (orders, visits, sources) older than a duration; events of
    executions stay with their executions."""
    from framepipe.backends.state.retention import parse_duration, prune_events

    with _errors():
        try:
            seconds = parse_duration(older_than)
        except ValueError as exc:
            raise _UsageError(f"--older-than: {exc}") from None
        settings = _settings(ctx)
        with _open_store(settings) as store:
            deleted = prune_events(store, seconds)
    _say(_console(), f"deleted {deleted} event(s) older than {older_than}")


def main() -> None:
    """The ``framepipe`` console script."""
    app(prog_name="framepipe")


if __name__ == "__main__":
    main()
