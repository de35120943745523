"""How a :class:`~framepipe.supervise.Supervisor` tells the world what happens to it: its live
health record, its log and its ``on_event`` callback, held by one :class:`Reporter` that the
supervisor, its stall watchdog (:mod:`framepipe.supervise_stall`) and its restart rule
(:mod:`framepipe.supervise_restarts`) share.

Guarantees:

* A state entered shows in the health at once, with the time it began (``since``).
* An ``on_event`` callback is called with the event's type and its data, which always hold
  the supervisor's ``name``. A callback that raises, or whose awaitable (run as a task, kept
  referenced until it ends) fails, is logged and ignored: it never stops the supervisor.
* No URL's secret shows in a failure's text: :func:`describe_error` shows every URL by
  :func:`framepipe.urls.safe_url` (its password and secret query values masked).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from typing import Any, Protocol

from framepipe.health import Health, HealthState
from framepipe.logs import get_logger
from framepipe.urls import safe_text

__all__ = ["EventCallback", "Reporter", "describe_error", "format_delay"]


class EventCallback(Protocol):
    """``on_event(type, data)``; ``data`` always holds ``name``. May return an awaitable,
    which is then run as a task."""

    def __call__(self, event: str, data: dict[str, Any], /) -> object: ...


def format_delay(seconds: float) -> str:
    """``2s`` for whole seconds >= 1, else at most two decimals: ``0.05s``, ``2.13s``."""
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    text = f"{seconds:.2f}".rstrip("0").rstrip(".")
    return f"{text}s"


def describe_error(exc: BaseException) -> str:
    """``"ExcType: message"``; every URL in the message is shown by
    :func:`~framepipe.urls.safe_url`."""
    message = safe_text(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class Reporter:
    """One supervisor's health record, log (``[name] ...``) and ``on_event`` callback.

    ``what`` names the supervised thing in log lines (``pipeline``); :attr:`What` is it
    capitalised, to begin a line with. :attr:`health` is the live record, not a copy."""

    def __init__(
        self, name: str, what: str, description: str, on_event: EventCallback | None
    ) -> None:
        self.name = name
        self.what = what
        self.What = what[:1].upper() + what[1:]
        self.log = get_logger(name)
        self.health = Health(
            name=name, state=HealthState.STOPPED, since=time.time(), description=description
        )
        self._on_event = on_event
        self._callback_tasks: set[asyncio.Future[Any]] = set()

    def enter(self, state: HealthState) -> None:
        """The health's state is ``state`` from now."""
        self.health.state = state
        self.health.since = time.time()

    def clear_run(self) -> None:
        """No session runs: no pid, no start time."""
        self.health.pid = None
        self.health.started_at = None

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Call ``on_event``; a raising callback is logged and ignored."""
        if self._on_event is None:
            return
        payload = {"name": self.name, **data}
        try:
            result = self._on_event(event, payload)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_done)
        except Exception:
            self.log.exception("on_event callback raised for %r; ignored", event)

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("on_event callback raised; ignored", exc_info=exc)
