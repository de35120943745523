"""Batch jobs: DAG pipelines with spawned steps, retries, resume, progress and a ledger.

Defining a pipeline does not load the engine: :class:`JobEngine` and the job client
(:class:`JobClient`, :class:`SyncJobClient` and their results) load on first use."""

from typing import TYPE_CHECKING

from framepipe.jobs.context import StepContext
from framepipe.jobs.inputs import LocalPath, LocalPathOrKey, local_input
from framepipe.jobs.keys import step_key
from framepipe.jobs.ledger import Ledger, content_hash, file_fingerprint, file_identity
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepInfo, StepStatus
from framepipe.jobs.pipeline import Pipeline, Step
from framepipe.lazy import attach

if TYPE_CHECKING:
    from framepipe.jobs.client import (
        CancelResult,
        EventPage,
        ExecutionSummary,
        JobClient,
    )
    from framepipe.jobs.engine import JobEngine
    from framepipe.jobs.sync_client import SyncJobClient

_CLIENT = ("CancelResult", "EventPage", "ExecutionSummary", "JobClient")

__getattr__ = attach(
    "framepipe.jobs",
    {
        "JobEngine": "framepipe.jobs.engine",
        "SyncJobClient": "framepipe.jobs.sync_client",
        **dict.fromkeys(_CLIENT, "framepipe.jobs.client"),
    },
    globals(),
)

__all__ = [
    "CancelResult",
    "EventPage",
    "ExecutionInfo",
    "ExecutionStatus",
    "ExecutionSummary",
    "JobClient",
    "JobEngine",
    "Ledger",
    "LocalPath",
    "LocalPathOrKey",
    "Pipeline",
    "Step",
    "StepContext",
    "StepInfo",
    "StepStatus",
    "SyncJobClient",
    "content_hash",
    "file_fingerprint",
    "file_identity",
    "local_input",
    "step_key",
]
