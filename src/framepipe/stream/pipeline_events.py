"""A live pipeline's events and who hears them: :class:`PipelineEvents`, the listeners of one
:class:`~framepipe.stream.pipeline.StreamPipeline`.

Guarantees:

* Every event's data names the pipeline (``pipeline``) and its source (``source_id``), unless
  the event set them itself.
* Each listener gets each event in the order emitted, on the event loop, in the order the
  listeners were added. A listener that raises is logged with its traceback and ignored: the
  others still get the event, and the pipeline goes on.
* A processor's own events (``self.emit(...)``) may come from any thread: they are handed to
  the loop of the pipeline's run and delivered there, in the order they were emitted. One
  that comes after that loop closed (or before a run) is logged at debug level and dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from logging import Logger, LoggerAdapter
from typing import Any

__all__ = ["EventCallback", "PipelineEvents"]

EventCallback = Callable[[str, dict[str, Any]], None]


class PipelineEvents:
    """The listeners of pipeline ``pipeline`` of source ``source_id``; raising ones are logged
    on ``log``."""

    def __init__(
        self,
        pipeline: str,
        source_id: str,
        log: Logger | LoggerAdapter[Any],
        listeners: list[EventCallback],
    ) -> None:
        self._pipeline = pipeline
        self._source_id = source_id
        self._log = log
        self._listeners = listeners
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, callback: EventCallback) -> None:
        """Call ``callback(type, data)`` for each event from now on."""
        self._listeners.append(callback)

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """A run began on ``loop``: processors' events are delivered there."""
        self._loop = loop

    def emit(self, kind: str, **data: Any) -> None:
        """Hand the event to every listener now (on the loop)."""
        data.setdefault("pipeline", self._pipeline)
        data.setdefault("source_id", self._source_id)
        for listener in tuple(self._listeners):
            try:
                listener(kind, data)
            except Exception:
                self._log.exception("event callback for %s raised; ignored", kind)

    def from_processor(self, kind: str, data: dict[str, Any]) -> None:
        """A processor's :meth:`~framepipe.processors.Processor.emit`, from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self._log.debug("event %s after the pipeline ended: %s", kind, data)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self.emit(kind, **data)
        else:
            loop.call_soon_threadsafe(lambda: self.emit(kind, **data))
