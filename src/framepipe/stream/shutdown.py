"""The end of a live pipeline's run: its stages and sinks torn down, the segments a stop cut
completed. :class:`~framepipe.stream.pipeline.StreamPipeline` calls :func:`tear_down` once,
after the run's tasks ended (drained, failed, or cancelled by a stop).

Guarantees:

* The stages and sinks are torn down together, each sink after its last ``segment_closed``
  returned. A run that ended on its own (a finite source drained) or a stop whose drain
  completed has no call left running: every teardown runs to its end, however long (closing an
  MP4, uploading the last segment; a worker process gets 10 s for its ``teardown()``).
* Only when the drain was cut short (or the run failed) may a call still be running, one that
  never returns holding its stage's threads forever: each stage's teardown is then bounded by
  the pipeline's ``teardown_timeout`` and past it abandoned with a warning naming the stage
  (its daemon threads left to finish, its worker processes killed), and one naming each
  ``segment_closed`` or ``teardown`` call abandoned while it ran. None of them holds the
  program's exit: they run in daemon threads (see :func:`~framepipe.stream.lanes.run_detached`).
* A stop that cut the drain short still completes the segments it cut: the open one, closed
  with ``reason="stopped"``, and those closed earlier whose markers were still on their way
  through the sinks (with their own reason) get ``segment.completed`` after each sink that had
  not had them ran its ``segment_closed`` (so with what the sinks stored so far). A failed
  run's segments are not completed: its failure stands.
* The number of captured frames abandoned in the pipeline's queues and calls is logged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import Logger, LoggerAdapter
from typing import Any

from framepipe.stream.hop import Hop
from framepipe.stream.segment import Segment, SegmenterState, SegmentMarker
from framepipe.stream.stage import StageStats

__all__ = ["Cut", "abandoned_frames", "cut_segments", "tear_down"]

Cut = list[tuple[Segment, set[str]]]
"""Segments a stop cut short, each with the names of the sinks that already had it."""

_Log = Logger | LoggerAdapter[Any]


def cut_segments(
    closing: Mapping[int, tuple[Segment, set[str]]], state: SegmenterState | None
) -> Cut:
    """The segments a stop cut short, with the sinks that already had them: those closed whose
    markers had not come out of the sinks (``closing``), then the open one of ``state``, closed
    now with ``reason="stopped"``."""
    cut = list(closing.values())
    if state is not None:
        cut += [(seg, set()) for seg in state.close_all("stopped")]
    return cut


def abandoned_frames(queued: int, out: int, stats: Iterable[StageStats]) -> int:
    """Of the ``queued`` frames of a run (those that entered its first queue; not a frame the
    stop caught waiting for room there), those that neither came out of the pipeline (``out``)
    nor were filtered, failed or dropped on the way (``stats``): those left in its queues and
    calls."""
    accounted = out + sum(s.filtered + s.errors + s.dropped for s in stats)
    return max(0, queued - accounted)


async def tear_down(
    hops: Sequence[Hop],
    cut: Cut,
    *,
    within: float | None,
    abandoned: int,
    drain: float | None,
    complete: Callable[[Segment], None],
    log: _Log,
) -> None:
    """Log the ``abandoned`` frames (not drained within ``drain`` seconds; None: the run
    failed), tear the ``hops`` down together, each within ``within`` seconds (None: to its
    end), each sink first handed the segments of ``cut`` it has not had; then ``complete``
    each segment of ``cut``."""
    if abandoned:
        log.warning(
            "%d captured frame(s) abandoned in the pipeline's queues and calls%s",
            abandoned,
            "" if drain is None else f" (not drained within {drain:g}s)",
        )
    await asyncio.gather(
        *(
            _retire(
                hop, [SegmentMarker(seg) for seg, had in cut if hop.name not in had], within, log
            )
            for hop in hops
        )
    )
    for seg, _sinks in cut:
        complete(seg)


async def _retire(hop: Hop, closing: list[SegmentMarker], within: float | None, log: _Log) -> None:
    """Tear ``hop`` down (within ``within`` seconds, or to its end for None); a sink is first
    handed ``closing`` (the segments a stop cut that it has not had)."""
    try:
        await hop.teardown(within, closing)
    except TimeoutError:
        log.warning(
            "stage %r did not tear down within %gs (teardown_timeout: the drain was cut "
            "short, a processor call that never returns?): abandoned, its threads left to "
            "finish on their own (worker processes killed)",
            hop.name,
            within,
        )
    except Exception:
        log.exception("teardown of %s failed", hop.name)
