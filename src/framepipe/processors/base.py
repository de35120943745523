"""The processor contract: ``setup()`` once, ``process(item)`` per item, ``teardown()`` once.

A processor is a class with those methods or a plain function (sync or ``async``), wrapped by
:func:`as_processor`. ``process`` returns the item to pass on (the same frame, changed or not, or
a new one), or None to drop it (a filter). Sync ``process`` runs in a thread pool, so NumPy,
OpenCV or dlib work (which releases the GIL) runs in parallel and never blocks the event loop;
``async def process`` runs on the loop.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from framepipe.logs import get_logger

__all__ = ["EventSink", "FunctionProcessor", "Processor", "as_processor"]

EventSink = Callable[[str, dict[str, Any]], None]
"""Where a processor's events go: ``sink(event, data)``, callable from any thread."""


class Processor:
    """Base class of processors. Override :meth:`process`; optionally :meth:`setup` (load the
    model once, in the worker's thread) and :meth:`teardown`.

    ``capabilities`` and ``capacity`` (concurrent calls it can take) describe it to routers."""

    name: str = ""
    capabilities: tuple[str, ...] = ()
    capacity: int = 1
    event_sink: EventSink | None = None
    """Set by the pipeline that runs the processor (one pipeline per instance)."""

    def setup(self) -> None:
        """Called once before the first item (load models here)."""

    def process(self, item: Any) -> Any:
        """Handle one item; return the item to pass on, or None to drop it."""
        raise NotImplementedError

    def teardown(self) -> None:
        """Called once after the last item, also after a failure."""

    def emit(self, event: str, **data: Any) -> None:
        """Report an event (``tag.unreadable``, ``face.detected`` ...) from :meth:`process` or
        :meth:`setup`, in any thread. In a :class:`~framepipe.stream.StreamPipeline` it reaches
        the pipeline's listeners (``App.on`` callbacks, the service's event feed) on the event
        loop, in the order emitted, with ``pipeline`` and ``source_id`` added; a raising
        listener never reaches the processor. Outside a pipeline it is logged (debug) and
        dropped."""
        sink = self.event_sink
        if sink is None:
            get_logger(self.label).debug("event %s (no pipeline listens): %s", event, data)
            return
        sink(event, data)

    @property
    def is_async(self) -> bool:
        """True when :meth:`process` is a coroutine function (it runs on the event loop)."""
        return inspect.iscoroutinefunction(self.process)

    @property
    def label(self) -> str:
        """The processor's name, defaulting to its class name."""
        return self.name or type(self).__name__


class FunctionProcessor(Processor):
    """A processor made from a plain function ``fn(item) -> item | None`` (sync or async)."""

    def __init__(self, fn: Callable[[Any], Any], name: str | None = None) -> None:
        self.fn = fn
        self.name = name or str(getattr(fn, "__name__", type(fn).__name__))
        if inspect.iscoroutinefunction(fn):
            self.process = self._process_async  # type: ignore[method-assign]

    def process(self, item: Any) -> Any:
        return self.fn(item)

    async def _process_async(self, item: Any) -> Any:
        return await self.fn(item)


def as_processor(obj: Processor | Callable[[Any], Any], name: str | None = None) -> Processor:
    """``obj`` as a :class:`Processor` (instances pass through; functions are wrapped)."""
    if isinstance(obj, Processor):
        if name:
            obj.name = name
        return obj
    if isinstance(obj, type) and issubclass(obj, Processor):
        return obj()
    if callable(obj):
        return FunctionProcessor(obj, name)
    raise TypeError(f"{obj!r} is neither a Processor nor a callable")
