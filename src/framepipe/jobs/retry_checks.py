"""The refusals of a retry, checked before anything of it is stored.

Plain functions the engine (:meth:`~framepipe.jobs.engine.JobEngine.retry`), the workers'
resume (:func:`framepipe.jobs.dispatch.resume`) and the command line (through
:func:`framepipe.jobs.client.check_retryable`) share, so a retry is refused with
the same words wherever it is asked for. Each raises, and returns nothing when the retry may
go on; none reads or writes the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from framepipe.errors import ExecutionStateError, UnknownStepError
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus
from framepipe.jobs.pipeline import Pipeline

__all__ = [
    "check_defines_stored_steps",
    "check_retry_pipeline",
    "check_retryable",
    "check_status_retryable",
]


def check_retryable(info: ExecutionInfo) -> None:
    """:class:`ExecutionStateError` unless ``info`` is failed, cancelled or interrupted (worded
    as :meth:`JobClient.retry` words it), for a caller that checks before loading code."""
    check_status_retryable(info.id, info.pipeline, info.status, info.owner)


def check_status_retryable(
    execution_id: str, pipeline: str, status: ExecutionStatus, owner: str | None
) -> None:
    """:func:`check_retryable` on an execution's fields (the workers' resume checks its locked
    row with it)."""
    if status.retryable:
        return
    what = (
        "has completed; nothing to retry"
        if status is ExecutionStatus.COMPLETED
        else f"is {status.value} (owner {owner})"
    )
    raise ExecutionStateError(
        f"execution {execution_id[:12]} of pipeline '{pipeline}' {what}",
        execution_id=execution_id,
    )


def check_retry_pipeline(info: ExecutionInfo, pipeline: Pipeline) -> None:
    """Refuse ``pipeline`` for a retry of ``info`` unless it bears its name and is valid:
    :class:`ExecutionStateError` or :class:`PipelineDefinitionError`."""
    if pipeline.name != info.pipeline:
        raise ExecutionStateError(
            f"execution {info.id[:12]} is of pipeline '{info.pipeline}', not '{pipeline.name}'",
            execution_id=info.id,
        )
    pipeline.validate()


def check_defines_stored_steps(
    info: ExecutionInfo, pipeline: Pipeline, stored_steps: Iterable[Mapping[str, Any]]
) -> None:
    """Refuse ``pipeline`` for a retry of ``info`` unless it defines every step of
    ``stored_steps`` (the execution's step rows as stored): :class:`UnknownStepError` naming
    the first it does not."""
    for r in stored_steps:
        if pipeline.get(r["name"]) is None:
            raise UnknownStepError(
                f"execution {info.id[:12]} has step {r['key']!r}, which "
                "the pipeline no longer defines",
                pipeline=pipeline.name,
            )
