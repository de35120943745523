"""Reading order tags: :class:`TagReader` (what a reader is), :class:`QrTagReader` (QR codes,
zxing-cpp), :func:`tag_reader` (a reader by name: ``qr``, ``ocr``), :class:`OrderTagStage` (the
stage that reads each frame's tag and reports odd ones) and :class:`OrderKey` (the segmenter's
key: which order a frame belongs to).

* A tag that is seen but does not decode is reported (``tag.unreadable``, at most once per
  ``report_every`` seconds per station, with the count); the frame stays with the open order.
* Two different order tags in one frame (``tag.conflict``): the frame stays with the order
  being seen, if it is one of them; otherwise it belongs to no new order.
* A decoded text that is not an order id (``ORDER_PATTERN``; ids become storage keys) is
  reported as ``tag.invalid`` and ignored.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from framepipe import Frame, Processor, get_logger
from framepipe.errors import ConfigError, MissingDependencyError
from framepipe.pixels import REDUCTIONS

__all__ = [
    "ORDER_PATTERN",
    "READERS",
    "OrderKey",
    "OrderTagStage",
    "QrTagReader",
    "TagReader",
    "TagReading",
    "tag_reader",
]

ORDER_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
"""An order id: it becomes part of the storage keys, so no ``/``, ``.`` or space (``.2``
marks an order seen again)."""


@dataclass(frozen=True)
class TagReading:
    """One tag in a frame: its text (None: seen but not decodable) and how sharp it is there
    (the variance of the Laplacian over the tag's box: higher is sharper)."""

    text: str | None
    sharpness: float
    error: str | None = None


class TagReader(Protocol):
    """Finds order tags in an image. :class:`QrTagReader` reads QR codes;
    ``ocr.OcrTagReader`` reads printed order numbers (``ORDER #123`` -> ``ORDER_123``).

    A reader with a ``colour`` attribute set to False is given the frame's grey image (for a
    decoded frame, its luma plane at no cost), at 1/``reduce`` of the size when it has a
    ``reduce`` attribute above 1 (``frame.small_gray``); otherwise the BGR image."""

    def read(self, image: np.ndarray) -> list[TagReading]:
        """Every tag in ``image`` (BGR, or grey for a ``colour = False`` reader)."""
        ...


class QrTagReader:
    """QR order tags, read with zxing-cpp (``pip install 'framepipe[qr]'``), in the grey
    image (``colour = False``: a decoded frame's luma plane, no colour conversion).

    ``reduce`` (1, 2, 4 or 8) reads the tags in the grey image at that fraction of the size: a
    ticket whose QR modules are at least 4 pixels wide in the camera's picture reads as well at
    half size (on the example's 640x360 station video, the same frames are read), for about a
    quarter of the reading cost; a captured JPEG is then decoded already scaled. Sharpness is
    measured in the image read, so compare it only between frames read the same way."""

    colour = False

    def __init__(self, reduce: int = 1) -> None:
        if reduce not in REDUCTIONS:
            raise ConfigError(f"QR tag reduce must be one of {REDUCTIONS}, not {reduce!r}")
        self.reduce = reduce
        try:
            import zxingcpp
        except ImportError as exc:
            raise MissingDependencyError("zxing-cpp", "qr", "reading QR order tags") from exc
        self._zxing = zxingcpp

    def read(self, image: np.ndarray) -> list[TagReading]:
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        # one format, as every release takes it (its stubs ask for a BarcodeFormats set)
        fmt: Any = self._zxing.BarcodeFormat.QRCode
        try:
            found = self._zxing.read_barcodes(gray, formats=fmt, return_errors=True)
        except TypeError:  # zxing-cpp < 2.3 reports readable codes only
            found = self._zxing.read_barcodes(gray, formats=fmt)
        readings = []
        for code in found:
            error = getattr(code, "error", None)
            sharpness = _sharpness(gray, code.position)
            if error or not code.valid:
                readings.append(TagReading(None, sharpness, str(error) or "not decodable"))
            else:
                readings.append(TagReading(code.text, sharpness))
        return readings


READERS = ("qr", "ocr")


def tag_reader(reader: TagReader | str | None) -> TagReader:
    """``reader`` as a :class:`TagReader`: ``"qr"`` (or None) is a :class:`QrTagReader`,
    ``"ocr"`` an ``ocr.OcrTagReader`` with its defaults (imported only then), an instance is
    returned as it is. An unknown name is a :class:`ConfigError`; a reader whose package is
    not installed a :class:`MissingDependencyError` with the pip command."""
    if reader is None or reader == "qr":
        return QrTagReader()
    if reader == "ocr":
        from ocr import OcrTagReader

        return OcrTagReader()
    if isinstance(reader, str):
        raise ConfigError(f"tag reader must be one of {', '.join(READERS)}, not {reader!r}")
    return reader


def _sharpness(gray: np.ndarray, position: Any) -> float:
    points = [position.top_left, position.top_right, position.bottom_right, position.bottom_left]
    xs = [p.x for p in points]
    ys = [p.y for p in points]
    h, w = gray.shape[:2]
    x0, x1 = max(0, min(xs)), min(w, max(xs) + 1)
    y0, y1 = max(0, min(ys)), min(h, max(ys) + 1)
    if x1 - x0 < 3 or y1 - y0 < 3:
        return 0.0
    return float(cv2.Laplacian(gray[y0:y1, x0:x1], cv2.CV_64F).var())


class OrderTagStage(Processor):
    """Reads the order tag of each frame of one station.

    Sets ``frame.meta``: ``station_id`` always; ``order_id`` and ``tag_sharpness`` when exactly
    one order tag was read; ``order_tags`` (sorted) when several different ones were;
    ``tag_error`` when a tag was seen but none decoded. Reports ``tag.unreadable``,
    ``tag.conflict`` and ``tag.invalid`` events (each at most once per ``report_every``
    seconds, with the number of frames since the last report) and ``station.first_frame``
    once per start. Thread-safe: run it with several workers. ``reader`` is a
    :class:`TagReader` or a name for :func:`tag_reader` (``"qr"``, ``"ocr"``); None reads QR
    tags with a reader made at setup."""

    name = "order_tags"

    def __init__(
        self,
        station_id: str,
        reader: TagReader | str | None = None,
        *,
        pattern: str = ORDER_PATTERN,
        report_every: float = 5.0,
    ) -> None:
        self.station_id = station_id
        self.reader = tag_reader(reader) if isinstance(reader, str) else reader
        self.pattern = re.compile(pattern)
        self.report_every = report_every
        self.added_at = time.time()
        self._first = True
        self._lock = threading.Lock()
        self._reports: dict[str, tuple[float, int]] = {}
        self._log = get_logger(station_id)

    def setup(self) -> None:
        if self.reader is None:
            self.reader = QrTagReader()
        self._first = True

    def process(self, item: Any) -> Any:
        frame: Frame = item
        assert self.reader is not None
        frame.meta["station_id"] = self.station_id
        if self._first:
            self._first_frame()
        if getattr(self.reader, "colour", True):
            image = frame.image
        else:
            image = frame.small_gray(getattr(self.reader, "reduce", 1))
        readings = self.reader.read(image)
        orders: dict[str, float] = {}
        unreadable: list[str] = []
        invalid: list[str] = []
        for reading in readings:
            if reading.text is None:
                unreadable.append(reading.error or "not decodable")
            elif self.pattern.fullmatch(reading.text) is None:
                invalid.append(reading.text)
            else:
                orders[reading.text] = max(orders.get(reading.text, 0.0), reading.sharpness)
        if len(orders) == 1:
            ((order_id, sharpness),) = orders.items()
            frame.meta["order_id"] = order_id
            frame.meta["tag_sharpness"] = round(sharpness, 3)
        elif orders:
            frame.meta["order_tags"] = sorted(orders)
            frame.meta["tag_sharpness"] = round(max(orders.values()), 3)
            self._report("tag.conflict", frame, "order tags %s in one frame", tags=sorted(orders))
        if unreadable and not orders:
            frame.meta["tag_error"] = unreadable[0]
            self._report(
                "tag.unreadable",
                frame,
                "an order tag that does not decode (%s)",
                error=unreadable[0],
            )
        if invalid:
            self._report(
                "tag.invalid", frame, "a code that is not an order id: %r", texts=invalid[:5]
            )
        return frame

    def _first_frame(self) -> None:
        with self._lock:
            if not self._first:
                return
            self._first = False
        seconds = time.time() - self.added_at
        self._log.info("first frame processed %.2fs after the station was started", seconds)
        self.emit("station.first_frame", station_id=self.station_id, seconds=round(seconds, 3))

    def _report(self, event: str, frame: Frame, message: str, **data: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, count = self._reports.get(event, (float("-inf"), 0))
            count += 1
            if now - last < self.report_every:
                self._reports[event] = (last, count)
                return
            self._reports[event] = (now, 0)
        detail = next(iter(data.values()))
        self._log.warning(
            f"frame %d: {message} (%d frame(s) since the last report)", frame.seq, detail, count
        )
        self.emit(
            event,
            station_id=self.station_id,
            seq=frame.seq,
            ts_ms=frame.ts_ms,
            frames=count,
            **data,
        )


class OrderKey:
    """The segmenter's key for one station: the frame's ``order_id``. On a conflict (several
    order tags) the order seen last stays, if it is among them; otherwise the frame opens no
    order. Called in frame order (by the segmenter)."""

    def __init__(self) -> None:
        self.last: str | None = None

    def __call__(self, frame: Frame) -> str | None:
        order_id = frame.meta.get("order_id")
        if order_id:
            self.last = str(order_id)
            return self.last
        tags = frame.meta.get("order_tags")
        if tags and self.last in tags:
            return self.last
        return None
