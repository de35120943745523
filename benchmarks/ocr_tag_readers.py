"""Reading printed order tickets: ``OcrTagReader`` of the order-accuracy example against the
other ways of reading a ticket, on the same generated station videos, in one run.

``.venv/bin/python benchmarks/ocr_tag_readers.py`` measures, prints a Markdown report and writes
it into ``docs/order-accuracy-benchmarks.md`` between ``<!-- ocr-results:start -->`` and
``<!-- ocr-results:end -->`` (``--no-write`` to leave the docs alone).

Per variant (how the tickets lie: straight, turned, out of focus, partly under a hand, all
three), one 640x360 H.264 clip at 10 fps from ``examples/order_accuracy/make_video.py``: three
orders of 1 s each with 0.5 s of idle counter around them, the order number printed on the
ticket (``ORDER #1101``), and the same clip with QR tickets. Every decoded frame goes through
each reader, one frame at a time in one thread:

1. ``OcrTagReader`` (the example's reader): RapidOCR on the bright ticket regions only.
2. ``OcrTagReader(find_tickets=False)``: RapidOCR on the whole frame (at most 640 px a side).
3. RapidOCR with its own defaults on the whole frame (the frame upscaled to 736 px on its short
   side, the angle classifier on), the same order-number regex: what one gets by calling it
   plainly.
4. Tesseract 5 through pytesseract (``--tesseract-python``: a Python with pytesseract, e.g. a
   separate venv; the ``tesseract`` binary from the system), on the ticket regions and on the
   whole frame. pytesseract starts one ``tesseract`` process per image: that is in its time.
5. zxing-cpp on the QR clips: the floor of tag reading (``QrTagReader``).
6. Finding the ticket regions alone, no OCR: the floor of the OCR reader (what an idle frame
   costs it).

Measured per reader and variant: the share of ticket frames read as exactly their order,
frames with a tag that is not their order (idle frames included), orders read at least once
(what the station needs to open the order), and frames/s over all frames (idle ones included,
as a station sees them). This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np
import run_all

from framepipe.media.frames import write_image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "order_accuracy"
DOC = ROOT / "docs" / "order-accuracy-benchmarks.md"
START, END = "<!-- ocr-results:start -->", "<!-- ocr-results:end -->"
sys.path.insert(0, str(EXAMPLE))

from make_video import Shot, make_station_video  # noqa: E402
from ocr import ORDER_NUMBER, OcrTagReader  # noqa: E402
from orders import QrTagReader, TagReading  # noqa: E402

FPS = 10
VARIANTS: list[tuple[str, dict[str, float]]] = [
    ("straight", {}),
    ("turned 15°", {"angle": 15.0}),
    ("turned 30°", {"angle": 30.0}),
    ("blur 1.5 px", {"blur": 1.5}),
    ("blur 2.5 px", {"blur": 2.5}),
    ("30% covered", {"occlusion": 0.3}),
    ("45% covered", {"occlusion": 0.45}),
    ("all three", {"angle": 12.0, "blur": 1.2, "occlusion": 0.25}),
]
ORDERS_PER_VARIANT = 3

Read = Callable[[np.ndarray], list[str]]


@dataclass
class Clip:
    """One variant's decoded frames and what each shows (an order id or None)."""

    variant: str
    frames: list[np.ndarray]
    truth: list[str | None]
    orders: list[str]


@dataclass
class Score:
    right: int = 0
    ticket_frames: int = 0
    wrong: int = 0
    frames: int = 0
    seconds: float = 0.0
    found: set[str] = field(default_factory=set)
    orders: int = 0
    ticket_seconds: list[float] = field(default_factory=list)

    def add(self, truth: str | None, tags: list[str], seconds: float) -> None:
        self.frames += 1
        self.seconds += seconds
        if truth is not None:
            self.ticket_frames += 1
            self.ticket_seconds.append(seconds)
            self.right += tags == [truth]
            self.found.update(t for t in tags if t == truth)
        self.wrong += any(t != truth for t in tags)


def make_clips(root: Path, ticket: str) -> list[Clip]:
    clips = []
    for k, (variant, look) in enumerate(VARIANTS, start=1):
        orders = [f"ORDER_{k}{i:02d}" for i in range(1, ORDERS_PER_VARIANT + 1)]
        shots = [Shot(0.5)]
        for order_id in orders:
            shots += [Shot(1.0, [order_id], **look), Shot(0.5)]  # type: ignore[arg-type]
        path = root / f"{ticket}-{k}.mp4"
        make_station_video(path, shots, fps=FPS, ticket=ticket)  # type: ignore[arg-type]
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]
        truth: list[str | None] = []
        for shot in shots:
            truth += [shot.tags[0] if shot.tags else None] * shot.frames
        clips.append(Clip(variant, frames, truth[: len(frames)], orders))
    return clips


def tags_of(readings: list[TagReading]) -> list[str]:
    return [r.text for r in readings if r.text is not None]


def run_reader(read: Read, clips: list[Clip]) -> dict[str, Score]:
    read(clips[0].frames[len(clips[0].frames) // 3])  # warm up: the engine loads its models
    scores: dict[str, Score] = {}
    for clip in clips:
        score = scores[clip.variant] = Score(orders=len(clip.orders))
        for image, truth in zip(clip.frames, clip.truth, strict=True):
            t0 = time.perf_counter()
            tags = read(image)
            score.add(truth, tags, time.perf_counter() - t0)
    return scores


def plain_rapidocr() -> Read:
    """RapidOCR as it comes (its defaults), the whole frame, the reader's regex and 0.6."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    pattern = re.compile(ORDER_NUMBER, re.IGNORECASE)

    def read(image: np.ndarray) -> list[str]:
        lines, _ = engine(image)
        tags = []
        for _box, text, score in lines or []:
            match = pattern.search(str(text))
            if match and float(score) >= 0.6:
                tags.append(f"ORDER_{match.group('number')}")
        return tags

    return read


# Runs in the Python given with --tesseract-python: pytesseract on each image file listed on
# stdin, one JSON line out per image (its text and the seconds the call took).
TESSERACT_CHILD = """
import json, sys, time
import pytesseract
config = sys.argv[1]
for line in sys.stdin:
    path = line.strip()
    t0 = time.perf_counter()
    text = pytesseract.image_to_string(path, lang="eng", config=config)
    print(json.dumps([text, time.perf_counter() - t0]), flush=True)
"""


def run_tesseract(
    python: str, clips: list[Clip], root: Path, *, regions: bool
) -> tuple[dict[str, Score], str]:
    """Tesseract on every frame (or every ticket region of it) of ``clips``."""
    finder = OcrTagReader()
    pattern = re.compile(ORDER_NUMBER, re.IGNORECASE)
    jobs: list[tuple[int, int, float, list[Path]]] = []  # clip, frame, finding s, images
    folder = root / ("tess-regions" if regions else "tess-frames")
    folder.mkdir()
    for c, clip in enumerate(clips):
        for n, image in enumerate(clip.frames):
            t0 = time.perf_counter()
            if regions:
                gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
                crops = [image[crop] for crop in finder.regions(gray)]
            else:
                crops = [image]
            finding = time.perf_counter() - t0
            paths = []
            for i, crop in enumerate(crops):
                paths.append(write_image(folder / f"{c}-{n}-{i}.png", crop))
            jobs.append((c, n, finding, paths))
    config = "--psm 6" if regions else "--psm 11"  # a block of text / sparse text
    listing = "".join(f"{p}\n" for _c, _n, _f, paths in jobs for p in paths)
    done = subprocess.run(
        [python, "-c", TESSERACT_CHILD, config],
        input=listing,
        capture_output=True,
        text=True,
        check=True,
    )
    results = iter(json.loads(line) for line in done.stdout.splitlines())
    version = subprocess.run(
        [python, "-c", "import pytesseract; print(pytesseract.get_tesseract_version())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    scores = {clip.variant: Score(orders=len(clip.orders)) for clip in clips}
    for c, n, finding, paths in jobs:
        seconds, tags = finding, []
        for _path in paths:
            text, took = next(results)
            seconds += took
            for line in str(text).splitlines():
                match = pattern.search(line)
                if match:
                    tags.append(f"ORDER_{match.group('number')}")
        clip = clips[c]
        scores[clip.variant].add(clip.truth[n], tags, seconds)
    return scores, version


def with_reader(reader: OcrTagReader | QrTagReader) -> Read:
    return lambda image: tags_of(reader.read(image))


def regions_only(finder: OcrTagReader) -> Read:
    def read(image: np.ndarray) -> list[str]:
        list(finder.regions(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)))
        return []

    return read


def report(
    rows: list[tuple[str, dict[str, Score] | None, str]], notes: list[str], load: str
) -> str:
    variants = [v for v, _ in VARIANTS]
    lines = [
        f"Ticket frames read as exactly their order (of {ORDERS_PER_VARIANT * FPS} per variant):",
        "",
        "| reader | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for name, scores, _note in rows:
        if scores is None or name.startswith("finding"):
            continue
        cells = [f"{100 * scores[v].right / scores[v].ticket_frames:.0f}%" for v in variants]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| reader | orders read at least once | frames with another order's tag | frames/s "
        "(all frames) | ms per ticket frame, median |",
        "|---|---|---|---|---|",
    ]
    for name, scores, note in rows:
        if scores is None:
            lines.append(f"| {name} | {note} | | | |")
            continue
        found = sum(len(s.found) for s in scores.values())
        orders = sum(s.orders for s in scores.values())
        wrong = sum(s.wrong for s in scores.values())
        frames = sum(s.frames for s in scores.values())
        seconds = sum(s.seconds for s in scores.values())
        ticket_ms = 1000 * statistics.median(t for s in scores.values() for t in s.ticket_seconds)
        fps = frames / seconds
        cells = [
            f"{found} of {orders}",
            str(wrong),
            f"{fps:.1f}" if fps < 100 else f"{fps:,.0f}",
            f"{ticket_ms:.0f}" if ticket_ms >= 10 else f"{ticket_ms:.2f}",
        ]
        if name.startswith("finding"):
            cells[:2] = ["-", "-"]
        lines.append(f"| {name}{note} | " + " | ".join(cells) + " |")
    lines += ["", *notes, "", "Machine:", ""]
    lines += [f"- {key}: {value}" for key, value in machine(load)]
    return "\n".join(lines) + "\n"


def machine(load: str) -> list[tuple[str, str]]:
    import onnxruntime
    import rapidocr_onnxruntime

    from framepipe import __version__

    return [
        ("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", run_all.cpu_model()),
        ("load average at start (1, 5, 15 min)", load),
        ("Python", sys.version.split()[0]),
        ("framepipe", __version__),
        ("rapidocr-onnxruntime", getattr(rapidocr_onnxruntime, "__version__", "1.4")),
        ("onnxruntime", onnxruntime.__version__),
        ("OpenCV", cv2.__version__),
    ]


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    if START not in doc:
        raise SystemExit(f"{DOC} has no {START} marker: add the section first")
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{START}\n{text}{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    parser.add_argument(
        "--tesseract-python",
        default=os.environ.get("FP_BENCH_TESSERACT_PYTHON"),
        help="a Python with pytesseract installed (a separate venv); without it no Tesseract",
    )
    args = parser.parse_args()
    logging.getLogger("framepipe").setLevel(logging.WARNING)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows: list[tuple[str, dict[str, Score] | None, str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fp-ocr-bench-") as tmp:
        root = Path(tmp)
        printed = make_clips(root, "text")
        qr = make_clips(root, "qr")
        ocr = OcrTagReader()
        runs: list[tuple[str, Callable[[], Read], list[Clip]]] = [
            ("OcrTagReader (ticket regions)", lambda: with_reader(ocr), printed),
            (
                "OcrTagReader(find_tickets=False) (whole frame)",
                lambda: with_reader(OcrTagReader(find_tickets=False)),
                printed,
            ),
            ("RapidOCR defaults (whole frame)", plain_rapidocr, printed),
            ("zxing-cpp, QR tickets", lambda: with_reader(QrTagReader()), qr),
            ("finding the ticket regions alone (no OCR)", lambda: regions_only(ocr), printed),
        ]
        for name, make, clips in runs:
            run_all.log(f"{name} ...")
            rows.append((name, run_reader(make(), clips), ""))
        python = args.tesseract_python
        if python and shutil.which("tesseract"):
            for regions in (True, False):
                where = "ticket regions" if regions else "whole frame"
                run_all.log(f"Tesseract on the {where} ...")
                scores, version = run_tesseract(python, printed, root, regions=regions)
                rows.insert(-1, (f"Tesseract {version} via pytesseract ({where})", scores, ""))
        else:
            why = "no --tesseract-python given" if not python else "no tesseract binary"
            rows.insert(-1, ("Tesseract via pytesseract", None, f"not run: {why}"))
    notes.append(
        "One frame at a time in one thread; ONNX Runtime uses every core for each RapidOCR "
        "call. The station's tag stage runs 2 workers by default, each with its own engine."
    )
    text = report(rows, notes, load)
    print(text)
    if not args.no_write:
        write_doc(text)


if __name__ == "__main__":
    main()
