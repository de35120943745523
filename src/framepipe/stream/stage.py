"""Stages of a live pipeline: what a stage is (:class:`Stage`), its counters
(:class:`StageStats`) and the end of the stream (:data:`END`).

A :class:`Stage` is a processor with its own worker count and a bounded input queue with an
overflow policy. At run time every stage, the segmenter and every sink is a *hop* (see
:mod:`framepipe.stream.hop`): workers take items from the hop's queue, handle them and hand
the results to the next hop.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from framepipe.processors.base import Processor, as_processor
from framepipe.stream.queue import FrameQueue, Overflow

__all__ = ["END", "Stage", "StageStats"]


class _End:
    control = True

    def __repr__(self) -> str:
        return "END"


END = _End()
"""End of stream: the last item a hop passes on."""


@dataclass
class Stage:
    """A processing stage: ``processor`` (a :class:`Processor` or a function ``frame -> frame |
    None``), ``workers`` concurrent calls, an input queue of ``queue_size`` with ``overflow``
    (``block`` = backpressure, ``drop_oldest`` = live). ``ordered`` (default: when something
    downstream needs order) keeps the source's frame order. ``inline`` runs a sync processor on
    the event loop instead of a thread (only for work of a few microseconds).

    ``max_consecutive_errors``: a processor that raises on that many frames in a row is taken
    as crashed (a model in a broken state, a lost GPU), not as a run of bad frames: the
    pipeline emits ``stage.crashed`` and fails, and the ``App`` recovers it with fresh
    processors (``setup()`` again) after its cooldown. None: every error is one frame's.

    ``processes``: run a sync processor in that many worker processes instead of threads (for
    work that holds the GIL, such as dlib's face encoder), with frames in shared memory, order
    and errors as with threads, and a worker process that dies restarted; see
    :mod:`framepipe.stream.processes`. The processor must be picklable; ``workers`` is then
    the number of processes. Worker processes are spawned, so the script that starts the
    pipeline must do so under ``if __name__ == "__main__":``.

    A stage in threads calls its processor in at most ``workers`` threads at once. While a
    call shorter than 20 ms (a moving average) runs, its worker hands the thread the next frame
    already queued, so the thread goes on to it without waiting for the event loop; results
    still leave in the order the worker took the frames, and a control item is never taken
    ahead. A frame taken ahead is out of the queue one call earlier, so a ``drop_oldest``
    queue's frames can be up to one such call older when processed."""

    processor: Processor | Callable[[Any], Any]
    workers: int = 1
    queue_size: int = 16
    overflow: Overflow = "block"
    ordered: bool | None = None
    name: str | None = None
    inline: bool = False
    max_consecutive_errors: int | None = None
    processes: int = 0

    def __post_init__(self) -> None:
        self.processor = as_processor(self.processor, self.name)
        if self.processes < 0:
            raise ValueError(f"stage {self.label!r}: processes must be >= 0, got {self.processes}")
        if self.processes:
            if self.processor.is_async or self.inline:
                raise ValueError(
                    f"stage {self.label!r}: processes= runs a sync processor in worker "
                    "processes; an async or inline processor runs on the event loop"
                )
            if self.workers not in (1, self.processes):
                raise ValueError(
                    f"stage {self.label!r}: give workers or processes, not both "
                    f"(workers={self.workers}, processes={self.processes})"
                )
            self.workers = self.processes
        if self.max_consecutive_errors is not None and self.max_consecutive_errors < 1:
            raise ValueError(f"stage {self.label!r}: max_consecutive_errors must be >= 1")
        if self.workers < 1:
            raise ValueError(f"stage {self.label!r}: workers must be >= 1, got {self.workers}")
        if self.queue_size < 1:
            raise ValueError(f"stage {self.label!r}: queue_size must be >= 1")

    @property
    def label(self) -> str:
        """The stage's name (default: its processor's)."""
        assert isinstance(self.processor, Processor)
        return self.name or self.processor.label


@dataclass
class StageStats:
    """Counters of one hop. ``fps`` is measured over the last ``window`` seconds."""

    name: str
    frames_in: int = 0
    frames_out: int = 0
    filtered: int = 0
    errors: int = 0
    busy_s: float = 0.0
    last_error: str | None = None
    queue: FrameQueue | None = None
    window: float = 5.0
    _times: collections.deque[float] = field(default_factory=collections.deque, repr=False)
    _lat: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=256), repr=False
    )

    def record(self, seconds: float) -> None:
        """Count one processed frame that took ``seconds``."""
        now = time.monotonic()
        self._times.append(now)
        self._lat.append(seconds)
        self.busy_s += seconds
        cutoff = now - self.window
        while self._times and self._times[0] < cutoff:
            self._times.popleft()

    @property
    def fps(self) -> float:
        """Frames handled per second over the recent window."""
        now = time.monotonic()
        cutoff = now - self.window
        while self._times and self._times[0] < cutoff:
            self._times.popleft()
        if len(self._times) < 2:
            return float(len(self._times)) / self.window
        span = max(now - self._times[0], 1e-6)
        return len(self._times) / max(span, min(self.window, span))

    @property
    def latency_ms(self) -> float:
        """Median processing time of the recent frames, in milliseconds."""
        if not self._lat:
            return 0.0
        ordered = sorted(self._lat)
        return 1000.0 * ordered[len(ordered) // 2]

    @property
    def dropped(self) -> int:
        """Frames the input queue dropped (``drop_oldest``)."""
        return self.queue.dropped if self.queue is not None else 0

    @property
    def depth(self) -> int:
        """Items waiting in the input queue."""
        return len(self.queue) if self.queue is not None else 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            "name": self.name,
            "fps": round(self.fps, 2),
            "latency_ms": round(self.latency_ms, 3),
            "frames_in": self.frames_in,
            "frames_out": self.frames_out,
            "filtered": self.filtered,
            "errors": self.errors,
            "dropped": self.dropped,
            "queue_depth": self.depth,
            "last_error": self.last_error,
        }
