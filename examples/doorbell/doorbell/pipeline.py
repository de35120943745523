"""The doorbell's App and live pipeline as they are put together (not started): the camera,
[motion gate], face detection, face recognition, visits and sinks.

Guarantees: the camera is a video file, a device (``/dev/video0``, or its number alone) or a
stream URL; a live camera's first queue drops its oldest frames rather than fall behind (a
looped file blocks instead, as does every queue after the first); a face stage failing on
``component_failure_threshold`` frames in a row has crashed, so framepipe fails the pipeline
and the App recovers it with fresh models; visits follow a recorded file's own clock (it runs
faster than real time), the wall clock otherwise; frames are stored only with ``store_frames``;
the App never warns on framepipe's performance score (the doorbell judges it itself).
"""

from __future__ import annotations

import re

from doorbell.config import DoorbellConfig
from doorbell.stages import FaceDetection, FaceRecognition, VisitRecorder
from framepipe.app import App
from framepipe.backends.objects import ObjectStore
from framepipe.backoff import Backoff
from framepipe.config import Settings
from framepipe.sources import VideoSource
from framepipe.sources.base import Source
from framepipe.stream import FrameStore, MotionGate, Segmenter, Stage, StreamPipeline
from framepipe.stream.queue import Overflow
from framepipe.stream.sinks import Sink

__all__ = ["PIPELINE", "camera_source", "doorbell_app", "doorbell_pipeline", "face_stages"]

PIPELINE = "doorbell"


def doorbell_app(config: DoorbellConfig, settings: Settings) -> App:
    """The framepipe App that runs the doorbell's pipeline, with the configured recovery."""
    return App(
        PIPELINE,
        settings=settings,
        auto_recovery=config.auto_recovery_enabled,
        max_restart_attempts=config.max_restart_attempts,
        restart_cooldown=config.restart_cooldown_seconds,
        health_interval=config.health_check_interval,
        # the doorbell judges performance itself (performance()): framepipe's score
        # averages the capture rate since the session began, so the App must not warn on it
        performance_threshold=0.0,
    )


def camera_source(cfg: DoorbellConfig) -> Source:
    """The camera: a video file, a device (``/dev/video0`` or ``0``) or a stream URL."""
    url = cfg.camera_source
    if re.fullmatch(r"\d+", url):
        url = f"/dev/video{url}"
    return VideoSource(
        url,
        cfg.camera_name,
        realtime=cfg.camera_realtime,
        loop=cfg.camera_loop,
        open_timeout=cfg.open_timeout,
        read_timeout=cfg.stall_timeout,
    )


def face_stages(
    cfg: DoorbellConfig, source: Source, detection: FaceDetection, recognition: FaceRecognition
) -> list[Stage]:
    """[motion gate], face detection, face recognition, each with its workers."""
    overflow: Overflow = "drop_oldest" if source.live and not cfg.camera_loop else "block"
    stages = []
    if cfg.motion_enabled:
        stages.append(
            Stage(MotionGate(cfg.motion_threshold), queue_size=cfg.queue_size, overflow=overflow)
        )
    # a face stage failing on that many frames in a row has crashed: framepipe fails the
    # pipeline and the App recovers it with fresh models (cooldown, max attempts)
    crashed = cfg.component_failure_threshold
    stages.append(
        Stage(
            detection,
            workers=cfg.detection_workers,
            queue_size=cfg.queue_size,
            overflow="block" if stages else overflow,
            max_consecutive_errors=crashed,
        )
    )
    stages.append(
        Stage(
            recognition,
            workers=cfg.recognition_workers,
            queue_size=cfg.queue_size,
            max_consecutive_errors=crashed,
        )
    )
    return stages


def doorbell_pipeline(
    cfg: DoorbellConfig, objects: ObjectStore, source: Source, stages: list[Stage]
) -> StreamPipeline:
    """The whole pipeline (not started): ``stages``, then visits, stored by
    :class:`~doorbell.stages.VisitRecorder` (and their frames with ``store_frames``)."""
    recorded = isinstance(source, VideoSource) and not source.live and not source.realtime
    sinks: list[Sink] = [VisitRecorder(objects, min_known_ratio=cfg.min_known_ratio)]
    if cfg.store_frames:
        sinks.insert(
            0,
            FrameStore(objects, template="visits/{source_id}/{segment_id}/frame_{ts_ms}_{seq}.jpg"),
        )
    return StreamPipeline(
        PIPELINE,
        source,
        stages,
        # a recorded file runs faster than real time: visits follow its own clock
        Segmenter(
            None,
            timeout=cfg.visit_timeout,
            max_duration=cfg.max_visit_duration,
            clock="stream" if recorded else "wall",
        ),
        sinks,
        stall_timeout=cfg.stall_timeout,
        start_timeout=cfg.open_timeout + 5.0,
        backoff=Backoff(cfg.camera_retry_delay, 2.0, 60.0, 0.1),
        max_restarts=cfg.camera_max_retries,
    )
