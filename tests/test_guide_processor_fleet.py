"""Code written from the processor fleet's ProcessorClient guide runs on framepipe as written.

The guide's steps, in its order, with its names and settings: a ``FaceRecognitionProcessor``
subclass built with the guide's keywords (``processor_id``, ``capabilities``,
``orchestrator_url`` from ``ORCHESTRATOR_URL``, ``capacity=10``, ``result_stream``), decoding
``base64.b64decode(frame_data[b"image_data"])``; the constructor's positional order and its
``health_port`` / ``health_check_interval``; the compose file's environment (``PROCESSOR_ID``,
``REDIS_HOST``, ``REDIS_PORT``, ``ORCHESTRATOR_URL``); the guide's main (``signal.signal``
handlers calling ``processor.stop()``, ``asyncio.run(processor.start())``); frames injected and
the results read back from ``faces:detected``; the built-in health endpoint.

Redis is the server on 127.0.0.1:6379 (``FRAMEPIPE_TEST_REDIS_URL``); each test works in a
namespace of its own (``FRAMEPIPE_NAMESPACE`` for the processes), and deletes the entries it
added to ``faces:detected``, which is not namespaced.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conftest import REDIS_URL, redis_namespace
from framepipe.backoff import Backoff
from framepipe.errors import ConfigError, RegistryConnectionError
from framepipe.frames import Frame
from framepipe.processors import ProcessorClient, ProcessorRegistry
from framepipe.processors.fleet.registry import Registration
from waiting import free_port, wait_until_async

redis_sync = pytest.importorskip("redis")

RESULT_STREAM = "faces:detected"  # the guide's; not namespaced, so entries are deleted by id
ORCHESTRATOR = "http://frame-buffer-v2:8002"
FAST = Backoff(0.05, 2.0, 0.5, 0.1)

# The guide's "After (ProcessorClient Pattern)" class and "Update Main Entry Point" main, line by
# line. Only the import (framepipe's module instead of the frame-buffer-v2 copy),
# load_face_detection_model (the team's own: here a stand-in that finds the bright square of the
# test frames in the decoded JPEG) and the one health_port line (the guide's "Issue 4": use the
# client's built-in health endpoint) are not the guide's text.
GUIDE_PROCESSOR = '''
import asyncio
import base64
import os
import signal
import time
from typing import Dict

import cv2
import numpy as np

from framepipe.processors import ProcessorClient


class BrightSquareModel:
    def detect(self, image_data):
        image = cv2.imdecode(np.frombuffer(image_data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError("image_data is not an image")
        ys, xs = np.nonzero(image > 128)
        if len(xs) == 0:
            return []
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        return [{"box": box, "image_size": [int(image.shape[1]), int(image.shape[0])]}]


def load_face_detection_model():
    return BrightSquareModel()


class FaceRecognitionProcessor(ProcessorClient):
    def __init__(self):
        super().__init__(
            processor_id="face-recognition-1",
            capabilities=["face_detection", "face_recognition"],
            orchestrator_url=os.getenv("ORCHESTRATOR_URL", "http://frame-buffer-v2:8002"),
            capacity=10,
            result_stream="faces:detected",
            health_port=int(os.environ["HEALTH_PORT"]),
        )
        self.model = None

    async def start(self):
        # Load model before starting
        self.model = await self.load_model()
        await super().start()

    async def process_frame(self, frame_data: Dict[bytes, bytes]) -> Dict:
        """Process a single frame - this is the only method you need to implement."""
        # Extract frame data
        frame_id = frame_data[b"frame_id"].decode()
        image_data = base64.b64decode(frame_data[b"image_data"])

        # Your processing logic here
        faces = await self.detect_faces(image_data)

        # Return results
        return {
            "frame_id": frame_id,
            "faces_detected": len(faces),
            "faces": faces,
            "processor_id": self.processor_id,
            "timestamp": time.time()
        }

    async def load_model(self):
        # Your model loading logic
        return load_face_detection_model()

    async def detect_faces(self, image_data):
        # Your face detection logic
        return self.model.detect(image_data)


if __name__ == "__main__":
    processor = FaceRecognitionProcessor()

    # Handle graceful shutdown
    def signal_handler(signum, frame):
        processor.stop()

    signal.signal(signal.SIGINT, signal_handler)
    signal.signal(signal.SIGTERM, signal_handler)

    asyncio.run(processor.start())
'''


# -- helpers --------------------------------------------------------------------------------


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh namespace on the real Redis; its keys are deleted afterwards."""
    with redis_namespace("fpguide:") as namespace:
        yield namespace


class Quiet(ProcessorClient):
    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        return None


def square_frame(seq: int, camera: str = "front-door") -> tuple[Frame, list[int]]:
    """A black 160x120 frame with a white square whose place depends on ``seq``; and its box."""
    image = np.zeros((120, 160, 3), np.uint8)
    left, top = 10 + 7 * seq, 20 + 3 * seq
    cv2.rectangle(image, (left, top), (left + 39, top + 29), (255, 255, 255), thickness=-1)
    return Frame(image=image, source_id=camera, seq=seq), [left, top, left + 40, top + 30]


def http_get(port: int, path: str = "/health", method: str = "GET") -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        body = response.read()
        return response.status, json.loads(body) if body else {}
    finally:
        conn.close()


def results_for(frame_ids: set[str]) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of ``faces:detected`` for ``frame_ids`` (``XREAD STREAMS faces:detected 0``)."""
    client = redis_sync.Redis.from_url(REDIS_URL)
    try:
        reply = client.xread({RESULT_STREAM: "0"}) or []
        entries = [entry for _stream, rows in reply for entry in rows]
        return [(mid, f) for mid, f in entries if f[b"frame_id"].decode() in frame_ids]
    finally:
        client.close()


def delete_results(frame_ids: set[str]) -> None:
    mids = [mid for mid, _fields in results_for(frame_ids)]
    if mids:
        client = redis_sync.Redis.from_url(REDIS_URL)
        try:
            client.xdel(RESULT_STREAM, *mids)
        finally:
            client.close()


def guide_environment(ns: str, health_port: int) -> dict[str, str]:
    """The compose file's environment (``ORCHESTRATOR_URL``, ``PROCESSOR_ID``, ``REDIS_HOST``,
    ``REDIS_PORT``), pointed at the test's Redis, in the test's namespace."""
    url = urllib.parse.urlsplit(REDIS_URL)
    if url.scheme != "redis" or url.password or url.path.strip("/") not in ("", "0"):
        pytest.skip(f"REDIS_HOST/REDIS_PORT cannot name the test Redis {REDIS_URL} (db, password)")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("REDIS_URL", "PROCESSOR_ID", "ORCHESTRATOR_URL", "FRAMEPIPE_NAMESPACE")
    }
    env.update(
        ORCHESTRATOR_URL=ORCHESTRATOR,
        PROCESSOR_ID="face-recognition-1",
        REDIS_HOST=url.hostname or "127.0.0.1",
        REDIS_PORT=str(url.port or 6379),
        FRAMEPIPE_NAMESPACE=ns,
        HEALTH_PORT=str(health_port),
    )
    return env


# -- 2. the guide's class: its keywords, positional order and defaults ------------------------


def test_the_guides_constructor_keywords_work_with_its_defaults() -> None:
    client = Quiet(
        processor_id="face-recognition-1",
        capabilities=["face_detection", "face_recognition"],
        orchestrator_url=ORCHESTRATOR,
        result_stream="faces:detected",
        health_port=8080,
        health_check_interval=12.0,
        environ={},
    )
    assert client.capacity == 10  # "capacity: int = 10"
    assert client.health_interval == 12.0 and client.health_port == 8080
    assert client.orchestrator_url == ORCHESTRATOR and client.result_stream == "faces:detected"
    assert client.image_encoding == "base64"  # "b'image_data': Base64 encoded image data"
    assert client.redis_url == "redis://127.0.0.1:6379/0" and client.redis_url_source == "default"


def test_the_guides_positional_order_works() -> None:
    # processor_id, capabilities, orchestrator_url, capacity, redis_client, redis_url,
    # result_stream, health_port, health_check_interval
    client = Quiet(
        "object-detection-1",
        ["object_detection", "yolo_v8"],
        ORCHESTRATOR,
        8,
        None,
        "redis://redis:6379",
        "objects:detected",
        8081,
        30.0,
        environ={},
    )
    assert client.processor_id == "object-detection-1"
    assert client.capabilities == ("object_detection", "yolo_v8")
    assert (client.capacity, client.redis_url, client.result_stream) == (
        8,
        "redis://redis:6379",
        "objects:detected",
    )
    assert (client.health_port, client.health_interval) == (8081, 30.0)


def test_framepipes_own_names_keep_working() -> None:
    client = Quiet(
        "motion-1",
        ["motion_detection"],
        capacity=4,
        health_interval=2.0,
        namespace="fp:",
        image_encoding="raw",
        redis_url="redis://127.0.0.1:6379/0",
        environ={},
    )
    assert (client.capacity, client.health_interval, client.namespace) == (4, 2.0, "fp:")
    assert client.image_encoding == "raw"
    with pytest.raises(ValueError, match="one setting"):
        Quiet("m", ["c"], health_interval=2.0, health_check_interval=30.0, environ={})
    # framepipe's earlier positional order had capacity third: refused, not misread
    with pytest.raises(TypeError, match="orchestrator_url"):
        Quiet("m", ["c"], 4, environ={})  # type: ignore[arg-type]


# -- 3. the compose file's environment ---------------------------------------------------------


def test_the_compose_files_environment_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REDIS_URL", "FRAMEPIPE_NAMESPACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ORCHESTRATOR_URL", ORCHESTRATOR)
    monkeypatch.setenv("PROCESSOR_ID", "face-recognition-2")
    monkeypatch.setenv("REDIS_HOST", "redis")
    monkeypatch.setenv("REDIS_PORT", "6380")
    client = Quiet(processor_id="face-recognition-1", capabilities=["face_detection"])
    assert client.processor_id == "face-recognition-2"  # the deployment's replica id wins
    assert client.stream.endswith(":proc:face-recognition-2:frames")
    assert client.redis_url == "redis://redis:6380/0"
    assert client.redis_url_source == "REDIS_HOST/REDIS_PORT"
    assert client.orchestrator_url == ORCHESTRATOR
    # the code's explicit redis_url wins over the environment
    assert Quiet("x", ["c"], redis_url="redis://other:1/2").redis_url == "redis://other:1/2"
    monkeypatch.setenv("REDIS_PORT", "six")
    with pytest.raises(ValueError, match="REDIS_PORT"):
        Quiet("x", ["c"])
    # the id may come from the environment alone
    assert Quiet(capabilities=["c"], environ={"PROCESSOR_ID": "p-9"}).processor_id == "p-9"
    with pytest.raises(ValueError, match="PROCESSOR_ID"):
        Quiet(capabilities=["c"], environ={})
    # a redis:// orchestrator URL names the registry's Redis when nothing else does
    client = Quiet("x", ["c"], environ={"ORCHESTRATOR_URL": "redis://registry:6379/1"})
    assert client.redis_url == "redis://registry:6379/1"


def test_a_long_heartbeat_period_is_not_taken_for_death() -> None:
    """The guide's ``health_check_interval`` is 30 s; its rollback plan raises it further. The
    registry waits three periods when that is longer than its ``heartbeat_timeout``."""
    from framepipe.processors.fleet.breaker import CircuitBreaker
    from framepipe.processors.fleet.keys import Keys

    proc = Registration("p", Keys(), CircuitBreaker.__new__(CircuitBreaker))
    proc.update({b"health_interval": b"30.0", b"last_heartbeat": b"1"}, 0.0)
    assert proc.silence_limit(15.0) == 90.0
    proc.update({b"health_interval": b"0.2", b"last_heartbeat": b"2"}, 0.0)
    assert proc.silence_limit(15.0) == 15.0
    proc.update({b"last_heartbeat": b"3"}, 0.0)  # a processor that does not say
    assert proc.silence_limit(15.0) == 15.0


# -- 2. (cont.) the frame data format: base64 image_data ---------------------------------------


def test_a_processor_decoding_base64_gets_the_image_and_one_reading_raw_bytes_is_told(
    ns: str,
) -> None:
    class GuideStyle(ProcessorClient):
        async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any]:
            image_data = base64.b64decode(frame_data[b"image_data"])
            image = cv2.imdecode(np.frombuffer(image_data, np.uint8), cv2.IMREAD_COLOR)
            return {"jpeg": image_data[:2].hex(), "shape": list(image.shape)}

    class RawStyle(ProcessorClient):
        async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any]:
            from framepipe.frames import decode_jpeg

            return {"shape": list(decode_jpeg(frame_data[b"image_data"]).shape)}

    async def main() -> None:
        common: dict[str, Any] = dict(
            redis_url=REDIS_URL, namespace=ns, health_interval=0.2, backoff=FAST, environ={}
        )
        guide = GuideStyle("guide", ["faces"], result_stream=f"{ns}r", **common)
        raw = RawStyle("raw", ["motion"], result_stream=f"{ns}r", **common)
        tasks = [asyncio.create_task(c.start()) for c in (guide, raw)]
        try:
            async with ProcessorRegistry(REDIS_URL, ns) as registry:
                for capability in ("faces", "motion"):
                    await registry.wait_for_processor(capability, timeout=10)
                frame, _box = square_frame(1)
                got = (await registry.call(frame, "faces")).check()
                assert got.data == {"jpeg": "ffd8", "shape": [120, 160, 3]}
                failed = await registry.call(frame, "motion")
                assert not failed.ok and failed.error_kind == "processor"
                assert failed.error is not None and "image_encoding='raw'" in failed.error
        finally:
            for client in (guide, raw):
                client.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), 15)

    asyncio.run(asyncio.wait_for(main(), 60))


# -- the health endpoint ------------------------------------------------------------------------


def test_the_health_endpoint_reports_starting_then_closes_when_redis_never_comes() -> None:
    port = free_port()
    client = Quiet(
        "face-recognition-1",
        ["face_detection"],
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        health_port=port,
        connect_retries=2,
        backoff=Backoff(1.0, 1.0, 1.0, 0.0),
        environ={},
    )

    async def main() -> None:
        task = asyncio.create_task(client.start())
        status, body = await wait_until_async(
            "the health endpoint answers",
            lambda: asyncio.to_thread(_try_get, port),
            timeout=5,
        )
        assert status == 503
        assert body["state"] == "starting" and body["status"] == "unhealthy"
        assert body["processor_id"] == "face-recognition-1" and body["capacity"] == 10
        assert (await asyncio.to_thread(http_get, port, "/nope"))[0] == 404
        assert (await asyncio.to_thread(http_get, port, "/health", "POST"))[0] == 405
        with pytest.raises(RegistryConnectionError):
            await asyncio.wait_for(task, 20)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(http_get, port)

    asyncio.run(main())


def test_the_health_endpoint_is_healthy_while_ready_and_not_while_draining(ns: str) -> None:
    finish = asyncio.Event()  # the frame in flight ends when the test says so

    class Slow(ProcessorClient):
        async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any]:
            await finish.wait()
            return {"frame_id": frame_data[b"frame_id"].decode()}

    port = free_port()
    client = Slow(
        "slow-1",
        ["slow"],
        redis_url=REDIS_URL,
        namespace=ns,
        result_stream=f"{ns}r",
        health_port=port,
        health_interval=0.2,
        environ={},
    )

    async def main() -> None:
        task = asyncio.create_task(client.start())
        async with ProcessorRegistry(REDIS_URL, ns) as registry:
            await registry.wait_for_processor("slow", timeout=10)
            status, body = await asyncio.to_thread(http_get, port)
            assert (status, body["state"], body["status"]) == (200, "ready", "healthy")
            assert body["processor_id"] == "slow-1" and body["capabilities"] == ["slow"]
            assert (await asyncio.to_thread(http_get, port, "/health", "HEAD"))[0] == 200
            call = asyncio.create_task(registry.call(square_frame(0)[0], "slow"))
            await wait_until_async("the frame is in flight", lambda: client.in_flight == 1)
            client.stop()
            status, body = await asyncio.to_thread(http_get, port)
            assert (status, body["state"], body["in_flight"]) == (503, "draining", 1)
            finish.set()
            assert (await call).ok  # the frame in flight finishes
            await asyncio.wait_for(task, 15)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.to_thread(http_get, port)

    asyncio.run(asyncio.wait_for(main(), 60))


def _try_get(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        return http_get(port)
    except OSError:
        return None


def _ready(port: int) -> tuple[int, dict[str, Any]] | None:
    answer = _try_get(port)
    return answer if answer and answer[0] == 200 else None


def test_a_health_port_in_use_fails_the_start_naming_it(ns: str) -> None:
    async def main() -> None:
        busy = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        port = busy.sockets[0].getsockname()[1]
        try:
            client = Quiet(
                "p", ["c"], redis_url=REDIS_URL, namespace=ns, health_port=port, environ={}
            )
            with pytest.raises(ConfigError, match=f"health_port {port}"):
                await client.start()
            assert not client.running
        finally:
            busy.close()

    asyncio.run(main())


# -- 3.-4. and "Testing Your Migration": the guide's processor as the guide starts it -----------


@pytest.mark.slow
def test_the_guides_processor_started_as_the_guide_starts_it(ns: str, tmp_path: Path) -> None:
    script = tmp_path / "main.py"
    script.write_text(GUIDE_PROCESSOR)
    health_port = free_port()
    stderr = tmp_path / "stderr.txt"
    frame_ids: set[str] = set()

    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script)], env=guide_environment(ns, health_port), stderr=err
        )

    async def main() -> None:
        try:
            async with ProcessorRegistry(REDIS_URL, ns) as registry:
                info = await registry.wait_for_processor("face_recognition", timeout=30)
                assert info.processor_id == "face-recognition-1" and info.capacity == 10
                assert set(info.capabilities) == {"face_detection", "face_recognition"}
                assert info.result_stream == RESULT_STREAM

                status, health = await wait_until_async(
                    "the health endpoint is ready",
                    lambda: asyncio.to_thread(_ready, health_port),
                    timeout=10,
                )
                assert health["state"] == "ready" and health["status"] == "healthy"
                assert health["processor_id"] == "face-recognition-1"
                env = guide_environment(ns, health_port)
                assert health["redis"] == f"redis://{env['REDIS_HOST']}:{env['REDIS_PORT']}/0"
                assert health["orchestrator_url"] == ORCHESTRATOR
                assert health["image_encoding"] == "base64" and health["capacity"] == 10

                # the injector: frames to the capability, the results on faces:detected
                frames = [square_frame(seq) for seq in range(6)]
                results = await asyncio.gather(
                    *(registry.call(frame, "face_detection") for frame, _box in frames)
                )
                frame_ids.update(r.frame_id for r in results)
                for result, (_frame, box) in zip(results, frames, strict=True):
                    data = result.check().data
                    assert data is not None and data["faces_detected"] == 1
                    assert data["processor_id"] == "face-recognition-1"
                    assert data["frame_id"] == result.frame_id
                    found = data["faces"][0]["box"]
                    assert all(abs(a - b) <= 2 for a, b in zip(found, box, strict=True)), (
                        found,
                        box,
                    )
                    assert data["faces"][0]["image_size"] == [160, 120]
                published = results_for(frame_ids)
                assert len(published) == len(frames)
                for _mid, fields in published:
                    assert fields[b"status"] == b"ok"
                    assert fields[b"processor_id"] == b"face-recognition-1"
                    assert json.loads(fields[b"result"])["faces_detected"] == 1
                status, health = await asyncio.to_thread(http_get, health_port)
                assert status == 200 and health["processed"] == len(frames)

                # the guide's signal handler: processor.stop(), then asyncio.run returns
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 20)
                assert code == 0, stderr.read_text()
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.to_thread(http_get, health_port)
                await wait_until_async(
                    "the processor is deregistered",
                    lambda: not registry.processors(include_departed=False),
                    timeout=10,
                )
        finally:
            delete_results(frame_ids)

    try:
        asyncio.run(asyncio.wait_for(main(), 90))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- what the documents promise -----------------------------------------------------------------


def test_the_documents_state_the_fleets_rules() -> None:
    """The README's fleet paragraphs, the migration guide and the example's README say what
    the fleet enforces (one process per id: test_fleet_identity; the result stream a stream:
    test_fleet_publishing; a refusing Redis waited out: test_fleet_outages), and the example
    no longer promises a re-route that happens only while a processor with the capability is
    live."""
    root = Path(__file__).resolve().parent.parent

    def flat(name: str) -> str:
        return " ".join((root / name).read_text().split())

    readme = flat("README.md")
    fleet = readme[readme.index("## Processors that register") : readme.index("## MQTT")]
    guide = flat("docs/migrating-processor-fleet.md")
    for text in (fleet, guide):
        assert "id of its own" in text and "ConfigError" in text
        assert "a key of another type" in text
        for code in ("LOADING", "BUSY", "OOM", "READONLY"):
            assert f"`{code}`" in text
    example = flat("examples/processor_fleet/README.md")
    assert "re-routes them to another processor with the capability." not in example
    assert "With none live, they wait in its stream" in example
