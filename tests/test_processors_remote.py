"""Remote processors against the real Redis: registration, routing by capability and load,
capacity, bad input, circuit breaker, silent and SIGTERM'd processor processes, a Redis
restart, an unreachable Redis, and a stream pipeline stage served by a registered processor.

Redis is the server on 127.0.0.1:6379 (or ``FRAMEPIPE_TEST_REDIS_URL``); every test works in a
namespace of its own and deletes its keys. Failure tests run processors as real processes.
Without Redis (or the ``redis`` package) the tests skip, except under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import IN_CI, REDIS_URL

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

from framepipe.backoff import Backoff
from framepipe.errors import (
    CircuitOpenError,
    NoProcessorError,
    ProcessorRegistryError,
    RegistryConnectionError,
    RemoteProcessingError,
)
from framepipe.frames import Frame, encode_jpeg
from framepipe.processors import (
    ProcessorClient,
    ProcessorRegistry,
    ProcessorResult,
    RemoteProcessor,
)
from framepipe.sources import PatternSource
from framepipe.stream import Sink, Stage, StreamPipeline
from redis_servers import PrivateRedis
from waiting import free_port, wait_until_async

TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-01$")
FAST = Backoff(0.05, 2.0, 0.5, 0.1)


# -- fixtures and helpers -------------------------------------------------------------------


def sync_redis(url: str = REDIS_URL) -> redis_sync.Redis:
    return redis_sync.Redis.from_url(url, socket_connect_timeout=2)


def make_frame(seq: int, source: str = "cam", **meta: Any) -> Frame:
    image = np.full((48, 64, 3), seq % 256, np.uint8)
    return Frame(image=image, source_id=source, seq=seq, meta=dict(meta))


class Detector(ProcessorClient):
    """An in-process processor: records concurrency; ``mode`` in the frame's metadata picks a
    misbehaviour (``raise``, ``object``, ``list``, ``sleep``)."""

    def __init__(
        self,
        processor_id: str,
        capabilities: list[str],
        ns: str,
        *,
        delay: float = 0.0,
        url: str = REDIS_URL,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("capacity", 2)
        kwargs.setdefault("health_interval", 0.2)
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("image_encoding", "raw")  # framepipe's own style: the JPEG bytes
        super().__init__(
            processor_id,
            capabilities,
            result_stream=f"{ns}faces:detected",
            redis_url=url,
            namespace=ns,
            **kwargs,
        )
        self.delay = delay
        self.fail = False
        self.active = 0
        self.peak = 0
        self.seen: list[dict[bytes, bytes]] = []

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        self.seen.append(frame_data)
        meta = self.metadata(frame_data)
        options = {**meta.get("meta", {}), **meta}  # a Frame's meta is nested
        mode = options.get("mode")
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(float(options.get("sleep", self.delay)))
        finally:
            self.active -= 1
        if self.fail or mode == "raise":
            raise RuntimeError("detector exploded")
        if mode == "object":
            return {"faces": [object()]}
        if mode == "list":
            return [1, 2]  # type: ignore[return-value]
        if mode == "none":
            return None
        return {
            "faces": 1,
            "processor": self.processor_id,
            "camera": frame_data[b"camera_id"].decode(),
            "seq": meta.get("seq"),
            "jpeg": frame_data[b"image_data"][:2].hex(),
        }


@contextlib.asynccontextmanager
async def serving(*clients: ProcessorClient) -> AsyncIterator[None]:
    """Run in-process processors for the block; stop them gracefully afterwards."""
    tasks = [asyncio.create_task(c.start()) for c in clients]
    try:
        for client, task in zip(clients, tasks, strict=True):
            waiter = asyncio.ensure_future(client.wait_registered())
            await asyncio.wait({waiter, task}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                task.result()  # raise its error
            assert waiter.done(), f"{client.processor_id} did not register"
        yield
    finally:
        for client in clients:
            client.stop()
        done, _ = await asyncio.wait(tasks, timeout=15)
        assert len(done) == len(tasks), "a processor did not stop"
        for task in tasks:
            task.result()


def results_on(url: str, stream: str) -> list[dict[bytes, bytes]]:
    client = sync_redis(url)
    try:
        return [fields for _mid, fields in client.xrange(stream)]
    finally:
        client.close()


PROCESSOR_SCRIPT = """
import asyncio, json, os, sys
from framepipe.logs import configure_logging
from framepipe.processors import ProcessorClient

cfg = json.loads(sys.argv[1])
configure_logging("INFO", stream=sys.stderr)

class Worker(ProcessorClient):
    async def process_frame(self, frame_data):
        frame_id = frame_data[b"frame_id"].decode()
        print("start", frame_id, flush=True)
        await asyncio.sleep(cfg["delay"])
        print("done", frame_id, flush=True)
        return {"processor": self.processor_id, "pid": os.getpid()}

async def main():
    worker = Worker(cfg["id"], cfg["capabilities"], capacity=cfg["capacity"],
                    result_stream=cfg["results"], redis_url=cfg["url"],
                    health_interval=cfg["health"], namespace=cfg["ns"])
    worker.install_signal_handlers()
    await worker.start()
    print("exited", flush=True)

asyncio.run(main())
"""


class ProcessorProcess:
    """A processor running as its own Python process (the script above)."""

    def __init__(
        self,
        tmp_path: Path,
        ns: str,
        processor_id: str,
        *,
        capacity: int,
        delay: float,
        capabilities: tuple[str, ...] = ("face_detection",),
    ) -> None:
        script = tmp_path / "processor_main.py"
        script.write_text(PROCESSOR_SCRIPT)
        self.script = script
        self.cfg = {
            "id": processor_id,
            "capabilities": list(capabilities),
            "capacity": capacity,
            "results": f"{ns}faces:detected",
            "url": REDIS_URL,
            "health": 0.2,
            "ns": ns,
            "delay": delay,
        }
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(self.script),
            json.dumps(self.cfg),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())
            self._changed.set()

    def count(self, word: str) -> int:
        return sum(1 for line in self.lines if line.split()[:1] == [word])

    async def wait_lines(self, word: str, n: int, within: float = 10.0) -> None:
        deadline = time.monotonic() + within
        while self.count(word) < n:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"only {self.count(word)} {word!r} lines: {self.lines}"
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def exited(self) -> int:
        """Wait for the process to exit by itself; its exit code."""
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    async def finish(self) -> int:
        """Kill the process if it still runs; its exit code."""
        assert self.proc is not None
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code


# -- registration, routing, results -----------------------------------------------------------


def test_route_and_call_carry_frame_id_and_trace_context(ns: str) -> None:
    async def main() -> None:
        detector = Detector("face-1", ["face_detection", "face_recognition"], ns)
        async with serving(detector), ProcessorRegistry(REDIS_URL, ns) as registry:
            [info] = registry.processors()
            assert info.processor_id == "face-1" and info.state == "ready"
            assert info.capabilities == ("face_detection", "face_recognition")
            assert info.capacity == 2 and info.circuit == "closed"

            # a Frame: JPEG on the wire, a trace context made for it
            result = await registry.call(make_frame(7), "face_detection")
            assert result.ok and result.processor_id == "face-1"
            assert result.data is not None and result.data["jpeg"] == "ffd8"
            assert result.data["camera"] == "cam" and result.data["seq"] == 7
            assert TRACEPARENT.match(result.trace_context)
            assert result.frame_id.startswith("cam:7:")

            # an entry dict with its own ids (and base64 image data, as older services send)
            trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
            entry = {
                "frame_id": "door-42",
                "camera_id": "door",
                "timestamp": "2026-11-02T10:00Z",
                "image_data": base64.b64encode(jpeg),
                "width": 8,
                "height": 8,
                "format": "jpeg",
                "metadata": {"seq": 42},
                "trace_context": trace,
            }
            result = await registry.call(entry, "face_recognition")
            assert (result.frame_id, result.trace_context) == ("door-42", trace)
            assert detector.seen[-1][b"image_data"] == jpeg  # raw bytes for process_frame

            # route(): fire and forget; the result lands on the processor's result stream
            message_id = await registry.route(dict(entry, frame_id="door-43"), "face_detection")
            assert re.match(r"^\d+-\d+$", message_id)
            stream = f"{ns}faces:detected"
            await wait_until_async(
                "the routed frame's result never reached faces:detected",
                lambda: len(results_on(REDIS_URL, stream)) == 3,
                5,
            )
            published = {f[b"frame_id"]: f for f in results_on(REDIS_URL, stream)}
            assert published[b"door-42"][b"trace_context"] == trace.encode()
            assert published[b"door-43"][b"trace_context"] == trace.encode()
            assert published[b"door-43"][b"status"] == b"ok"
            assert json.loads(published[b"door-43"][b"result"])["faces"] == 1
            await wait_until_async(
                "the routed frame's capacity was never released",
                lambda: registry.processors()[0].outstanding == 0,
                5,
            )
            # everything handled was acknowledged and removed from the processor's stream
            client = sync_redis()
            assert client.xlen(f"{ns}proc:face-1:frames") == 0
            client.close()
        client = sync_redis()
        assert client.smembers(f"{ns}processors") == set()  # deregistered on stop
        assert not client.exists(f"{ns}proc:face-1", f"{ns}proc:face-1:frames")
        client.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_reply_stream_is_trimmed_once_read(ns: str) -> None:
    async def main() -> None:
        detector = Detector("face-1", ["face_detection"], ns, capacity=4)
        async with (
            serving(detector),
            ProcessorRegistry(REDIS_URL, ns, poll_interval=0.05) as registry,
        ):
            results = await asyncio.gather(
                *(registry.call(make_frame(i), "face_detection") for i in range(40))
            )
            assert all(r.ok for r in results)
            client = sync_redis()
            try:
                # read replies are not deleted one by one on the hot path; the health watch
                # trims everything read so far
                await wait_until_async(
                    "the reply stream was never trimmed",
                    lambda: client.xlen(registry.reply_stream) == 0,
                    10,
                )
                assert (await registry.call(make_frame(99), "face_detection")).ok
                await wait_until_async(
                    "the reply stream was not trimmed again",
                    lambda: client.xlen(registry.reply_stream) == 0,
                    10,
                )
                # the result stream keeps every result
                assert len(results_on(REDIS_URL, f"{ns}faces:detected")) == 41
            finally:
                client.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_process_frame_runs_in_the_frames_trace_context(ns: str) -> None:
    otel_trace = pytest.importorskip("opentelemetry.trace")
    propagate = pytest.importorskip("opentelemetry.propagate")

    class Traced(ProcessorClient):
        async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any]:
            context = otel_trace.get_current_span().get_span_context()
            carrier: dict[str, str] = {}
            propagate.inject(carrier)  # what the service would pass on to the next hop
            return {
                "trace_id": f"{context.trace_id:032x}",
                "span_id": f"{context.span_id:016x}",
                "remote": context.is_remote,
                "sampled": context.trace_flags.sampled,
                "injected": carrier.get("traceparent", ""),
            }

    async def main() -> None:
        traced = Traced(
            "traced",
            ["face_detection"],
            result_stream=f"{ns}faces:detected",
            redis_url=REDIS_URL,
            namespace=ns,
        )
        async with serving(traced), ProcessorRegistry(REDIS_URL, ns) as registry:
            jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
            for flags in ("01", "00"):
                trace = f"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-{flags}"
                result = (
                    await registry.call(
                        {"image_data": jpeg, "trace_context": trace}, "face_detection"
                    )
                ).check()
                assert result.data == {
                    "trace_id": "0af7651916cd43dd8448eb211c80319c",
                    "span_id": "b7ad6b7169203331",
                    "remote": True,
                    "sampled": flags == "01",
                    "injected": trace,
                }
            # an all-zero trace id is not a trace: process_frame runs without one
            bad = "00-00000000000000000000000000000000-b7ad6b7169203331-01"
            result = (
                await registry.call({"image_data": jpeg, "trace_context": bad}, "face_detection")
            ).check()
            assert result.data is not None and result.data["trace_id"] == "0" * 32
            # and the context does not leak into the next frame
            assert otel_trace.get_current_span().get_span_context().trace_id == 0

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.slow
def test_capacity_is_never_exceeded(ns: str) -> None:
    async def main() -> None:
        detector = Detector("cap-2", ["face_detection"], ns, capacity=2, delay=0.05)
        async with serving(detector), ProcessorRegistry(REDIS_URL, ns) as registry:
            # an over-eager producer writes 12 entries straight into the processor's stream
            client = sync_redis()
            jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
            for i in range(12):
                client.xadd(
                    f"{ns}proc:cap-2:frames",
                    {"frame_id": f"f{i}", "camera_id": "c", "image_data": jpeg},
                )
            client.close()
            await wait_until_async("12 frames not processed", lambda: detector.processed == 12, 10)
            assert detector.peak == 2 and detector.max_in_flight == 2
            # and through the router: 10 concurrent calls, still 2 at a time
            outstanding: list[int] = []

            async def sample() -> None:
                while True:
                    outstanding.append(registry.processors()[0].outstanding)
                    await asyncio.sleep(0.005)

            sampler = asyncio.create_task(sample())
            results = await asyncio.gather(
                *(registry.call(make_frame(i), "face_detection") for i in range(10))
            )
            sampler.cancel()
            assert all(r.ok for r in results)
            assert detector.peak == 2 and max(outstanding) == 2

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.slow
def test_frames_reach_the_processor_in_routing_order(ns: str) -> None:
    """Routes made one after the other arrive in that order: those waiting for capacity go
    first (a new route does not take the slot a waiting one was woken for), and so do those
    made while the registry's connection is still being made."""

    async def main() -> None:
        detector = Detector("ordered", ["face_detection"], ns, capacity=4)
        async with serving(detector), ProcessorRegistry(REDIS_URL, ns) as registry:
            limit = asyncio.Semaphore(8)  # the injector's pattern: 8 calls in flight at most

            async def one(seq: int) -> ProcessorResult:
                try:
                    return await registry.call(make_frame(seq), "face_detection")
                finally:
                    limit.release()

            calls = []
            for seq in range(80):
                await limit.acquire()
                calls.append(asyncio.create_task(one(seq)))
            assert all(r.ok for r in await asyncio.gather(*calls))
            arrived = [int(f[b"frame_id"].split(b":")[1]) for f in detector.seen]
            assert arrived == list(range(80))

    for _ in range(3):
        asyncio.run(asyncio.wait_for(main(), 60))


def test_routing_by_capability_and_least_load(ns: str) -> None:
    async def main() -> None:
        faces = Detector("faces", ["face_detection"], ns, capacity=4, delay=0.2)
        both = Detector("both", ["face_detection", "object_detection"], ns, capacity=4, delay=0.2)
        async with serving(faces, both), ProcessorRegistry(REDIS_URL, ns) as registry:
            objects = await asyncio.gather(
                *(registry.call(make_frame(i), "object_detection") for i in range(3))
            )
            assert [r.processor_id for r in objects] == ["both"] * 3
            face_results = await asyncio.gather(
                *(registry.call(make_frame(i), "face_detection") for i in range(4))
            )
            by = sorted(r.processor_id for r in face_results)
            assert by == ["both", "both", "faces", "faces"]  # spread by load, not capacity
            assert registry.capabilities() == {
                "face_detection": ["both", "faces"],
                "object_detection": ["both"],
            }

    asyncio.run(asyncio.wait_for(main(), 60))


def test_unknown_capability_names_what_is_on_offer(ns: str) -> None:
    async def main() -> None:
        async with ProcessorRegistry(REDIS_URL, ns) as registry:
            with pytest.raises(NoProcessorError, match="none"):
                await registry.route(make_frame(1), "face_detection")
            detector = Detector("face-1", ["face_detection", "face_recognition"], ns)
            async with serving(detector):
                with pytest.raises(NoProcessorError) as caught:
                    await registry.route(make_frame(1), "teleportation")
                assert caught.value.capability == "teleportation"
                assert caught.value.offered == ["face_detection", "face_recognition"]
                assert "'teleportation'" in str(caught.value)
                assert "'face_detection', 'face_recognition'" in str(caught.value)
                # the processor registered after the registry's last read: found anyway
                assert (await registry.call(make_frame(2), "face_detection")).ok

    asyncio.run(asyncio.wait_for(main(), 60))


def test_bad_results_and_malformed_entries_are_reported_and_acked(ns: str) -> None:
    async def main() -> None:
        detector = Detector("face-1", ["face_detection"], ns, frame_timeout=0.3)
        async with (
            serving(detector),
            ProcessorRegistry(REDIS_URL, ns, circuit_failures=100) as registry,
        ):
            call = registry.call
            bad = await call(make_frame(1, mode="object"), "face_detection")
            assert not bad.ok and bad.error_kind == "output"
            assert bad.error is not None and "not JSON-serialisable" in bad.error
            with pytest.raises(RemoteProcessingError, match="JSON") as caught:
                bad.check()
            assert caught.value.frame_id == bad.frame_id and caught.value.kind == "output"
            listed = await call(make_frame(2, mode="list"), "face_detection")
            assert listed.error_kind == "output" and "list" in (listed.error or "")
            raised = await call(make_frame(3, mode="raise"), "face_detection")
            assert raised.error_kind == "processor"
            assert raised.error == "RuntimeError: detector exploded"
            empty = await call(make_frame(4, mode="none"), "face_detection")
            assert empty.ok and empty.data is None
            slow = await call(make_frame(6, sleep=5), "face_detection")
            assert slow.error_kind == "processor" and "frame_timeout=0.3s" in (slow.error or "")

            jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
            malformed = [
                ({"camera_id": "c"}, "image_data"),
                ({"image_data": b"definitely not a jpeg"}, "not a jpeg image"),
                ({"image_data": jpeg, "metadata": "{oops"}, "metadata is not JSON"),
                ({"image_data": jpeg, "metadata": "[" * 100_000}, "metadata is JSON nested too"),
                ({"image_data": jpeg, "width": "wide"}, "width"),
            ]
            for fields, message in malformed:
                result = await call(fields, "face_detection")
                assert not result.ok and result.error_kind == "input", result
                assert message in (result.error or ""), result.error
            # the processor kept going, and acknowledged every entry
            assert (await call(make_frame(5), "face_detection")).ok
            client = sync_redis()
            assert client.xlen(f"{ns}proc:face-1:frames") == 0
            assert client.xpending(f"{ns}proc:face-1:frames", "processors")["pending"] == 0
            statuses = [f[b"status"] for f in results_on(REDIS_URL, f"{ns}faces:detected")]
            client.close()
            assert statuses.count(b"error") == 9  # errors are published too
            assert detector.failed == 9

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.slow
def test_circuit_breaker_opens_then_half_opens_then_closes(ns: str) -> None:
    async def main() -> None:
        detector = Detector("flaky", ["face_detection"], ns)
        detector.fail = True
        async with (
            serving(detector),
            ProcessorRegistry(REDIS_URL, ns, circuit_failures=3, circuit_reset=0.5) as registry,
        ):
            for i in range(3):
                assert not (await registry.call(make_frame(i), "face_detection")).ok
            assert registry.processors()[0].circuit == "open"
            with pytest.raises(CircuitOpenError, match="flaky") as caught:
                await registry.route(make_frame(9), "face_detection")
            assert caught.value.retry_in <= 0.5
            # after the reset: one trial; it fails, so the circuit opens again at once
            await asyncio.sleep(0.6)
            assert registry.processors()[0].circuit == "half_open"
            assert not (await registry.call(make_frame(10), "face_detection")).ok
            assert registry.processors()[0].circuit == "open"
            with pytest.raises(CircuitOpenError):
                await registry.route(make_frame(11), "face_detection")
            # fixed: the next trial succeeds and closes it
            detector.fail = False
            await asyncio.sleep(0.6)
            assert (await registry.call(make_frame(12), "face_detection")).ok
            info = registry.processors()[0]
            assert info.circuit == "closed" and info.consecutive_failures == 0
            assert all(
                r.ok
                for r in await asyncio.gather(
                    *(registry.call(make_frame(20 + i), "face_detection") for i in range(4))
                )
            )

    asyncio.run(asyncio.wait_for(main(), 60))


def test_base64_style_processor_gets_base64_images(ns: str) -> None:
    class Base64Style(ProcessorClient):
        """Written like services that take base64 image data and decode it themselves."""

        async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any]:
            raw = base64.b64decode(frame_data[b"image_data"], validate=True)
            image = self.decode_image(frame_data)
            return {
                "frame_id": frame_data[b"frame_id"].decode(),
                "jpeg": raw[:2].hex(),
                "shape": list(image.shape),
            }

    async def main() -> None:
        service = Base64Style(
            processor_id="face-recognition-1",
            capabilities=["face_detection", "face_recognition"],
            orchestrator_url="http://frame-buffer-v2:8002",
            capacity=10,
            result_stream=f"{ns}faces:detected",
            redis_url=REDIS_URL,
            namespace=ns,
            image_encoding="base64",
        )
        async with serving(service), ProcessorRegistry(REDIS_URL, ns) as registry:
            result = (await registry.call(make_frame(3), "face_recognition")).check()
            assert result.data == {
                "frame_id": result.frame_id,
                "jpeg": "ffd8",
                "shape": [48, 64, 3],
            }

    asyncio.run(asyncio.wait_for(main(), 60))


# -- processor processes that die or are stopped ---------------------------------------------


@pytest.mark.slow
def test_silent_processor_is_deregistered_and_its_frames_rerouted(ns: str, tmp_path: Path) -> None:
    async def main() -> None:
        doomed = ProcessorProcess(tmp_path, ns, "doomed", capacity=3, delay=60.0)
        await doomed.start()
        rescuer = Detector("rescuer", ["face_detection"], ns, capacity=3)
        try:
            async with ProcessorRegistry(
                REDIS_URL, ns, heartbeat_timeout=1.5, result_timeout=30
            ) as registry:
                await registry.wait_for_processor("face_detection", timeout=15)
                calls = [
                    asyncio.create_task(registry.call(make_frame(i), "face_detection"))
                    for i in range(3)
                ]
                await doomed.wait_lines("start", 3)  # it holds all three
                async with serving(rescuer):
                    assert doomed.proc is not None
                    doomed.proc.send_signal(signal.SIGKILL)  # silent from now on
                    killed_at = time.monotonic()
                    results = await asyncio.gather(*calls)
                    took = time.monotonic() - killed_at
                    assert [r.ok for r in results] == [True] * 3  # 0 lost
                    assert {r.processor_id for r in results} == {"rescuer"}
                    assert sorted(r.data["seq"] for r in results if r.data) == [0, 1, 2]
                    # silent for heartbeat_timeout (1.5 s) counted from its last heartbeat,
                    # which came at most one health interval (0.2 s) before the kill
                    assert 1.5 - 0.2 <= took < 8, took
                    gone = {i.processor_id: i.state for i in registry.processors()}
                    assert gone["doomed"] == "dead"
                    client = sync_redis()
                    # the watch removes the dead one right after re-routing its entries; the
                    # re-routed results can come back before it has
                    await wait_until_async(
                        "the dead processor was never removed",
                        lambda: client.smembers(f"{ns}processors") == {b"rescuer"},
                        5,
                    )
                    assert not client.exists(f"{ns}proc:doomed", f"{ns}proc:doomed:frames")
                    client.close()
                    # re-routed entries carry the attempt number and where they came from
                    assert {f[b"attempt"] for f in rescuer.seen} == {b"2"}
                    assert {f[b"rerouted_from"] for f in rescuer.seen} == {b"doomed"}
        finally:
            assert await doomed.finish() == -signal.SIGKILL

    asyncio.run(asyncio.wait_for(main(), 90))


@pytest.mark.slow
def test_sigterm_finishes_in_flight_frames_and_hands_back_the_rest(ns: str, tmp_path: Path) -> None:
    async def main() -> None:
        worker = ProcessorProcess(tmp_path, ns, "worker", capacity=2, delay=1.0)
        await worker.start()
        stream = f"{ns}faces:detected"
        try:
            async with ProcessorRegistry(REDIS_URL, ns, heartbeat_timeout=1.5) as registry:
                await registry.wait_for_processor("face_detection", timeout=15)
                calls = [
                    asyncio.create_task(registry.call(make_frame(i), "face_detection"))
                    for i in range(2)
                ]
                await worker.wait_lines("start", 2)
                # two more entries queued behind them by another producer (not yet taken)
                client = sync_redis()
                jpeg = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
                for name in ("queued-1", "queued-2"):
                    client.xadd(
                        f"{ns}proc:worker:frames",
                        {
                            "frame_id": name,
                            "camera_id": "c",
                            "image_data": jpeg,
                            "capability": "face_detection",
                        },
                    )
                assert worker.proc is not None
                worker.proc.send_signal(signal.SIGTERM)
                # it stops taking work at once
                await wait_until_async(
                    "never draining",
                    lambda: client.hget(f"{ns}proc:worker", "state") in (b"draining", b"stopped"),
                    1.0,
                )
                results = await asyncio.gather(*calls)
                assert [(r.ok, r.processor_id) for r in results] == [(True, "worker")] * 2
                assert await asyncio.wait_for(worker.exited(), 10) == 0
                assert worker.count("done") == 2 and worker.lines[-1] == "exited"
                # the two it never took are handed to the next processor with the capability
                helper = Detector("helper", ["face_detection"], ns)
                async with serving(helper):
                    await wait_until_async(
                        "the handed-back frames were not processed",
                        lambda: len(results_on(REDIS_URL, stream)) == 4,
                        10,
                    )
                by_frame = {
                    f[b"frame_id"]: f[b"processor_id"] for f in results_on(REDIS_URL, stream)
                }
                assert by_frame[b"queued-1"] == by_frame[b"queued-2"] == b"helper"
                assert not client.exists(f"{ns}proc:worker", f"{ns}proc:worker:frames")
                assert b"worker" not in client.smembers(f"{ns}processors")
                client.close()
        finally:
            await worker.finish()

    asyncio.run(asyncio.wait_for(main(), 90))


# -- Redis going away -----------------------------------------------------------------------


@pytest.mark.slow
def test_client_and_registry_reconnect_after_a_redis_restart(private_redis: PrivateRedis) -> None:
    ns = f"fptest:{uuid.uuid4().hex[:10]}:"  # the private server is discarded afterwards
    url = private_redis.url

    async def call_until_ok(registry: ProcessorRegistry, seq: int) -> Any:
        deadline = time.monotonic() + 15
        while True:
            try:
                return await registry.call(make_frame(seq), "face_detection", timeout=5)
            except (NoProcessorError, RegistryConnectionError):
                assert time.monotonic() < deadline, "no result after the restart"
                await asyncio.sleep(0.1)

    async def main() -> None:
        detector = Detector("face-1", ["face_detection"], ns, url=url)
        async with (
            serving(detector),
            ProcessorRegistry(url, ns, heartbeat_timeout=3, backoff=FAST) as registry,
        ):
            assert (await registry.call(make_frame(1), "face_detection")).ok
            # a frame in process_frame while Redis restarts (losing all its data)
            slow = asyncio.create_task(
                registry.call(make_frame(2, sleep=1.5), "face_detection", timeout=15)
            )
            await wait_until_async("the slow frame never started", lambda: detector.active == 1, 5)
            await asyncio.to_thread(private_redis.restart)
            result = await slow  # its result is published once Redis is back
            assert result.ok and result.data is not None and result.data["seq"] == 2
            # the client registered again by itself; the registry routes to it again
            for seq in range(3, 8):
                assert (await call_until_ok(registry, seq)).ok
            client = sync_redis(url)
            assert client.smembers(f"{ns}processors") == {b"face-1"}
            assert client.hget(f"{ns}proc:face-1", "state") == b"ready"
            client.close()
        assert detector.processed == 7

    asyncio.run(asyncio.wait_for(main(), 90))


async def calls_through(url: str, ns: str, n: int = 6) -> list[ProcessorResult]:
    """``n`` concurrent calls to an in-process Detector (capacity 2) over ``url``, then one
    more after Redis forgot its scripts (SCRIPT FLUSH: they are sent again)."""
    detector = Detector("face-1", ["face_detection"], ns, url=url)
    async with serving(detector), ProcessorRegistry(url, ns) as registry:
        results = list(
            await asyncio.gather(
                *(registry.call(make_frame(i), "face_detection") for i in range(n))
            )
        )
        client = redis_sync.Redis.from_url(url)
        client.script_flush()
        client.close()
        results.append(await registry.call(make_frame(n), "face_detection"))
        assert detector.peak <= 2
        assert registry._routes is not None and registry._replies is not None
        wires = {registry._routes.lean, registry._replies.lean}
        writes = detector._publisher.wire if detector._publisher is not None else None
        assert detector._reads is not None and writes is not None
        wires |= {detector._reads.lean, writes.lean}
        assert len(wires) == 1, "all four hot-path connections of one kind"
    return results


@pytest.mark.slow
def test_hot_path_connections_with_password_db_and_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    server = PrivateRedis(tmp_path, password="s3cret", unixsocket=sock)
    server.start()
    try:
        for url, db in (
            (f"redis://:s3cret@127.0.0.1:{server.port}/3", 3),
            (f"unix://:s3cret@{sock}?db=5", 5),
        ):
            ns = f"fptest:{uuid.uuid4().hex[:10]}:"
            results = asyncio.run(asyncio.wait_for(calls_through(url, ns), 60))
            assert [r.ok for r in results] == [True] * 7
            assert [r.data["seq"] for r in results if r.data] == list(range(7))
            client = redis_sync.Redis(port=server.port, password="s3cret", db=db)
            assert client.xlen(f"{ns}faces:detected") == 7  # in the URL's database
            client.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_hot_path_runs_on_redis_py_without_hiredis(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from framepipe.redis import wire as wire_module

    monkeypatch.setattr(wire_module, "_hiredis", None)
    server = PrivateRedis(tmp_path, password="s3cret")
    server.start()
    try:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/2"
        results = asyncio.run(asyncio.wait_for(calls_through(url, "fptest:py:"), 60))
        assert [r.ok for r in results] == [True] * 7
        ids = [r.frame_id for r in results]
        assert len(set(ids)) == 7
    finally:
        server.stop()


def test_hot_path_connection_times_out_on_a_silent_server() -> None:
    from framepipe.redis.connection import connect
    from framepipe.redis.wire import Wire

    async def main() -> None:
        accepted: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)  # reads nothing, answers nothing

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        redis = connect(f"redis://127.0.0.1:{port}/0", socket_timeout=0.2)
        wire = Wire(redis)
        assert wire.lean
        try:
            with pytest.raises(redis_sync.TimeoutError):
                await wire.execute("PING")
            with pytest.raises(redis_sync.TimeoutError):  # a blocking read: block + timeout
                await wire.execute("XREAD", "BLOCK", 100, "STREAMS", "s", "0", block=0.1)
            with pytest.raises(redis_sync.TimeoutError):  # a new connection each time
                await wire.execute_many([("PING",), ("PING",)])
            assert len(accepted) == 3
        finally:
            await wire.close()
            with pytest.raises(redis_sync.ConnectionError):
                await wire.execute("PING")  # closed for good
            await redis.aclose()
            server.close()
            for writer in accepted:
                writer.close()
            await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_one_namespace_rule_names_the_same_keys_with_or_without_the_colon() -> None:
    from framepipe.processors.fleet import Keys
    from framepipe.redis import namespaced

    assert (
        namespaced("framepipe", "jobs", "steps")
        == namespaced("framepipe:", "jobs", "steps")
        == "framepipe:jobs:steps"
    )
    assert namespaced("", "proc", "x") == "proc:x"
    for namespace in ("framepipe", "framepipe:"):
        keys = Keys(namespace)
        assert (
            keys.processors,
            keys.proc("a"),
            keys.frames("a"),
            keys.replies("r"),
            keys.results,
        ) == (
            "framepipe:processors",
            "framepipe:proc:a",
            "framepipe:proc:a:frames",
            "framepipe:replies:r",
            "framepipe:results",
        )
    client = Detector("p", ["face_detection"], "fptest:x")
    assert client.stream == "fptest:x:proc:p:frames"


def test_unreachable_redis_at_start_is_a_clear_error() -> None:
    port = free_port()  # nothing listens there
    url = f"redis://:s3cret@127.0.0.1:{port}/0"

    async def main() -> None:
        started = time.monotonic()
        registry = ProcessorRegistry(url, connect_retries=2, backoff=FAST)
        with pytest.raises(RegistryConnectionError) as caught:
            await registry.start()
        message = str(caught.value)
        assert f"127.0.0.1:{port}" in message and "after 3 attempts" in message
        assert "s3cret" not in message and "***" in message
        assert not registry.started

        detector = Detector(
            "lonely", ["face_detection"], "fptest:unreachable:", url=url, connect_retries=1
        )
        with pytest.raises(RegistryConnectionError, match=f"127.0.0.1:{port}"):
            await detector.start()
        assert not detector.running
        assert time.monotonic() - started < 5

        with pytest.raises(ProcessorRegistryError, match="not started"):
            await registry.route(make_frame(1), "face_detection")

    asyncio.run(asyncio.wait_for(main(), 30))


# -- a stream pipeline stage served by a registered processor ---------------------------------


class Collect(Sink):
    def __init__(self) -> None:
        self.name = "collect"
        self.frames: list[Frame] = []

    def write(self, frame: Frame) -> None:
        self.frames.append(frame)


def test_stream_pipeline_stage_served_by_registered_processor(ns: str) -> None:
    async def main() -> None:
        detector = Detector("face-1", ["face_detection"], ns, capacity=4, delay=0.01)
        collect = Collect()
        async with serving(detector), ProcessorRegistry(REDIS_URL, ns) as registry:
            pipeline = StreamPipeline(
                "door",
                PatternSource("door-cam", width=64, height=48, count=30, realtime=False),
                stages=[
                    Stage(RemoteProcessor(registry, "face_detection"), workers=4, ordered=True)
                ],
                sinks=[collect],
            )
            await pipeline.run()
            assert pipeline.state.value == "stopped", pipeline.last_error
        assert [f.seq for f in collect.frames] == list(range(1, 31))
        for frame in collect.frames:
            found = frame.meta["face_detection"]
            assert found["seq"] == frame.seq and found["camera"] == "door-cam"
            assert found["processor"] == "face-1"
            assert TRACEPARENT.match(frame.meta["trace_context"])
        assert detector.processed == 30 and detector.peak <= 4

    asyncio.run(asyncio.wait_for(main(), 60))


def test_remote_stage_needs_a_started_registry(ns: str) -> None:
    registry = ProcessorRegistry(REDIS_URL, ns)
    with pytest.raises(RuntimeError, match="not started"):
        RemoteProcessor(registry, "face_detection").setup()
