"""``RemoteProcessor``: a stream-pipeline stage served by registered processors.

``Stage(RemoteProcessor(registry, capability="face_detection"), workers=8)`` in a
:class:`~framepipe.stream.StreamPipeline` sends each frame (as JPEG, with its trace context) to
the processors registered for the capability instead of running in-process workers. The stage's
``workers`` is the number of frames it keeps at the processors at once; ``ordered=True`` keeps the
source's frame order whatever the processors' speeds.
"""

from __future__ import annotations

from typing import Any

from framepipe.frames import Frame
from framepipe.processors.base import Processor
from framepipe.processors.fleet.routing import ProcessorRegistry
from framepipe.tracing import new_traceparent, parse_traceparent, tracer

__all__ = ["RemoteProcessor"]


class RemoteProcessor(Processor):
    """A processor whose work is done by the processors registered with ``registry`` for
    ``capability``.

    ``process(frame)`` routes the frame through the registry (waiting up to ``wait`` seconds
    for free capacity) and awaits its result (up to ``timeout``; defaults: the registry's).
    The result dict is stored in ``frame.meta[key]`` (``key`` defaults to the capability; None
    when the processor returned no result) and the same frame goes on. The frame's
    ``meta["trace_context"]`` (a W3C traceparent) is created when missing and travels with the
    frame, so every remote stage of one frame shares its trace (while OpenTelemetry tracing
    is on, the frame's first ``send`` span is that trace: see
    :mod:`~framepipe.processors.fleet.spans`). A processor's error result
    raises :class:`~framepipe.errors.RemoteProcessingError`; no processor, open circuits, no
    capacity in time or no result in time raise their
    :class:`~framepipe.errors.ProcessorRegistryError`; the stage counts it and drops the frame.

    The registry must be started (``async with registry:``) before the pipeline starts; its
    lifetime is the caller's.
    """

    def __init__(
        self,
        registry: ProcessorRegistry,
        capability: str,
        *,
        key: str | None = None,
        timeout: float | None = None,
        wait: float | None = None,
        quality: int = 85,
        name: str | None = None,
    ) -> None:
        if not capability:
            raise ValueError("RemoteProcessor needs a capability name")
        self.registry = registry
        self.capability = capability
        self.capabilities = (capability,)
        self.key = key or capability
        self.timeout = timeout
        self.wait = wait
        self.quality = quality
        self.name = name or f"remote:{capability}"

    def setup(self) -> None:
        """Fail the pipeline's start when the registry is not started."""
        if not self.registry.started:
            raise RuntimeError(
                f"{self.label}: the ProcessorRegistry is not started; start it "
                "('async with registry:') before the pipeline"
            )

    async def process(self, item: Any) -> Frame | None:
        """Send ``item`` (a :class:`Frame`) to a processor and annotate it with the result."""
        if not isinstance(item, Frame):
            raise TypeError(f"{self.label} handles Frame items, not {type(item).__name__}")
        trace = parse_traceparent(item.meta.get("trace_context"))
        traced = tracer() is not None
        if trace is None and not traced:
            item.meta["trace_context"] = new_traceparent()
        result = await self.registry.call(
            item, self.capability, timeout=self.timeout, wait=self.wait, quality=self.quality
        )
        if trace is None and traced:  # the first send span is the frame's trace from here on
            item.meta["trace_context"] = result.trace_context
        result.check()
        item.meta[self.key] = result.data
        return item
