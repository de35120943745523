"""``decode_qr``: QR codes shown in a clip (zxing-cpp), e.g. a booking code before a jump."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from framepipe.errors import MissingDependencyError
from framepipe.media.decoding import decode, open_video
from framepipe.media.limits import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    DEFAULT_MAX_PIXELS,
    length_limit,
    pixel_limit,
)
from framepipe.media.progress import Progress, ProgressCallback
from framepipe.media.timing import estimate_frames, frame_seconds, stream_rate

__all__ = ["QrCode", "QrResult", "decode_qr"]


@dataclass(frozen=True)
class QrCode:
    """One distinct code: its text, the first frame (index, seconds) it was read in, and in
    how many scanned frames it was read."""

    text: str
    frame_index: int
    time: float
    hits: int = 1


@dataclass(frozen=True)
class QrResult:
    """What :func:`decode_qr` found.

    ``codes`` holds every distinct text in order of first appearance; ``unreadable_frames``
    lists the scanned frames where a QR symbol was located but could not be decoded (damaged,
    blurred). ``text``/``frame_index`` are the first code's (None when none was readable)."""

    codes: tuple[QrCode, ...]
    unreadable_frames: tuple[int, ...] = field(default=())
    frames_scanned: int = 0

    @property
    def text(self) -> str | None:
        return self.codes[0].text if self.codes else None

    @property
    def frame_index(self) -> int | None:
        return self.codes[0].frame_index if self.codes else None

    @property
    def texts(self) -> list[str]:
        return [code.text for code in self.codes]

    @property
    def ambiguous(self) -> bool:
        """More than one different code: which one is meant cannot be told."""
        return len(self.codes) > 1

    @property
    def readable(self) -> bool:
        return bool(self.codes)


def _zxing() -> ModuleType:
    try:
        import zxingcpp
    except ImportError as exc:
        raise MissingDependencyError("zxing-cpp", "qr", "QR decoding") from exc
    return zxingcpp


def _read(zxing: ModuleType, gray: np.ndarray) -> list[Any]:
    """QR symbols in a grayscale image, undecodable ones included where zxing-cpp can say
    (``return_errors``, zxing-cpp >= 2.3)."""
    fmt = zxing.BarcodeFormat.QRCode
    try:
        return list(zxing.read_barcodes(gray, formats=fmt, return_errors=True))
    except TypeError:  # older zxing-cpp: readable codes only
        return list(zxing.read_barcodes(gray, formats=fmt))


def decode_qr(
    src: Path | str,
    *,
    max_frames: int | None = None,
    every: int = 5,
    stop_after: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
    progress: ProgressCallback | None = None,
) -> QrResult | None:
    """Scan every ``every``-th frame of ``src`` (the first ``max_frames`` frames, default all)
    for QR codes with zxing-cpp.

    Returns None when no QR symbol was seen at all, else a :class:`QrResult` with every
    distinct text (``ambiguous`` when there are several) and the frames where a symbol was
    seen but not readable (zxing-cpp >= 2.3). ``stop_after`` ends the scan once that many
    frames held a readable code (None: scan to the end, needed to notice a second, different
    code). A video larger than ``max_pixels`` (default
    :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192; 0: no limit) is refused with
    a :class:`MediaError` before any frame is decoded, and so is one whose header announces a
    longer media than ``max_duration`` seconds or more frames than ``max_frame_count``
    (defaults :data:`~framepipe.media.DEFAULT_MAX_DURATION`, 6 hours, and
    :data:`~framepipe.media.DEFAULT_MAX_FRAME_COUNT`; 0: no limit, each); one whose header
    tells less is stopped with a :class:`MediaError` at the frame that passes the limit (a
    scan that ``max_frames`` or ``stop_after`` ends first is not)."""
    if every < 1:
        raise ValueError(f"every must be >= 1, not {every}")
    zxing = _zxing()
    src = Path(src)
    found: dict[str, QrCode] = {}
    unreadable: list[int] = []
    scanned = 0
    readable_frames = 0
    length = length_limit(max_duration, max_frame_count)
    with open_video(src, max_pixels=pixel_limit(max_pixels), length=length) as (container, stream):
        rate = stream_rate(stream)
        limit = estimate_frames(stream, container)
        if max_frames is not None:
            limit = min(limit, max_frames) if limit else max_frames
        report = Progress(progress, -(-limit // every))
        frames = decode(container, stream, src, limit=length)
        # islice: a frame past max_frames is not decoded (nor held to the length limit)
        for index, frame in enumerate(itertools.islice(frames, max_frames)):
            if index % every:
                continue
            gray = frame.to_ndarray(format="gray")
            scanned += 1
            any_readable = False
            for barcode in _read(zxing, gray):
                if getattr(barcode, "error", None) or not barcode.valid:
                    unreadable.append(index)
                    continue
                any_readable = True
                text = barcode.text
                if text in found:
                    code = found[text]
                    found[text] = QrCode(code.text, code.frame_index, code.time, code.hits + 1)
                else:
                    found[text] = QrCode(text, index, frame_seconds(frame, index, rate))
            report.step()
            if any_readable:
                readable_frames += 1
                if stop_after is not None and readable_frames >= stop_after:
                    break
    report.finish()
    if not found and not unreadable:
        return None
    return QrResult(
        codes=tuple(found.values()),
        unreadable_frames=tuple(sorted(set(unreadable))),
        frames_scanned=scanned,
    )
