"""Batch jobs: DAG pipelines with spawned steps, retries, resume, progress and a ledger."""

from framepipe.jobs.context import StepContext
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.inputs import LocalPathOrKey
from framepipe.jobs.keys import step_key
from framepipe.jobs.ledger import Ledger, content_hash, file_fingerprint, file_identity
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepInfo, StepStatus
from framepipe.jobs.pipeline import Pipeline, Step

__all__ = [
    "ExecutionInfo",
    "ExecutionStatus",
    "JobEngine",
    "Ledger",
    "LocalPathOrKey",
    "Pipeline",
    "Step",
    "StepContext",
    "StepInfo",
    "StepStatus",
    "content_hash",
    "file_fingerprint",
    "file_identity",
    "step_key",
]
