"""Running live apps from the command line, and reading their health from another terminal."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from framepipe.app import App, read_snapshots
from framepipe.config import Settings
from framepipe.snapshots import capture_fps, capture_source
from framepipe.stream.pipeline import StreamPipeline

__all__ = ["health_table", "run_live", "sources_table"]


def run_live(target: App | StreamPipeline, settings: Settings, console: Console) -> int:
    """Run an App (or one StreamPipeline in an App of its own) until every pipeline ended or
    Ctrl-C / SIGTERM; those stop it gracefully (drain, close segments). Returns the exit code:
    0 after a clean end or a signal's graceful stop, 1 if a pipeline failed."""
    app = target if isinstance(target, App) else App(target.name, settings=settings)
    if isinstance(target, StreamPipeline):
        app.add_pipeline(target)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        received: list[int] = []

        def on_signal(signum: int) -> None:
            received.append(signum)
            console.print(
                f"[yellow]{signal.Signals(signum).name}: stopping {app.name} gracefully[/]"
            )
            stop.set()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            await app.start()

            ended = asyncio.create_task(app.wait())
            ended.add_done_callback(lambda _t: stop.set())
            await stop.wait()
            ended.cancel()
            failed = [n for n, p in app.pipelines.items() if p.state.value == "failed"]
            await app.stop()
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
        for name in failed:
            error = escape(str(app.pipelines[name].last_error))  # keeps '[station_1]' as text
            console.print(f"[red]pipeline {escape(name)} failed: {error}[/]")
        return 1 if failed and not received else 0

    return asyncio.run(main())


def _fmt(value: Any, digits: int = 1) -> str:
    """A number with ``digits`` decimals; ``-`` for none; anything else as :func:`_text`."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _text(value)


def _text(value: Any, limit: int | None = None) -> str:
    """``value`` (of any type: a snapshot is another process's JSON) as a table cell shows it
    as written: errors hold ``[station_1]``, which Rich would take for markup and drop
    (``CaptureExitedError:  capture ...``), and ``[/x]`` would be a markup error."""
    text = "" if value is None else str(value)
    return escape(text[:limit] if limit is not None else text)


def health_table(settings: Settings) -> Table | None:
    """One row per app of this home: state, performance score, uptime, pipelines, event sinks
    and last error."""
    snapshots = read_snapshots(settings)
    if not snapshots:
        return None
    table = Table(
        "app", "state", "score", "uptime s", "pid", "pipelines", "event sinks", "last error"
    )
    for snap in snapshots:
        pipelines = snap["pipeline_status"]
        table.add_row(
            _text(snap["name"]),
            _text(snap["state"]),
            _fmt(snap.get("performance_score"), 2),
            _fmt(snap.get("uptime")),
            _text(snap.get("pid")),
            _text(", ".join(f"{n}={p.get('state')}" for n, p in pipelines.items())),
            _text(", ".join(_sink_text(s) for s in snap.get("event_sinks") or ())),
            _text(snap.get("last_error"), 80),
        )
    return table


def _sink_text(sink: Any) -> str:
    """``redis failing (12 pending, 3 dropped)`` or ``store ok``: one event sink of a snapshot."""
    if not isinstance(sink, dict):
        return str(sink)
    state = "ok" if sink.get("failing_since") is None else "failing"
    counts = [f"{sink.get('pending')} pending"] if state == "failing" else []
    if sink.get("dropped"):
        counts.append(f"{sink.get('dropped')} dropped")
    return f"{sink.get('sink')} {state}" + (f" ({', '.join(counts)})" if counts else "")


def sources_table(settings: Settings) -> Table | None:
    """One row per source of every app of this home."""
    snapshots = read_snapshots(settings)
    if not snapshots:
        return None
    table = Table(
        "app",
        "pipeline",
        "source",
        "state",
        "fps",
        "frames",
        "restarts",
        "stalls",
        "pid",
        "segments",
        "last error",
    )
    for snap in snapshots:
        for name, status in snap["pipeline_status"].items():
            src = capture_source(status)
            fps = capture_fps(status)
            state = status.get("state") if snap["state"] != "dead" else "dead"
            table.add_row(
                _text(snap["name"]),
                _text(name),
                _text(status.get("source_description", "")),
                _text(state),
                _fmt(fps),
                _text(status.get("frames_captured", 0)),
                _text(src.get("restarts", 0)),
                _text(src.get("stalls", 0)),
                _text(src.get("pid") or "-"),
                _text(status.get("segments_completed", 0)),
                _text(status.get("last_error"), 60),
            )
    return table
