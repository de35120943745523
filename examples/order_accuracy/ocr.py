"""Printed order numbers read with OCR: :class:`OcrTagReader`, a :class:`~tags.TagReader`
like :class:`~tags.QrTagReader`, for stations whose tickets carry their order number as text
(``ORDER #123``) instead of a QR code. The hand-written order-accuracy station read its orders
this way.

It runs RapidOCR (``pip install 'framepipe[ocr]'``: ``rapidocr-onnxruntime``, whose detection
and recognition models ship inside the wheel, so nothing is downloaded) on the tickets only:
bright paper regions of the frame are found first, and a frame without one costs a threshold
and no OCR at all.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
from tags import TagReading

from framepipe.errors import ConfigError, MissingDependencyError

__all__ = ["ORDER_NUMBER", "OcrTagReader"]

ORDER_NUMBER = r"(?:\bORDER\s*(?:NO\.?|N°)?\s*[#:_-]?|#)\s*(?P<number>\d{1,12})\b"
"""The order number in one line of printed text: ``ORDER #123``, ``ORDER 123``, ``ORDER
NO. 123``, ``ORDER_123`` or ``#123`` (case is ignored)."""


class OcrTagReader:
    """Order tags read from printed order numbers.

    Each line of text recognised with a confidence of at least ``min_confidence`` that
    contains ``pattern`` (a regex with a ``number`` group; default :data:`ORDER_NUMBER`) gives
    a tag ``tag_format.format(number=...)``: ``ORDER_123``, the id a QR ticket of the same
    order encodes, so orders, storage keys and segmentation are the same with either reader.
    (OCR often drops the space between words: a pattern should allow none, ``\\s*``.)
    A ticket whose text is read but holds no order number (covered, smudged, too blurred) is
    a reading with ``text=None`` and the text that was read in its ``error``: the station
    reports it as ``tag.unreadable``. A frame without tickets gives no reading.

    Where it looks: with ``find_tickets`` (the default) only in bright paper regions (gray
    level >= ``paper_level``, at least ``min_ticket_fraction`` of the frame's area), each
    cropped with a margin; without, in the whole frame. What it reads (a crop or the frame)
    is first shrunk so its longer side is at most ``max_side`` pixels.

    Thread-safe: each thread that calls :meth:`read` gets its own OCR engine (RapidOCR keeps
    per-call state), so an ``OrderTagStage`` with several workers runs them in parallel.
    ``threads`` caps each engine's ONNX Runtime threads (None: its default, every core).
    """

    def __init__(
        self,
        *,
        min_confidence: float = 0.6,
        pattern: str = ORDER_NUMBER,
        tag_format: str = "ORDER_{number}",
        find_tickets: bool = True,
        paper_level: int = 170,
        min_ticket_fraction: float = 0.005,
        max_side: int = 640,
        threads: int | None = None,
    ) -> None:
        try:
            from rapidocr_onnxruntime import RapidOCR  # type: ignore[import-untyped]
        except ImportError as exc:
            raise MissingDependencyError(
                "rapidocr-onnxruntime", "ocr", "reading printed order numbers"
            ) from exc
        if not 0.0 <= min_confidence <= 1.0:
            raise ConfigError(
                f"OcrTagReader: min_confidence must be in [0, 1], not {min_confidence}"
            )
        if max_side < 32:
            raise ConfigError(f"OcrTagReader: max_side must be >= 32 pixels, not {max_side}")
        try:
            self.pattern = re.compile(pattern, re.IGNORECASE)
        except re.error as exc:
            raise ConfigError(f"OcrTagReader: pattern {pattern!r} is not a regex: {exc}") from exc
        if "number" not in self.pattern.groupindex:
            raise ConfigError(f"OcrTagReader: pattern {pattern!r} needs a (?P<number>...) group")
        self.min_confidence = min_confidence
        self.tag_format = tag_format
        self.find_tickets = find_tickets
        self.paper_level = paper_level
        self.min_ticket_fraction = min_ticket_fraction
        self.max_side = max_side
        self._engine_class: Any = RapidOCR
        self._options: dict[str, Any] = {
            "text_score": 0.0,  # every line comes back; min_confidence is applied here
            "det_limit_type": "max",  # never upscale what we read (the default upscales to 736)
            "use_cls": False,  # tickets are not upside down; saves a model run per line
        }
        if threads is not None:
            self._options["intra_op_num_threads"] = threads
            self._options["inter_op_num_threads"] = 1
        self._local = threading.local()

    def _engine(self) -> Any:
        engine = getattr(self._local, "engine", None)
        if engine is None:
            engine = self._local.engine = self._engine_class(**self._options)
        return engine

    def read(self, image: np.ndarray) -> list[TagReading]:
        """The order tags in ``image`` (BGR): one reading per order number read, and one with
        ``text=None`` per ticket whose text holds none."""
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        readings: list[TagReading] = []
        for crop in self.regions(gray):
            readings.extend(self._read_crop(image[crop], gray[crop]))
        return readings

    def regions(self, gray: np.ndarray) -> Iterator[tuple[slice, slice]]:
        """Where :meth:`read` looks in a frame (``gray``: its gray levels): each ticket's
        (rows, columns) with a margin, or the whole frame without ``find_tickets``."""
        h, w = gray.shape[:2]
        if not self.find_tickets:
            yield slice(0, h), slice(0, w)
            return
        bright = (gray >= self.paper_level).astype(np.uint8)
        paper = cv2.morphologyEx(bright, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
        contours, _ = cv2.findContours(paper, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        min_area = self.min_ticket_fraction * h * w
        margin = 6
        for contour in contours:
            if cv2.contourArea(contour) < min_area:
                continue
            x, y, bw, bh = cv2.boundingRect(contour)
            yield (
                slice(max(0, y - margin), min(h, y + bh + margin)),
                slice(max(0, x - margin), min(w, x + bw + margin)),
            )

    def _read_crop(self, crop: np.ndarray, gray: np.ndarray) -> list[TagReading]:
        scale = min(1.0, self.max_side / max(crop.shape[:2]))
        if scale < 1.0:
            size = (round(crop.shape[1] * scale), round(crop.shape[0] * scale))
            crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        lines, _ = self._engine()(crop)
        readings: list[TagReading] = []
        seen: list[str] = []
        for box, text, score in lines or []:
            seen.append(f"{text!r} ({float(score):.2f})")
            match = self.pattern.search(str(text))
            if match is None or float(score) < self.min_confidence:
                continue
            number = match.group("number")
            readings.append(
                TagReading(self.tag_format.format(number=number), _sharpness(gray, box))
            )
        if not readings and seen:
            readings.append(
                TagReading(None, _sharpness(gray, None), "no order number in " + ", ".join(seen))
            )
        return readings


def _sharpness(gray: np.ndarray, box: Any) -> float:
    """The variance of the Laplacian over ``box`` (four corner points; None: all of
    ``gray``), as :class:`~tags.QrTagReader` measures a QR code."""
    if box is not None:
        points = np.asarray(box, np.float32)
        h, w = gray.shape[:2]
        x0, y0 = np.floor(points.min(axis=0)).astype(int)
        x1, y1 = np.ceil(points.max(axis=0)).astype(int) + 1
        gray = gray[max(0, y0) : min(h, y1), max(0, x0) : min(w, x1)]
    if gray.shape[0] < 3 or gray.shape[1] < 3:
        return 0.0
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())
