#!/usr/bin/env python3
"""An example model script on the command-line protocol of ``SubprocessModel`` (a small,
real CPU transform).

    python model.py --input clip.mp4 --prompt "turn into anime" --style cartoon --seed 42 \\
        --output-dir /tmp/out [--batch-size 8]

It decodes ``--input`` with PyAV, stylises every frame with OpenCV and writes
``<output-dir>/frames/frame_0000.png, ...``. On stdout it prints ``progress: N`` lines (0-100)
and, last, ``frames_path: <output-dir>/frames``. An input that cannot be decoded as a video
exits with code 2 and a message naming the file on stderr.

Styles (``--style``): ``cartoon`` (bilateral filter + adaptive-threshold edges; the default,
also used for the styles ``default``, ``studio`` and ``anime``), ``sketch`` (pencil-like edges) and
``invert``. ``--batch-size N`` (default 1) decodes N frames, then transforms and writes them
together: what a batched model holds in memory at once (the pipeline passes
``MODEL_BATCH_SIZE`` as it); the pictures do not depend on it. ``--seed`` jitters the
cartoon's edge block size and colour strength, so different seeds give slightly different (but
reproducible) pictures. ``--prompt`` is only recorded: this
is not a generative model.

The transform is importable (``stylise(image, style, seed)``, ``run(...)``), the example HTTP
server (``server.py``) reuses it. Frames are encoded in memory and written by Python: OpenCV
given a path that is not valid UTF-8 (an output folder named in Latin-1) kills the process.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections.abc import Callable
from pathlib import Path

import av
import cv2
import numpy as np

__all__ = ["STYLES", "ModelInputError", "resolve_style", "run", "stylise"]

STYLES = ("cartoon", "sketch", "invert")
ALIASES = {"default": "cartoon", "studio": "cartoon", "anime": "cartoon"}


EX_DATAERR = 65
"""The exit code (``sysexits.h``) by which this script refuses its input for good."""


class ModelInputError(Exception):
    """The input is not a decodable video (the message names the file)."""


def resolve_style(name: str) -> str:
    """The style ``name`` stands for (case and spaces ignored, aliases resolved); a
    :class:`ValueError` naming it and the styles there are when there is none."""
    style = ALIASES.get(name.strip().lower(), name.strip().lower())
    if style not in STYLES:
        raise ValueError(
            f"unknown style {name!r}; one of {', '.join(STYLES)} (or {', '.join(ALIASES)})"
        )
    return style


def stylise(image: np.ndarray, style: str = "cartoon", seed: int = 0) -> np.ndarray:
    """One BGR frame through the style's transform (same shape and dtype out)."""
    style = resolve_style(style)
    if style == "invert":
        return cv2.bitwise_not(image)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if style == "sketch":
        blurred = cv2.GaussianBlur(cv2.bitwise_not(gray), (21, 21), 0)
        sketch = cv2.divide(gray, cv2.bitwise_not(blurred), scale=256.0)
        return cv2.cvtColor(sketch, cv2.COLOR_GRAY2BGR)
    rng = random.Random(seed)
    block = 7 + 2 * rng.randint(0, 2)  # odd: 7, 9 or 11
    sigma = 60 + rng.randint(0, 30)
    edges = cv2.adaptiveThreshold(
        cv2.medianBlur(gray, 5), 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, block, 2
    )
    colour = cv2.bilateralFilter(image, 9, sigma, sigma)
    colour = (colour // 32) * 32 + 16  # posterise: flat cartoon colours
    return cv2.bitwise_and(colour, colour, mask=edges)


def run(
    input_path: Path | str,
    output_dir: Path | str,
    *,
    style: str = "cartoon",
    seed: int = 0,
    batch_size: int = 1,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Stylise every frame of ``input_path`` into ``output_dir/frames``, ``batch_size`` frames
    at a time; returns that folder.

    Raises :class:`ModelInputError` when the input is not a decodable video and
    :class:`ValueError` for an unknown style or a batch size below 1."""
    input_path = Path(input_path)
    style = resolve_style(style)
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} is below 1")
    frames_dir = Path(output_dir) / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    report = progress or (lambda pct: None)
    count = 0
    try:
        with av.open(str(input_path)) as container:
            if not container.streams.video:
                raise ModelInputError(f"{input_path}: holds no video stream")
            stream = container.streams.video[0]
            total = stream.frames or 0
            if not total and stream.duration and stream.time_base and stream.average_rate:
                total = int(stream.duration * stream.time_base * stream.average_rate)
            report(0)
            last = 0
            batch: list[np.ndarray] = []
            frames = container.decode(stream)
            while True:
                batch = [f.to_ndarray(format="bgr24") for f in itertools.islice(frames, batch_size)]
                if not batch:
                    break
                for image in [stylise(image, style, seed) for image in batch]:
                    path = frames_dir / f"frame_{count:04d}.png"
                    ok, png = cv2.imencode(".png", image)  # never a path to OpenCV: see below
                    if not ok:
                        raise OSError(f"cannot encode frame {count} as PNG")
                    path.write_bytes(png.tobytes())
                    count += 1
                if total:
                    pct = min(99, 100 * count // total)
                    if pct >= last + 5:
                        report(pct)
                        last = pct
    except (av.error.OSError, av.error.MemoryError):
        raise  # a read error or no memory: worth another try, not the input's fault
    except av.FFmpegError as exc:
        raise ModelInputError(f"{input_path}: not a readable video ({exc})") from exc
    if count == 0:
        raise ModelInputError(f"{input_path}: the video has no decodable frames")
    report(100)
    return frames_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="the input video")
    parser.add_argument("--prompt", required=True, help="recorded only")
    parser.add_argument("--style", default="cartoon", help=f"one of {', '.join(STYLES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=1, help="frames transformed at once")
    args = parser.parse_args(argv)
    try:
        frames = run(
            args.input,
            args.output_dir,
            style=args.style,
            seed=args.seed,
            batch_size=args.batch_size,
            progress=lambda pct: print(f"progress: {pct}", flush=True),
        )
    except (ModelInputError, ValueError) as exc:  # this input, never: EX_DATAERR
        print(f"model.py: error: {exc}", file=sys.stderr)
        return EX_DATAERR
    except OSError as exc:  # a disk full, a folder away: worth another try
        print(f"model.py: error: {exc}", file=sys.stderr)
        return 1
    print(f"frames_path: {frames.resolve()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
