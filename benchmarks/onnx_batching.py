"""OnnxModel in a live stage: frames/s of a text detection model one by one and in batches.

``.venv/bin/python benchmarks/onnx_batching.py`` measures, prints a Markdown report and writes
it into ``docs/onnx.md`` between ``<!-- results:start -->`` and ``<!-- results:end -->``
(``--quick`` for a short run, ``--no-write`` to leave the docs alone, ``--frames``,
``--repeat``).

The model is RapidOCR's text detection model (``ch_PP-OCRv4_det_infer.onnx``, shipped inside
the rapidocr-onnxruntime wheel: dynamic batch, height and width), on CPU with ONNX Runtime's
default session options. The frames come from a ``PatternSource`` (``realtime=False``, so as
fast as the stage takes them) with a printed label, 320x128, the same in every run.

Rows, each the median of ``--repeat`` runs taken in turns:

1. Floors without framepipe: ``session.run`` in a serial loop over the same preprocessed
   frames, one at a time and stacked by 4 and 8 (what the model costs on this machine), and
   the pipeline with a no-op stage instead of the model (what the pipeline costs).
2. ``Stage(ModelProcessor(OnnxModel(..., batch_size=B)), workers=W, ordered=True)`` for B = 1
   (one by one, with 1 and 8 workers), 4 and 8 (8 workers, ``max_wait_ms=20``); the mean
   batch is ``model.stats.mean_batch``.

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import run_all

from framepipe.frames import Frame
from framepipe.processors.adapters import ModelProcessor, OnnxModel
from framepipe.processors.adapters.onnx import ImageToTensor
from framepipe.sources import PatternSource
from framepipe.stream import Stage, StreamPipeline

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "onnx.md"
WIDTH, HEIGHT = 320, 128
NORMALISE = ImageToTensor(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
MAX_WAIT_MS = 20.0


def detection_model() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("rapidocr-onnxruntime is not installed: pip install 'framepipe[ocr]'")
    for location in spec.submodule_search_locations:
        found = sorted((Path(location) / "models").glob("*det*.onnx"))
        if found:
            return found[0]
    sys.exit("rapidocr_onnxruntime ships no text detection model (models/*det*.onnx)")


def draw_label(image: np.ndarray[Any, Any], seq: int) -> None:
    image[32:96, 16:304] = 255
    cv2.putText(image, f"TAG {seq:04d}", (32, 78), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 0, 2)


def source(frames: int) -> PatternSource:
    return PatternSource(
        "bench",
        width=WIDTH,
        height=HEIGHT,
        count=frames,
        realtime=False,
        moving_box=False,
        draw=draw_label,
    )


@dataclass
class Row:
    name: str
    fps: list[float] = field(default_factory=list)
    mean_batch: list[float] = field(default_factory=list)

    def cells(self) -> list[str]:
        fps = statistics.median(self.fps)
        spread = f" ({min(self.fps):.0f}-{max(self.fps):.0f})" if len(self.fps) > 1 else ""
        batch = f"{statistics.median(self.mean_batch):.1f}" if self.mean_batch else "-"
        return [self.name, f"{fps:.0f}{spread}", batch]


def floor_session(model: Path, frames: int, batch: int) -> float:
    """Frames/s of ``session.run`` alone, ``batch`` frames per call."""
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    images = [np.zeros((HEIGHT, WIDTH, 3), np.uint8) for _ in range(batch)]
    for i, image in enumerate(images):
        draw_label(image, i)
    tensor = np.stack([NORMALISE(image) for image in images])
    session.run(None, {"x": tensor})  # warm-up
    calls = max(1, frames // batch)
    started = time.perf_counter()
    for _ in range(calls):
        session.run(None, {"x": tensor})
    return calls * batch / (time.perf_counter() - started)


def noop(frame: Frame) -> Frame:
    return frame


def pipeline_fps(stage: Stage, frames: int) -> float:
    pipeline = StreamPipeline("bench", source(frames), stages=[stage])
    started = time.perf_counter()
    asyncio.run(pipeline.run())
    return frames / (time.perf_counter() - started)


def model_stage(model: Path, batch: int, workers: int, frames: int) -> tuple[float, float]:
    onnx = OnnxModel(model, preprocess=NORMALISE, batch_size=batch, max_wait_ms=MAX_WAIT_MS)
    onnx.setup()  # loading is not part of the throughput
    onnx.predict([np.zeros((HEIGHT, WIDTH, 3), np.uint8)])  # warm-up
    runs, done = onnx.stats.runs, onnx.stats.frames
    stage = Stage(ModelProcessor(onnx, name="text"), workers=workers, ordered=True)
    fps = pipeline_fps(stage, frames)
    return fps, (onnx.stats.frames - done) / max(1, onnx.stats.runs - runs)


def measure(frames: int, repeat: int) -> list[Row]:
    model = detection_model()
    floors: list[tuple[str, Callable[[], tuple[float, float | None]]]] = [
        (f"floor: session.run, {b} per call", lambda b=b: (floor_session(model, frames, b), b))
        for b in (1, 4, 8)
    ]
    floors.append(
        ("floor: pipeline, no-op stage", lambda: (pipeline_fps(Stage(noop), frames), None))
    )
    variants: list[tuple[str, Callable[[], tuple[float, float | None]]]] = [
        (
            f"stage, {'one by one' if b == 1 else f'batch_size={b}'}, workers={w}",
            lambda b=b, w=w: model_stage(model, b, w, frames),
        )
        for b, w in ((1, 1), (1, 8), (4, 8), (8, 8))
    ]
    rows = {name: Row(name) for name, _ in floors + variants}
    for attempt in range(repeat):
        for name, run in floors + variants:
            fps, batch = run()
            rows[name].fps.append(fps)
            if batch is not None:
                rows[name].mean_batch.append(batch)
            run_all.log(f"[{attempt + 1}/{repeat}] {name}: {fps:.1f} frames/s")
    return list(rows.values())


def report(rows: list[Row], frames: int, repeat: int) -> str:
    skip = {"SQLAlchemy", "SQLite", "PostgreSQL server", "Celery"}
    info = [(k, v) for k, v in run_all.machine_info(None, None) if k not in skip]
    info.append(("ONNX Runtime", f"{ort.__version__} ({', '.join(ort.get_available_providers())})"))
    runs = f"median of {repeat} runs (min-max)" if repeat > 1 else "one run"
    out = [
        f"Generated by `benchmarks/onnx_batching.py` on {info[0][1]}: {frames} frames of "
        f"{WIDTH}x{HEIGHT} per run, {runs}, CPU execution provider, default session options.",
        "",
    ]
    out += run_all._table(["", "frames/s", "mean batch"], (row.cells() for row in rows))
    out += ["", "Machine:", ""]
    out += run_all._table(["", ""], ([k, v] for k, v in info))
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=240)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="40 frames, one run")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    frames, repeat = (40, 1) if args.quick else (args.frames, args.repeat)
    text = report(measure(frames, repeat), frames, repeat)
    print(text)
    if not args.no_write:
        run_all.write_doc(text, DOC)


if __name__ == "__main__":
    main()
