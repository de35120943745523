"""Order-accuracy stations per core: N stations of the example on one machine, raised until the
pipeline falls behind, measured in one run.

``.venv/bin/python benchmarks/station_scale.py`` measures, prints a Markdown report and writes it
into ``docs/station-scale.md`` between ``<!-- results:start -->`` and ``<!-- results:end -->``
(``--quick`` for a short run, ``--no-write`` to leave the docs alone).

Each station is the example's station (``examples/order_accuracy``: ``OrderAccuracy``, one
capture process per station, the QR tag stage, the order segmenter, a ``FrameStore`` keeping
every frame of every order in a local object store with ``durable=False``) on a generated
640x360 H.264 station video at 10 fps with QR order tickets, looped and played in real time (a
camera never ends). For each configuration, in a process of its own (so its memory and its
children are its own):

* CPU seconds per second of the runner process (all its threads) and of its capture processes
  (``/proc/<pid>/stat`` of every descendant, plus the children it has reaped: a gst-launch-1.0
  capture is one process per pass of the looped video), over a measuring window after a
  warm-up;
* stations per core: N / (runner + captures, in cores);
* memory per station: the runner's RSS growth from before the first station, per station, and
  the capture processes' RSS;
* frames: what the cameras made in the window (N x 10 fps x window) against the frames the
  stations took in, and frames dropped in front of a stage;
* orders: started in the window and completed (by the window's end plus the order timeout),
  against the video's schedule; latency (the order's last frame, read after the 1 s order
  timeout's idle frames, to ``order.completed``)
  p50 and p95; orders with fewer frames than their ticket was in view (a tag missed inside an
  order splits it).

Configurations: the lazy path of today (MJPEG frames keep the captured JPEG; the QR reader reads
a grey-only decode; frames are stored as captured) at N = 4, 8, 16, 24, 32, 48 ... until frames
fall behind or latency grows; ``capture=gst`` against ``capture=ffmpeg`` at one N; and, side by
side at one N, the way before lazy frames (a reader that asks for ``frame.image``: every frame
decoded in colour, converted to grey for zxing-cpp and re-encoded as JPEG q85 when stored).

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import run_all

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "order_accuracy"
DOC = ROOT / "docs" / "station-scale.md"
sys.path.insert(0, str(EXAMPLE))

from make_video import default_schedule, make_station_video  # noqa: E402
from orders import OrderAccuracy, QrTagReader  # noqa: E402
from station_floor import start_floor  # noqa: E402

from framepipe import LocalObjectStore, Settings  # noqa: E402

FPS = 10
TIMEOUT = 1.0  # order timeout, s
ORDERS = [f"ORDER_{101 + i}" for i in range(3)]
TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
SIZES = (8, 16, 32, 48, 64, 80, 96)
QUICK_SIZES = (8, 32, 64)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- /proc ----------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from state on (the name may hold spaces)


def _descendants(root: int) -> list[tuple[int, str]]:
    """Live descendants of ``root`` as (pid, command name)."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        names[pid] = text[text.index("(") + 1 : text.rindex(")")]
        ppid = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(pid)
    out: list[tuple[int, str]] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append((pid, names[pid]))
        todo.extend(children.get(pid, []))
    return out


def _pss(pid: int) -> int:
    """Proportional set size in bytes (shared pages split among the processes sharing them)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class CpuSample:
    at: float
    runner: float  # CPU seconds of this process (every thread)
    children: float  # CPU seconds of live descendants + reaped children
    capture_rss: int  # bytes, PSS of live descendants
    runner_rss: int  # bytes
    captures: int  # live descendants
    machine_busy: float  # CPU seconds of the whole machine (all cores, not idle/iowait)


def _machine_busy() -> float:
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / TICK


def sample() -> CpuSample:
    me = _stat(os.getpid())
    assert me is not None
    # from field 3 (state): ... [11] utime [12] stime [13] cutime [14] cstime ... [21] rss
    runner = (int(me[11]) + int(me[12])) / TICK
    reaped = (int(me[13]) + int(me[14])) / TICK
    live = 0.0
    rss = 0
    kids = _descendants(os.getpid())
    for pid, _name in kids:
        st = _stat(pid)
        if st is None:
            continue
        live += (int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])) / TICK
        rss += _pss(pid)
    return CpuSample(
        time.monotonic(),
        runner,
        reaped + live,
        rss,
        int(me[21]) * PAGE,
        len(kids),
        _machine_busy(),
    )


# -- one configuration ----------------------------------------------------------------------------


class ColourQrReader(QrTagReader):
    """The QR reader as it was before lazy frames: given ``frame.image`` (a colour decode), which
    also makes the store re-encode the frame."""

    colour = True


@dataclass
class RunResult:
    n: int
    capture: str
    mode: str
    camera: str = "h264"  # what the station's camera sends: H.264, or MJPEG (JPEG pictures)
    reduce: int = 1  # the QR tags are read at 1/reduce of the picture's size
    window_s: float = 0.0
    runner_cpu_s: float = 0.0  # per second of wall time
    capture_cpu_s: float = 0.0
    machine_busy: float = 0.0  # cores busy on the whole machine meanwhile (any process)
    runner_rss_growth: int = 0
    capture_rss: int = 0
    capture_processes: int = 0
    camera_frames: int = 0
    frames_in: int = 0
    dropped: int = 0
    orders_started: int = 0
    orders_completed: int = 0
    orders_expected: float = 0.0
    orders_split: int = 0
    wrong_orders: int = 0
    latency: list[float] = field(default_factory=list)
    frames_per_order: list[int] = field(default_factory=list)
    error: str | None = None

    @property
    def cores(self) -> float:
        return self.runner_cpu_s + self.capture_cpu_s

    @property
    def per_core(self) -> float:
        return self.n / self.cores if self.cores else 0.0

    @property
    def took(self) -> float:
        return self.frames_in / self.camera_frames if self.camera_frames else 0.0


def _frames_in(service: OrderAccuracy) -> tuple[int, int]:
    taken = dropped = 0
    for pipeline in service.app.pipelines.values():
        health = pipeline.health()
        stages = health["stages"]
        taken += int(stages[0]["frames_in"]) if stages else int(health["frames_captured"])
        dropped += int(health["capture_dropped"]) + sum(int(s["dropped"]) for s in stages)
    return taken, dropped


@dataclass(frozen=True)
class Config:
    """One configuration: how the stations capture, what their cameras send, how the tags are
    read (``reduce``) and whether frames stay lazy."""

    capture: str = "ffmpeg"
    camera: str = "h264"
    reduce: int = 1
    mode: str = "lazy"

    @property
    def label(self) -> str:
        if self.mode == "floor":
            return (
                f"floor: {self.camera.upper()} camera, plain threads with no framework, "
                f"tags at 1/{self.reduce} size"
            )
        reading = (
            "colour decode + re-encode (the way before)"
            if self.mode == "eager"
            else ("tags at full size" if self.reduce == 1 else f"tags at 1/{self.reduce} size")
        )
        return f"{self.camera.upper()} camera, capture={self.capture}, {reading}"


async def run_one(
    n: int, config: Config, videos: dict[str, Path], home: Path, warmup: float, window: float
) -> RunResult:
    video = videos[config.camera]
    schedule = json.loads(videos["h264"].with_suffix(".mp4.json").read_text())
    pass_seconds = schedule["frames"] / FPS
    tagged: dict[str, int] = schedule["tagged_frames"]
    result = RunResult(n, config.capture, config.mode, config.camera, config.reduce)
    reader = ColourQrReader() if config.mode == "eager" else QrTagReader(reduce=config.reduce)
    before = sample()
    service = OrderAccuracy(
        Settings(home=home),
        frames=LocalObjectStore(home / "objects", durable=False),
        order_timeout=TIMEOUT,
        best_frames=3,
        store_events=False,
        capture=config.capture,  # type: ignore[arg-type]
        loop=True,
        realtime=True,
        reader=reader,
    )
    started: dict[str, float] = {}
    completed: list[tuple[float, dict[str, Any]]] = []
    service.app.on(
        "order.started",
        lambda _e, d: started.setdefault(f"{d['station_id']}/{d['segment_id']}", time.monotonic()),
    )
    service.on_order(lambda order: completed.append((time.monotonic(), order)))
    await service.start()
    await service.apply({f"station_{i + 1}": str(video) for i in range(n)})
    await asyncio.sleep(warmup)
    first = sample()
    in0, drop0 = _frames_in(service)
    await asyncio.sleep(window)
    last = sample()
    in1, drop1 = _frames_in(service)
    t_end = last.at
    await asyncio.sleep(TIMEOUT + 2.0)  # orders started in the window complete
    await service.stop()
    wall = last.at - first.at
    result.window_s = wall
    result.runner_cpu_s = (last.runner - first.runner) / wall
    result.capture_cpu_s = (last.children - first.children) / wall
    result.machine_busy = (last.machine_busy - first.machine_busy) / wall
    result.runner_rss_growth = last.runner_rss - before.runner_rss
    result.capture_rss = last.capture_rss
    result.capture_processes = last.captures
    result.camera_frames = round(n * FPS * wall)
    result.frames_in = in1 - in0
    result.dropped = drop1 - drop0
    in_window = {k for k, t in started.items() if first.at <= t <= t_end}
    result.orders_started = len(in_window)
    result.orders_expected = n * wall * len(ORDERS) / pass_seconds
    for _t, order in completed:
        if f"{order['station_id']}/{order['segment_id']}" not in in_window:
            continue
        result.orders_completed += 1
        result.orders_split += int(order["frames"]) < tagged.get(order["order_id"], 0)
        result.wrong_orders += order["order_id"] not in ORDERS
        result.latency.append(float(order["latency_s"]))
        result.frames_per_order.append(int(order["frames"]))
    return result


async def run_floor(
    n: int, config: Config, videos: dict[str, Path], home: Path, warmup: float, window: float
) -> RunResult:
    """The machine's floor for the same stations (``station_floor``), measured as ``run_one``
    measures framepipe's."""
    video = videos[config.camera]
    result = RunResult(n, config.capture, config.mode, config.camera, config.reduce)
    before = sample()
    counts, stop, threads = start_floor(
        n, video, config.camera == "mjpeg", config.reduce, home / "objects"
    )
    await asyncio.sleep(warmup)
    first, frames0 = sample(), sum(counts.frames)
    await asyncio.sleep(window)
    last, frames1 = sample(), sum(counts.frames)
    await asyncio.sleep(TIMEOUT + 1.0)  # orders started in the window complete
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    in_window = [done for at, done in list(counts.orders) if first.at <= float(at) <= last.at]
    wall = last.at - first.at
    schedule = json.loads(videos["h264"].with_suffix(".mp4.json").read_text())
    result.window_s = wall
    result.runner_cpu_s = (last.runner - first.runner) / wall
    result.machine_busy = (last.machine_busy - first.machine_busy) / wall
    result.runner_rss_growth = last.runner_rss - before.runner_rss
    result.camera_frames = round(n * FPS * wall)
    result.frames_in = frames1 - frames0
    result.orders_started = len(in_window)
    result.orders_completed = sum(1 for done in in_window if done)
    result.orders_expected = n * wall * len(ORDERS) / (schedule["frames"] / FPS)
    return result


def _config(args: argparse.Namespace) -> Config:
    return Config(args.capture, args.camera, args.reduce, args.mode)


def child_main(args: argparse.Namespace) -> None:
    logging.getLogger("framepipe").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    config = _config(args)
    videos = {"h264": Path(args.video), "mjpeg": Path(args.video).with_suffix(".avi")}
    with tempfile.TemporaryDirectory(prefix="fp-scale-run-") as tmp:
        try:
            runner = run_floor if config.mode == "floor" else run_one
            result = asyncio.run(
                runner(args.n, config, videos, Path(tmp), args.warmup, args.window)
            )
        except Exception as exc:
            result = RunResult(
                args.n,
                config.capture,
                config.mode,
                config.camera,
                config.reduce,
                error=f"{type(exc).__name__}: {exc}",
            )
    print(json.dumps(asdict(result)), flush=True)


def run_config(n: int, config: Config, video: Path, warmup: float, window: float) -> RunResult:
    argv = [sys.executable, __file__, "--child", "--n", str(n), "--capture", config.capture]
    argv += ["--camera", config.camera, "--reduce", str(config.reduce)]
    argv += ["--mode", config.mode, "--video", str(video), "--warmup", str(warmup)]
    argv += ["--window", str(window)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return RunResult(
            n,
            config.capture,
            config.mode,
            config.camera,
            config.reduce,
            error=f"exit {done.returncode}: {done.stderr[-500:]}",
        )
    result = RunResult(**json.loads(lines[-1]))
    log(
        f"  N={n:<3} {config.label}: runner {result.runner_cpu_s:.2f} + captures "
        f"{result.capture_cpu_s:.2f} cores -> {result.per_core:.1f} stations/core; took "
        f"{result.took:.1%} of frames, dropped {result.dropped}; orders "
        f"{result.orders_completed}/{result.orders_started} "
        f"(expected ~{result.orders_expected:.0f}); latency p50 "
        f"{_pct(result.latency, 0.5) * 1000:.0f} ms p95 {_pct(result.latency, 0.95) * 1000:.0f} ms"
        f"; machine busy {result.machine_busy:.2f} cores"
        + (f"; {result.error}" if result.error else "")
    )
    return result


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fell_behind(result: RunResult, base: RunResult | None) -> bool:
    """Frames lost or delayed, orders missing, or latency grown against the smallest N."""
    if result.error or result.took < 0.97 or result.dropped:
        return True
    if result.orders_started and result.orders_completed < result.orders_started:
        return True
    if base is not None and base.latency and result.latency:
        return _pct(result.latency, 0.95) > 2 * _pct(base.latency, 0.95) + 0.1
    return False


# -- report ---------------------------------------------------------------------------------------


def _mb(value: float) -> str:
    return f"{value / 2**20:.1f} MB"


def row(r: RunResult, label: str) -> list[str]:
    if r.error:
        return [label, str(r.n), f"failed: {r.error}"] + ["-"] * 9
    return [
        label,
        str(r.n),
        f"{r.runner_cpu_s:.2f}",
        f"{r.capture_cpu_s:.2f}",
        f"**{r.per_core:.1f}**",
        _mb(r.runner_rss_growth / r.n),
        _mb(r.capture_rss / max(1, r.capture_processes)),
        f"{r.frames_in:,} of {r.camera_frames:,} ({r.took:.1%}), {r.dropped} dropped",
        f"{r.orders_completed} of {r.orders_started} (~{r.orders_expected:.0f} scheduled)"
        + (f", {r.orders_split} short" if r.orders_split else "")
        + (f", {r.wrong_orders} wrong" if r.wrong_orders else ""),
        f"{_pct(r.latency, 0.5) * 1000:.0f} / {_pct(r.latency, 0.95) * 1000:.0f} ms",
        f"{statistics.median(r.frames_per_order):.0f}" if r.frames_per_order else "-",
        f"{r.machine_busy:.2f}",
    ]


HEADER = [
    "configuration",
    "N",
    "runner, cores",
    "captures, cores",
    "stations per core",
    "runner RSS growth per station",
    "PSS per capture process",
    "frames taken in (of what the cameras made)",
    "orders completed (of started in the window)",
    "order latency p50 / p95",
    "frames per order, median",
    "whole machine busy, cores",
]


def report(
    sweep: list[RunResult],
    compared: list[RunResult],
    args: argparse.Namespace,
    info: list[tuple[str, str]],
) -> str:
    best_config = _config(args)
    out = [
        f"Generated by `benchmarks/station_scale.py{' --quick' if args.quick else ''}` on "
        f"{info[0][1]}: each row one configuration in a process of its own, "
        f"{args.warmup:g} s warm-up, {args.window:g} s measured. Order latency: the order's "
        f"last frame (the last before its {TIMEOUT:g} s order timeout ran out) to "
        "`order.completed`. With `capture=av` the stations decode in the runner process, so "
        "their capture cost is in the runner's column.",
        "",
        f"### Stations raised ({best_config.label})",
        "",
    ]
    out += run_all._table(HEADER, [row(r, _label(r)) for r in sweep])
    out += [
        "",
        f"### Side by side at N={args.compare_n}: cameras, captures and tag reading",
        "",
    ]
    out += run_all._table(HEADER, [row(r, _label(r)) for r in compared])
    out += against_floor(compared)
    kept = [r for r in sweep if not fell_behind(r, sweep[0] if sweep else None)]
    if kept:
        best = max(kept, key=lambda r: r.per_core)
        out += [
            "",
            f"Best while keeping up: **{best.per_core:.1f} stations per core** at N={best.n} "
            f"(target: >= 40).",
        ]
    out += ["", "Machine:", ""]
    out += [
        f"- {k}: {v}"
        for k, v in info
        if k not in ("PostgreSQL server", "Celery", "SQLAlchemy", "SQLite")
    ]
    return "\n".join(out) + "\n"


def against_floor(compared: list[RunResult]) -> list[str]:
    """Lines comparing framepipe's stations (``capture=av``) with the floor's, per camera."""
    lines: list[str] = []
    for floor in (r for r in compared if r.mode == "floor" and not r.error):
        ours = next(
            (
                r
                for r in compared
                if r.mode == "lazy"
                and r.capture == "av"
                and (r.camera, r.reduce) == (floor.camera, floor.reduce)
                and not r.error
            ),
            None,
        )
        if ours is None or not floor.per_core:
            continue
        lines.append(
            f"- {floor.camera.upper()} cameras, tags at 1/{floor.reduce} size: framepipe "
            f"{ours.per_core:.1f} stations per core, the floor (the same work in plain threads, "
            f"no framework) {floor.per_core:.1f}: **{ours.per_core / floor.per_core:.0%} of "
            "the floor**."
        )
    return ["", "Against the machine's floor:", "", *lines] if lines else []


def _label(r: RunResult) -> str:
    return Config(r.capture, r.camera, r.reduce, r.mode).label


def make_mjpeg_copy(video: Path, target: Path) -> None:
    """The station video as a camera that sends MJPEG would: every frame a JPEG (``-q:v 3``)."""
    argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-i", str(video)]
    argv += ["-an", "-c:v", "mjpeg", "-q:v", "3", str(target)]
    subprocess.run(argv, check=True)


def tool_versions() -> list[tuple[str, str]]:
    out = []
    for name, argv in (
        ("ffmpeg", ["ffmpeg", "-version"]),
        ("GStreamer", ["gst-launch-1.0", "--version"]),
    ):
        try:
            text = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
            out.append((name, text.splitlines()[0] if name == "ffmpeg" else text.splitlines()[1]))
        except (OSError, IndexError):
            out.append((name, "not installed"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 8, 32, 64; short windows")
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    parser.add_argument("--capture", default="av", choices=("ffmpeg", "gst", "av", "plain"))
    parser.add_argument("--camera", default="mjpeg", choices=("h264", "mjpeg"))
    parser.add_argument("--reduce", type=int, default=2, choices=(1, 2, 4, 8))
    parser.add_argument("--compare-n", type=int, default=16, help="N of the side-by-side rows")
    parser.add_argument("--sizes", help="comma-separated N to raise through")
    parser.add_argument("--warmup", type=float, default=None)
    parser.add_argument("--window", type=float, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="lazy", help=argparse.SUPPRESS)
    parser.add_argument("--video", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 5.0 if args.quick else 8.0
    if args.window is None:
        args.window = 12.0 if args.quick else 30.0
    if args.child:
        child_main(args)
        return
    sizes = (
        [int(x) for x in args.sizes.split(",")]
        if args.sizes
        else (QUICK_SIZES if args.quick else SIZES)
    )
    info = run_all.machine_info(None, None) + tool_versions()
    best = _config(args)
    m = args.compare_n
    compare = [
        Config("gst", "h264", 1),
        Config("ffmpeg", "h264", 1),
        Config("ffmpeg", "h264", 1, "eager"),
        Config("av", "h264", 1),
        Config("av", "h264", 2),
        Config("ffmpeg", "mjpeg", 1),
        Config("av", "mjpeg", 1),
        Config("av", "mjpeg", 2),
        Config("plain", "h264", 2, "floor"),
        Config("plain", "mjpeg", 2, "floor"),
    ]
    with tempfile.TemporaryDirectory(prefix="fp-scale-") as tmp:
        video = Path(tmp) / "station.mp4"
        make_station_video(
            video,
            default_schedule(ORDERS, order_seconds=2.0, gap_seconds=1.5, lead_seconds=1.0),
            fps=FPS,
            size=(640, 360),
        )
        make_mjpeg_copy(video, video.with_suffix(".avi"))
        sweep: list[RunResult] = []
        for n in sizes:
            sweep.append(run_config(n, best, video, args.warmup, args.window))
            if fell_behind(sweep[-1], sweep[0]):
                log(f"  N={n}: fell behind; not raised further")
                break
        compared = []
        for config in compare:
            same = next((r for r in sweep if r.n == m and config == best), None)
            compared.append(same or run_config(m, config, video, args.warmup, args.window))
    text = report(sweep, compared, args, info)
    run_all.publish(text, DOC, write=not args.no_write)


if __name__ == "__main__":
    main()
