"""framepipe: video pipelines that keep running.

Batch jobs (this release): define a :class:`Pipeline` of steps in Python, run it with a
:class:`JobEngine` (or :func:`run_pipeline`, or ``framepipe run FILE.py:PIPELINE``), embedded
on SQLite and local files, or on PostgreSQL with the same code.
"""

from framepipe.backends.objects import LocalObjectStore, ObjectInfo, ObjectStore, open_object_store
from framepipe.backends.state import StateStore
from framepipe.config import Settings, load_settings
from framepipe.errors import FramepipeError
from framepipe.events import Event, EventBus
from framepipe.jobs import (
    ExecutionInfo,
    ExecutionStatus,
    JobEngine,
    Ledger,
    Pipeline,
    Step,
    StepContext,
    StepInfo,
    StepStatus,
    content_hash,
    file_fingerprint,
    file_identity,
    step_key,
)
from framepipe.jobs.runner import run_pipeline
from framepipe.logs import configure_logging, get_logger

__version__ = "0.1.0"

__all__ = [
    "Event",
    "EventBus",
    "ExecutionInfo",
    "ExecutionStatus",
    "FramepipeError",
    "JobEngine",
    "Ledger",
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "Pipeline",
    "Settings",
    "StateStore",
    "Step",
    "StepContext",
    "StepInfo",
    "StepStatus",
    "__version__",
    "configure_logging",
    "content_hash",
    "file_fingerprint",
    "file_identity",
    "get_logger",
    "load_settings",
    "open_object_store",
    "run_pipeline",
    "step_key",
]
