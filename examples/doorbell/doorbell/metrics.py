"""The doorbell pipeline's queue and worker status, as its metrics report them.

Guarantees: one entry per stage and sink, by its label; a queue is flagged ``backlog`` when it is
at least ``backlog_threshold`` of its capacity full (never for a queue without a capacity), and
``backlog_warning`` says whether any is; a pipeline that is not running reports empty queues
(the end-of-stream markers an ended pipeline keeps queued are no backlog); no pipeline yet
gives empty status with a zero backlog.
"""

from __future__ import annotations

from typing import Any

from framepipe.stream import StreamPipeline

__all__ = ["queue_and_worker_status"]


def queue_and_worker_status(
    pipeline: StreamPipeline | None, backlog_threshold: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(queue_status, worker_status)`` of ``pipeline``; ``queue_status`` ends with
    ``total_backlog`` and ``backlog_warning``."""
    queues: dict[str, Any] = {}
    workers: dict[str, Any] = {}
    backlog = 0
    warning = False
    stages = {s.label: s for s in (pipeline.stages + pipeline.sinks)} if pipeline else {}
    for stats in pipeline.stats if pipeline is not None else []:
        stage = stages.get(stats.name)
        capacity = stage.queue_size if stage is not None else 0
        # a pipeline that ended keeps its end-of-stream markers queued: nothing waits
        depth = stats.depth if pipeline is not None and pipeline.running else 0
        backlog += depth
        full = bool(capacity) and depth >= backlog_threshold * capacity
        warning = warning or full
        queues[stats.name] = {
            "depth": depth,
            "capacity": capacity,
            "dropped": stats.dropped,
            "backlog": full,
        }
        workers[stats.name] = {
            "workers": stage.workers if stage is not None else 1,
            "fps": round(stats.fps, 2),
            "latency_ms": round(stats.latency_ms, 2),
            "frames_in": stats.frames_in,
            "frames_out": stats.frames_out,
            "filtered": stats.filtered,
            "errors": stats.errors,
            "busy_s": round(stats.busy_s, 3),
            "last_error": stats.last_error,
        }
    queues["total_backlog"] = backlog
    queues["backlog_warning"] = warning
    return queues, workers
