"""The callbacks of an app's events (:meth:`framepipe.app.App.on`, :meth:`~framepipe.app.App.emit`).

Guarantees: a callback registered for an event (or for ``"*"``, every event) is called with
``(event, data)`` for each event emitted after it registered, until the function its
registration returned is called; the callbacks of one event run in registration order, those of
``"*"`` after those named for it. A callback that raises is logged and never propagated, nor
stops the others. An async callback runs as a task of the running loop, held until it ends, and
what it raises is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Callable
from typing import Any

from framepipe.logs import ComponentLogger

__all__ = ["Callback", "Callbacks"]

Callback = Callable[[str, dict[str, Any]], Any]


class Callbacks:
    """The callbacks registered per event, and the tasks of async ones still running."""

    def __init__(self, log: ComponentLogger) -> None:
        self._log = log
        self._callbacks: dict[str, list[Callback]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    def on(self, event: str, callback: Callback) -> Callable[[], None]:
        """Call ``callback(event, data)`` on ``event`` (``"*"`` for all); returns a function
        that unregisters it."""
        self._callbacks.setdefault(event, []).append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks[event].remove(callback)

        return remove

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Deliver an event to its callbacks; a raising callback is logged, never propagated."""
        for callback in (*self._callbacks.get(event, ()), *self._callbacks.get("*", ())):
            try:
                result = callback(event, data)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)  # the loop holds tasks only weakly
                    task.add_done_callback(self._done)
            except Exception:
                self._log.exception("callback for %s raised; ignored", event)

    def _done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("async callback raised: %r", task.exception())
