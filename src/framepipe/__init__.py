"""framepipe, video pipelines that keep running: the public API, most of it loaded on first use.

Batch jobs: define a :class:`Pipeline` of steps in Python, run it with a :class:`JobClient`
(:class:`SyncJobClient` without an event loop, :func:`run_pipeline`, or ``framepipe run
FILE.py:PIPELINE``), embedded on SQLite and local files, or on PostgreSQL and Redis workers with
the same code.

Live streams: an :class:`App` runs :class:`StreamPipeline` s (a supervised :class:`Source`,
:class:`Stage` s of :class:`Processor` s, a :class:`Segmenter`, sinks such as
:class:`FrameStore`). Every name loads on first use, so that ``import framepipe`` stays light
for what a program uses: importing it loads settings, errors and events, nothing else.
"""

from typing import TYPE_CHECKING

from framepipe.config import Settings, load_settings
from framepipe.errors import FramepipeError
from framepipe.events import Event, EventBus
from framepipe.lazy import attach
from framepipe.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from framepipe.app import App
    from framepipe.app_health import AppHealth, SystemState
    from framepipe.backends.objects import (
        LocalObjectStore,
        ObjectInfo,
        ObjectStore,
        open_object_store,
    )
    from framepipe.backends.state import StateStore
    from framepipe.backoff import Backoff
    from framepipe.event_sinks import RedisEventSink, StoreEventSink
    from framepipe.frames import Frame
    from framepipe.health import HealthState
    from framepipe.jobs import (
        ExecutionInfo,
        ExecutionStatus,
        JobClient,
        JobEngine,
        Ledger,
        Pipeline,
        Step,
        StepContext,
        StepInfo,
        StepStatus,
        SyncJobClient,
        content_hash,
        file_fingerprint,
        file_identity,
        step_key,
    )
    from framepipe.jobs.runner import run_pipeline
    from framepipe.mqtt import MqttEventSink
    from framepipe.processors.base import Processor, as_processor
    from framepipe.sources import CommandSource, PatternSource, Source, VideoSource
    from framepipe.stream import FrameStore, MotionGate, Segment, Segmenter, Sink, Stage
    from framepipe.stream.pipeline import StreamPipeline
    from framepipe.supervise import Supervisor

__version__ = "0.1.0"

_JOBS = (
    "ExecutionInfo",
    "ExecutionStatus",
    "JobClient",
    "JobEngine",
    "Ledger",
    "Pipeline",
    "Step",
    "StepContext",
    "StepInfo",
    "StepStatus",
    "SyncJobClient",
    "content_hash",
    "file_fingerprint",
    "file_identity",
    "step_key",
)
_OBJECTS = ("LocalObjectStore", "ObjectInfo", "ObjectStore", "open_object_store")

__getattr__ = attach(
    "framepipe",
    {
        **dict.fromkeys(_JOBS, "framepipe.jobs"),
        **dict.fromkeys(_OBJECTS, "framepipe.backends.objects"),
        "StateStore": "framepipe.backends.state",
        "run_pipeline": "framepipe.jobs.runner",
        "App": "framepipe.app",
        "AppHealth": "framepipe.app_health",
        "SystemState": "framepipe.app_health",
        "Backoff": "framepipe.backoff",
        "Frame": "framepipe.frames",
        "RedisEventSink": "framepipe.event_sinks",
        "MqttEventSink": "framepipe.mqtt",
        "StoreEventSink": "framepipe.event_sinks",
        "Processor": "framepipe.processors.base",
        "as_processor": "framepipe.processors.base",
        "CommandSource": "framepipe.sources",
        "PatternSource": "framepipe.sources",
        "Source": "framepipe.sources",
        "VideoSource": "framepipe.sources",
        "FrameStore": "framepipe.stream",
        "MotionGate": "framepipe.stream",
        "Segment": "framepipe.stream",
        "Segmenter": "framepipe.stream",
        "Sink": "framepipe.stream",
        "Stage": "framepipe.stream",
        "StreamPipeline": "framepipe.stream.pipeline",
        "HealthState": "framepipe.health",
        "Supervisor": "framepipe.supervise",
    },
    globals(),
)


__all__ = [
    "App",
    "AppHealth",
    "Backoff",
    "CommandSource",
    "Event",
    "EventBus",
    "ExecutionInfo",
    "ExecutionStatus",
    "Frame",
    "FrameStore",
    "FramepipeError",
    "HealthState",
    "JobClient",
    "JobEngine",
    "Ledger",
    "LocalObjectStore",
    "MotionGate",
    "MqttEventSink",
    "ObjectInfo",
    "ObjectStore",
    "PatternSource",
    "Pipeline",
    "Processor",
    "RedisEventSink",
    "Segment",
    "Segmenter",
    "Settings",
    "Sink",
    "Source",
    "Stage",
    "StateStore",
    "Step",
    "StepContext",
    "StepInfo",
    "StepStatus",
    "StoreEventSink",
    "StreamPipeline",
    "Supervisor",
    "SyncJobClient",
    "SystemState",
    "VideoSource",
    "__version__",
    "as_processor",
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
