"""The Rich progress view of ``framepipe run``, ``jobs retry`` and ``demo``.

Guarantees: the overall bar never goes back (it shows the highest execution progress seen);
at most ``max_rows`` running steps have a bar of their own, the others are counted as
"+N more running" and take a freed row, with their latest progress, when a shown step ends.
"""

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
from rich.text import Text

from framepipe.events import Event
from framepipe.jobs.models import ExecutionInfo, StepStatus

__all__ = ["MAX_STEP_ROWS", "ProgressView"]

MAX_STEP_ROWS = 8
"""Running steps shown with a bar of their own, by default."""


class ProgressView:
    """One overall bar and one bar per running step (at most ``max_rows``, then "+N more")."""

    def __init__(self, console: Console, label: str, *, max_rows: int = MAX_STEP_ROWS) -> None:
        self.max_rows = max_rows
        self.overall = Progress(
            TextColumn("{task.description}", markup=False, style="bold"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[steps]}", markup=False),
            TimeElapsedColumn(),
            console=console,
        )
        self.rows = Progress(
            TextColumn("  {task.description}", markup=False),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            TextColumn("{task.fields[message]}", markup=False, style="dim"),
            console=console,
        )
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
        """Start drawing (on the console given, redirecting its other output above)."""
        self.live.start()

    def stop(self) -> None:
        """Stop drawing and clear the view (it is transient)."""
        self.live.stop()

    def prime(self, info: ExecutionInfo) -> None:
        """Take the steps already in the store (initial ones, completed before a retry)."""
        self.known.update(s.key for s in info.steps)
        self.done.update(s.key for s in info.steps if s.status is StepStatus.COMPLETED)
        self._set_overall(info.progress)

    def on_event(self, event: Event) -> None:
        """Follow one event of the execution (a listener on the client's bus)."""
        kind, key, data = event.type, event.step_key, event.data
        if key is not None:
            if kind == "step.spawned":
                self.known.add(key)
            elif kind == "step.started":
                self.known.add(key)
                self._show(key)
            elif kind == "step.progress":
                self._update(
                    key, float(data.get("progress") or 0.0), str(data.get("message") or "")
                )
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
