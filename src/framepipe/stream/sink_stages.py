"""A live pipeline's sinks as stages, and what its sinks know of earlier runs' segments.

Guarantees:

* :func:`sink_stages` keeps a :class:`~framepipe.stream.stage.Stage` as it is and runs any
  other :class:`~framepipe.stream.sinks.Sink` in a stage of its own, named by the sink's
  label, with the sink's ``workers`` (at least one), in the order given.
* :func:`segment_taken` asks only the sinks that can tell (those that override
  :meth:`~framepipe.stream.sinks.Sink.segment_taken`): a segment id is taken when any of them
  holds an earlier run's frames of it; None when no sink can tell.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from framepipe.frames import Frame
from framepipe.stream.sinks import Sink
from framepipe.stream.stage import Stage

__all__ = ["segment_taken", "sink_stages"]


def sink_stages(sinks: Sequence[Sink | Stage]) -> list[Stage]:
    """Each sink as a stage (see the module)."""
    return [
        s if isinstance(s, Stage) else Stage(s, workers=max(1, s.workers), name=s.label)
        for s in sinks
    ]


def segment_taken(sinks: Sequence[Stage]) -> Callable[[Frame, str], bool] | None:
    """Whether any sink holds an earlier run's frames of a segment id (None: no sink can
    tell)."""
    tellers = [
        s.processor
        for s in sinks
        if isinstance(s.processor, Sink)
        and type(s.processor).segment_taken is not Sink.segment_taken
    ]
    if not tellers:
        return None
    return lambda frame, segment_id: any(s.segment_taken(frame, segment_id) for s in tellers)
