"""The pipeline orchestrator: camera -> [motion gate] -> face detection -> recognition ->
visits (segments) -> event processing, on a framepipe :class:`~framepipe.app.App`.

Runs on one asyncio event loop (the :class:`~doorbell.manager.OrchestratorManager` gives it a
thread of its own). Guarantees:

* Known faces are loaded from ``known_faces_dir`` before the pipeline starts; an image that
  cannot be used (unreadable, no face, several faces) is left out, reported in ``issues`` and as
  a ``known_face.rejected`` event, and the others still work.
* Every visit (a run of frames with a face, closed ``visit_timeout`` seconds after the last
  one) gives exactly one ``visitor.known`` or ``visitor.unknown`` event, emitted after its
  snapshot is in the object store; a doorbell press gives ``doorbell.pressed`` and, when a
  face is in view, a ``visitor.*`` event too. Events are kept in memory (the last
  ``recent_events``, reloaded from the store at start) and stored as JSON under ``events/``
  in the object store.
* Notifications: callbacks (``App.on``) get every event; with ``webhook_url`` each visitor event
  and doorbell press is POSTed as JSON by :class:`~doorbell.notify.Webhook` (a bounded queue
  and one task on the loop: a slow or hanging webhook holds up nothing else; retried; an event
  not delivered is logged and emitted as ``notification.failed``, never raised; the URL is
  shown as ``scheme://host:port/...`` only).
* The camera, the pipeline's workers and its recovery are framepipe's: a camera that fails is
  retried with backoff (``camera.max_retries``), a pipeline that fails for good is recovered
  after ``restart_cooldown_seconds``, at most ``max_restart_attempts`` times, then
  ``system_error``.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from doorbell.config import DoorbellConfig
from doorbell.events import stamped, store_event, stored_events, visit_event
from doorbell.known_faces import load_known
from doorbell.metrics import queue_and_worker_status
from doorbell.notify import Webhook
from doorbell.pipeline import (
    PIPELINE,
    camera_source,
    doorbell_app,
    doorbell_pipeline,
    face_stages,
)
from doorbell.press import match_faces, press_id, press_result, press_visitor_event
from doorbell.stages import FaceDetection, FaceRecognition, snapshot_key
from framepipe.app import App
from framepipe.backends.objects import ObjectStore, open_object_store
from framepipe.config import Settings, load_settings
from framepipe.errors import MediaError
from framepipe.frames import Frame
from framepipe.logs import get_logger
from framepipe.processors.faces import FaceAnalyzer, FaceMatcher, KnownFaces
from framepipe.sources.base import Source
from framepipe.stream import Stage, StreamPipeline
from framepipe.stream.performance import Performance

__all__ = ["PIPELINE", "PipelineOrchestrator"]


class PipelineOrchestrator:
    """Builds and runs the doorbell's live pipeline; see the module docstring."""

    def __init__(self, config: DoorbellConfig, *, settings: Settings | None = None) -> None:
        self.config = config
        home = config.raw.get("framepipe_home")
        self.settings = settings or (load_settings(home=home) if home else load_settings())
        self.app = self.make_app()
        self.log = get_logger("doorbell")
        self.detector = FaceAnalyzer(
            model=config.detection_model,
            landmarks=config.landmarks,
            upscale_below=config.upscale_below,
            upsample=config.upsample,
            sets=config.detection_workers,
        )
        # one more set than workers: doorbell presses never wait for the pipeline's frames
        self.recognizer = FaceAnalyzer(
            model=config.detection_model,
            landmarks=config.landmarks,
            upscale_below=config.upscale_below,
            upsample=config.upsample,
            sets=config.recognition_workers + 1,
        )
        self.matcher = FaceMatcher((), config.tolerance)
        self.known = KnownFaces([], [])
        self._reloading = threading.Lock()
        self.objects: ObjectStore | None = None
        self.pipeline: StreamPipeline | None = None
        self.events: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=max(1, config.recent_events)
        )
        self.events_total = 0
        self.issues: list[str] = []
        self.webhook = (
            Webhook(
                config.webhook_url,
                timeout=config.webhook_timeout,
                retries=config.webhook_retries,
                max_pending=config.webhook_queue,
                on_failure=self._notification_failed,
            )
            if config.webhook_url
            else None
        )
        self._event_times: collections.deque[float] = collections.deque()
        self._pending: set[asyncio.Future[Any]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.app.on("segment.completed", self._on_segment)
        self.app.on("stage.crashed", self._on_stage_crashed)
        if config.detector_type == "gpu":
            self.issues.append(
                "face_detection.detector_type is 'gpu' but the dlib-bin wheel "
                "has no CUDA: detection runs on the CPU"
            )

    # -- building ---------------------------------------------------------------------------

    def make_app(self) -> App:
        """The framepipe App that runs the pipeline (a subclass may return a subclass of App,
        as :mod:`doorbell.web` does to be hosted by ``framepipe serve``)."""
        return doorbell_app(self.config, self.settings)

    def make_source(self) -> Source:
        """The camera: a video file, a device (``/dev/video0`` or ``0``) or a stream URL."""
        return camera_source(self.config)

    def make_detection(self) -> FaceDetection:
        """The face detection processor (a subclass may wrap or replace it)."""
        return FaceDetection(self.detector)

    def make_stages(self, source: Source) -> list[Stage]:
        """[motion gate], face detection, face recognition, each with its workers."""
        recognition = FaceRecognition(self.recognizer, lambda: self.matcher)
        return face_stages(self.config, source, self.make_detection(), recognition)

    def build_pipeline(self) -> StreamPipeline:
        """The whole pipeline (not started)."""
        assert self.objects is not None
        source = self.make_source()
        return doorbell_pipeline(self.config, self.objects, source, self.make_stages(source))

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """:meth:`prepare`, then start the App (and with it the pipeline)."""
        await self.prepare()
        await self.app.start()

    async def prepare(self) -> None:
        """Open the object store, load the models (raises
        :class:`~framepipe.errors.MissingDependencyError` without dlib or its models) and the
        known faces, build the pipeline and add it to the App (not started)."""
        loop = self.loop = asyncio.get_running_loop()
        if self.objects is None:
            self.objects = await loop.run_in_executor(
                None, open_object_store, self.config.objects_url
            )
        # dlib and its models load here, so that a missing one fails start() with the fix
        await loop.run_in_executor(None, lambda: self.detector.load(detect=True, encode=False))
        await loop.run_in_executor(None, self.recognizer.load)
        await loop.run_in_executor(None, self.reload_known_faces)
        if not self.events:
            self.events.extend(await loop.run_in_executor(None, self._stored_events))
        if self.pipeline is None:
            self.pipeline = self.build_pipeline()
            self.app.add_pipeline(self.pipeline)

    async def stop(self) -> None:
        """Stop the pipeline (queued frames drain, the open visit closes), then wait for the
        pending notifications. A recovery in progress is cancelled (it would start the
        pipeline again)."""
        await self.app.stop()
        await self.drain_notifications()

    async def drain_notifications(self) -> None:
        """Wait (bounded by the webhook's timeout) for events still being stored or POSTed;
        the webhook's events not delivered by then are counted as dropped."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=self.config.webhook_timeout + 1)
        if self.webhook is not None:
            await self.webhook.close(self.config.webhook_timeout + 1)

    @property
    def notifications_sent(self) -> int:
        """Events the webhook accepted."""
        return self.webhook.sent if self.webhook is not None else 0

    @property
    def notifications_failed(self) -> int:
        """Events the webhook did not accept (after the retries)."""
        return self.webhook.failed if self.webhook is not None else 0

    def _notification_failed(self, event: dict[str, Any], error: str) -> None:
        assert self.webhook is not None
        self.app.emit(
            "notification.failed",
            {"event_id": event.get("event_id"), "url": self.webhook.shown, "error": error},
        )

    def reload_known_faces(self) -> KnownFaces:
        """Encode ``known_faces_dir`` again (blocking); the pipeline uses the new faces from
        its next frame. Unusable images are reported (``issues``, ``known_face.rejected``).
        Reloads asked for at once (Python, SIGHUP, the web route) run one after the other."""
        with self._reloading:
            return self._reload_known_faces()

    def _reload_known_faces(self) -> KnownFaces:
        folder = self.config.known_faces_dir
        self.issues = [i for i in self.issues if not i.startswith("known face")]
        if not folder.is_dir():
            self.issues.append(
                f"known faces directory {folder} does not exist: every visitor is unknown"
            )
            known = KnownFaces([], [])
        else:
            try:
                known = load_known(folder, self.recognizer)
            except MediaError as exc:  # cannot be listed: as good as missing
                self.issues.append(f"known faces {exc}: every visitor is unknown")
                self.log.warning("%s", self.issues[-1])
                known = KnownFaces([], [])
        for rejected in known.rejected:
            message = f"known face {rejected.source} rejected: {rejected.reason}"
            self.issues.append(message)
            self.log.warning("%s", message)
            self._emit_threadsafe(
                "known_face.rejected", {"file": rejected.source, "error": rejected.reason}
            )
        self.known = known
        self.matcher = FaceMatcher(known.faces, self.config.tolerance)
        self.log.info("%d known face(s): %s", len(known.faces), ", ".join(known.names) or "-")
        return known

    def _emit_threadsafe(self, event: str, data: dict[str, Any]) -> None:
        loop = self.loop
        if loop is None or _in_loop(loop):
            self.app.emit(event, data)
        else:
            loop.call_soon_threadsafe(self.app.emit, event, data)

    # -- performance ------------------------------------------------------------------------

    def performance(self) -> dict[str, Any]:
        """How well the pipeline keeps up with the camera: framepipe's rule for every live
        pipeline (:meth:`framepipe.stream.StreamPipeline.performance`). A camera (a device, a
        network stream, a file paced with ``camera.realtime``) is judged by the rate at which
        the pipeline processes frames against its nominal rate over the last few seconds, so
        frames the camera made that the capture could not take lower it; a file read as fast
        as the pipeline takes it only by failed frames. ``score`` (0-1), ``reason`` (why it is
        below 1), ``paced``, ``processed_fps``, ``nominal_fps``, ``not_taken``, ``dropped``,
        ``failed`` and ``bottleneck`` (the stage with the most work per worker)."""
        pipeline = self.pipeline
        if pipeline is None:
            return Performance().to_dict()
        return pipeline.performance().to_dict()

    # -- crashed workers --------------------------------------------------------------------

    def _on_stage_crashed(self, _event: str, data: dict[str, Any]) -> None:
        """framepipe failed the pipeline because a face stage crashed; the App recovers it
        (or, past ``max_restart_attempts``, reports ``system_error``)."""
        attempt = self.app.restart_attempts.get(PIPELINE, 0) + 1
        self.app.emit(
            "component.crashed",
            {
                "pipeline": PIPELINE,
                "stage": data.get("stage"),
                "error": data.get("error"),
                "attempt": attempt,
                "recovering": (
                    self.config.auto_recovery_enabled
                    and attempt <= self.config.max_restart_attempts
                ),
            },
        )

    # -- events -----------------------------------------------------------------------------

    def _on_segment(self, _event: str, data: dict[str, Any]) -> None:
        event = visit_event(data)
        if event is not None:
            self.publish(*event)

    def publish(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        """Record an event, store it, notify callbacks and the webhook (on the loop)."""
        now = time.time()
        event = stamped(kind, payload, now)
        self.events.append(event)
        self.events_total += 1
        self._event_times.append(now)
        # a visit names its visitor in "name", a press (the original API's result) in "visitor"
        who = event.get("name") or event.get("visitor")
        if who is None:
            who = "no face" if event.get("faces_detected") == 0 else "unknown"
        self.log.info(
            "%s: %s (distance %s) %s",
            kind,
            who,
            event.get("distance"),
            event.get("snapshot_key") or "",
        )
        loop = asyncio.get_running_loop()
        task = loop.run_in_executor(None, self._store, event)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        if self.webhook is not None and kind.startswith(("visitor.", "doorbell.")):
            self.webhook.submit(event)
        self.app.emit(kind, event)
        return event

    def _store(self, event: dict[str, Any]) -> None:
        """Store the event's JSON (in a worker thread)."""
        if self.objects is not None:
            store_event(self.objects, event)

    def _stored_events(self) -> list[dict[str, Any]]:
        assert self.objects is not None
        return stored_events(self.objects, self.config.recent_events)

    def events_per_minute(self) -> float:
        """Events in the last 60 seconds."""
        cutoff = time.time() - 60.0
        while self._event_times and self._event_times[0] < cutoff:
            self._event_times.popleft()
        return float(len(self._event_times))

    # -- the doorbell -----------------------------------------------------------------------

    async def trigger(self, channel: int | None = None) -> dict[str, Any]:
        """A doorbell press: recognise the faces in the camera's latest frame, store it, emit
        ``doorbell.pressed`` (and ``visitor.*`` when a face is in view); returns the result."""
        frame: Frame | None = self.pipeline.latest_frame if self.pipeline else None
        now = time.time()
        if frame is None:
            state = self.pipeline.state.value if self.pipeline else "not started"
            result: dict[str, Any] = {
                "success": False,
                "channel": channel,
                "error": f"no camera frame yet (pipeline {state})",
            }
            # the shape every published event has (publish), so a listener reads its "type"
            press = stamped("doorbell.pressed", result, now)
            self.app.emit("doorbell.pressed", press)
            return result
        loop = asyncio.get_running_loop()
        faces = await loop.run_in_executor(None, self.recognizer.analyse, frame.image)
        described, visitor = match_faces(faces, self.matcher)
        key = snapshot_key(frame.source_id, press_id(frame))
        assert self.objects is not None
        await loop.run_in_executor(None, self.objects.put, key, frame.to_jpeg(90))
        result = press_result(frame, channel, described, visitor, key)
        self.publish("doorbell.pressed", dict(result))
        if faces:
            self.publish(*press_visitor_event(result, frame.source_id))
        return result

    # -- metrics ----------------------------------------------------------------------------

    def get_pipeline_metrics(self) -> dict[str, Any]:
        """Pipeline status, uptime, events per minute, queue status (with a backlog warning
        when a queue is at least ``queue_backlog_threshold`` full) and worker status. Safe from
        any thread: read on the orchestrator's loop while it runs."""
        loop = self.loop
        if loop is not None and loop.is_running() and not _in_loop(loop):

            async def read() -> dict[str, Any]:
                return self._metrics()

            return asyncio.run_coroutine_threadsafe(read(), loop).result(10.0)
        return self._metrics()

    def _metrics(self) -> dict[str, Any]:
        pipeline = self.pipeline
        health = self.app.health()
        status = pipeline.health() if pipeline is not None else None
        queues, workers = queue_and_worker_status(pipeline, self.config.queue_backlog_threshold)
        performance = self.performance()
        return {
            "pipeline_status": status["state"] if status else "not started",
            "state": health.state.value,
            "uptime": health.uptime,
            "events_per_minute": self.events_per_minute(),
            "events_total": self.events_total,
            "visits": status["segments_completed"] if status else 0,
            "frames_captured": status["frames_captured"] if status else 0,
            "frames_with_faces": status["frames_out"] if status else 0,
            "performance_score": performance["score"],
            "performance": performance,
            "queue_status": queues,
            "worker_status": workers,
            "source": status["source"] if status else None,
            "restart_attempts": sum(self.app.restart_attempts.values()),
            "known_faces": self.known.names,
            "notifications": (
                self.webhook.stats()
                if self.webhook is not None
                else {"sent": 0, "failed": 0, "dropped": 0, "pending": 0}
            ),
        }


def _in_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
