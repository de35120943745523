"""How one run of a live pipeline is wired: its queues in flow order (stages, the segmenter,
sinks, the collector) and a hop per stage and sink, each taking from its queue and putting into
the next. :class:`~framepipe.stream.pipeline.StreamPipeline` wires each run anew at its start.

Guarantees:

* Every stage and sink reads a bounded queue of its own, of its ``queue_size`` and
  ``overflow`` policy; the segmenter and the collector read a 64-frame queue that blocks.
* A stage keeps the source's frame order when it says so
  (:attr:`~framepipe.stream.stage.Stage.ordered`) and, when it does not say, exactly when a
  segmenter follows it; a sink keeps it only when it says so.
* Each processor's events (``self.emit(...)``) go to ``events``; a sink's segment markers go
  to the control ``sink_control`` makes for it (its ``segment_closed``).
* Each hop counts into a :class:`~framepipe.stream.stage.StageStats` of its own: the stages'
  first, then the sinks', in the order given.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from logging import Logger, LoggerAdapter
from typing import Any

from framepipe.errors import ProcessorError
from framepipe.processors.base import EventSink, Processor
from framepipe.stream.hop import Hop
from framepipe.stream.queue import FrameQueue
from framepipe.stream.sinks import Sink
from framepipe.stream.stage import Stage, StageStats

__all__ = ["Wiring", "wire"]

Control = Callable[[Any], Awaitable[None]]


@dataclass(frozen=True)
class Wiring:
    """The queues and hops of one run."""

    first: FrameQueue
    """The first stage's queue (the segmenter's, a sink's or the collector's when there is
    none): the capture puts its frames here."""
    segments: FrameQueue | None
    """The segmenter's queue; None without a segmenter."""
    sinks: FrameQueue
    """The queue after the stages and the segmenter: the first sink's, or the collector's."""
    out: FrameQueue
    """The collector's queue, the end of the line."""
    hops: list[Hop]
    """The stages' hops in order, then the sinks'."""
    stats: list[StageStats]
    """Each hop's counters, in the order of :attr:`hops`."""


def wire(
    stages: Sequence[Stage],
    sinks: Sequence[Stage],
    *,
    segmented: bool,
    source_id: str,
    window: float,
    events: EventSink,
    sink_control: Callable[[Sink, str], Control],
    on_error: Callable[[ProcessorError], None],
    on_crash: Callable[[str, int, ProcessorError], None],
    log: Logger | LoggerAdapter[Any],
) -> Wiring:
    """Queues in flow order: stages, the segmenter (when ``segmented``), sinks, the collector;
    a hop per stage and sink between them, counting over ``window`` seconds."""
    stage_qs = [FrameQueue(s.queue_size, s.overflow) for s in stages]
    sink_qs = [FrameQueue(s.queue_size, s.overflow) for s in sinks]
    seg_q = FrameQueue(64, "block") if segmented else None
    out_q = FrameQueue(64, "block")
    seg = [] if seg_q is None else [seg_q]
    chain: list[FrameQueue] = [*stage_qs, *seg, *sink_qs, out_q]
    hops: list[Hop] = []
    stats_list: list[StageStats] = []
    hop_specs = [(stage, q, False) for stage, q in zip(stages, stage_qs, strict=True)]
    hop_specs += [(stage, q, True) for stage, q in zip(sinks, sink_qs, strict=True)]
    for stage, queue, is_sink in hop_specs:
        following = chain[chain.index(queue) + 1]
        processor = stage.processor
        assert isinstance(processor, Processor)
        processor.event_sink = events
        stats = StageStats(stage.label, window=window)
        ordered = stage.ordered if stage.ordered is not None else (segmented and not is_sink)
        control = (
            sink_control(processor, stage.label)
            if is_sink and isinstance(processor, Sink)
            else None
        )
        hops.append(
            Hop(
                stage.label,
                source_id=source_id,
                workers=stage.workers,
                queue=queue,
                ordered=ordered,
                output=following.put,
                stats=stats,
                processor=processor,
                inline=stage.inline,
                control=control,
                on_error=on_error,
                crash_after=stage.max_consecutive_errors,
                on_crash=on_crash,
                processes=stage.processes > 0,
                log=log,
            )
        )
        stats_list.append(stats)
    return Wiring(
        first=chain[0],
        segments=seg_q,
        sinks=chain[len(stage_qs) + len(seg)],
        out=out_q,
        hops=hops,
        stats=stats_list,
    )
