"""The live demo's media: a counter where order tickets with a QR code come and go, and the
stage that reads them.

Both sides use OpenCV's own QR encoder and detector (``cv2.QRCodeEncoder``,
``cv2.QRCodeDetector``), which ship with the core ``opencv-python-headless`` dependency: the
demo needs no extra package (the order-accuracy example reads tags with zxing-cpp, from the
``qr`` extra, which is faster on real footage; the generated tickets here are clean enough for
OpenCV).

Guarantees: :func:`make_station_clip` writes the clip whole or not at all (a ``.part`` file
renamed at the end) and returns the schedule it drew; :class:`OrderTagReader` sets
``frame.meta["order"]`` to the order id a frame shows, or None (no ticket, an unreadable one,
or text that is not an order id), and ``frame.meta["score"]`` to the tag's sharpness, so a
:class:`~framepipe.stream.sinks.FrameStore` can keep each order's sharpest frames.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from framepipe.processors.base import Processor

__all__ = [
    "DEMO_ORDERS",
    "ORDER_ID",
    "OrderTagReader",
    "Shot",
    "make_station_clip",
    "order_ticket",
    "read_order",
]

DEMO_ORDERS = ("ORDER_101", "ORDER_102", "ORDER_103", "ORDER_104")
"""The orders of the demo's station clip, in the order their tickets appear."""

ORDER_ID = re.compile(r"ORDER_[0-9]{1,9}")
"""What an order id looks like (it becomes part of the frames' object keys)."""

_Image = np.ndarray[Any, np.dtype[np.uint8]]


@dataclass(frozen=True)
class Shot:
    """Frames ``first`` .. ``first + frames - 1`` of the clip show ``order`` (None: nothing)."""

    order: str | None
    first: int
    frames: int


def order_ticket(order_id: str, scale: int = 4) -> _Image:
    """A printed order ticket (BGR): the QR code of ``order_id`` in a white margin, the id
    printed under it."""
    modules = cv2.QRCodeEncoder.create().encode(order_id)
    code = cv2.resize(modules, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST).astype(
        np.uint8
    )
    margin = 4 * scale
    side = code.shape[0] + 2 * margin
    ticket = np.full((side + 24, side), 255, np.uint8)
    ticket[margin : margin + code.shape[0], margin : margin + code.shape[1]] = code
    cv2.putText(ticket, order_id, (margin, side + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1)
    return np.asarray(cv2.cvtColor(ticket, cv2.COLOR_GRAY2BGR), np.uint8)


def _counter(width: int, height: int, n: int) -> _Image:
    """The empty counter seen from above, with a clock hand that turns once per 10 s at 8 fps
    (so the preview visibly moves even between orders)."""
    image = np.full((height, width, 3), (92, 110, 124), np.uint8)
    cv2.rectangle(image, (16, 16), (width - 17, height - 17), (70, 80, 90), 3)
    centre = (width - 44, 44)
    angle = 2 * np.pi * (n % 80) / 80
    tip = (int(centre[0] + 22 * np.sin(angle)), int(centre[1] - 22 * np.cos(angle)))
    cv2.circle(image, centre, 26, (200, 200, 200), 2, cv2.LINE_AA)
    cv2.line(image, centre, tip, (240, 240, 240), 2, cv2.LINE_AA)
    return image


def make_station_clip(
    path: Path,
    orders: Sequence[str] = DEMO_ORDERS,
    *,
    fps: int = 8,
    size: tuple[int, int] = (640, 360),
    order_seconds: float = 3.0,
    gap_seconds: float = 2.0,
    lead_seconds: float = 1.0,
) -> list[Shot]:
    """Encode an H.264 clip of an order station: ``lead_seconds`` of an idle counter, then
    for each order its ticket for ``order_seconds`` (drifting a little, every fourth frame a
    little out of focus) followed by ``gap_seconds`` of idle counter. Returns the schedule."""
    for order_id in orders:
        if not ORDER_ID.fullmatch(order_id):
            raise ValueError(f"order id {order_id!r} does not look like ORDER_<number>")
    width, height = size
    plan: list[tuple[str | None, float]] = [(None, lead_seconds)]
    for order_id in orders:
        plan += [(order_id, order_seconds), (None, gap_seconds)]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    shots: list[Shot] = []
    tickets = {order: order_ticket(order) for order in orders}
    n = 0
    with av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20", "g": str(fps)}
        for order, seconds in plan:
            shot = Shot(order, n, round(seconds * fps))
            shots.append(shot)
            for i in range(shot.frames):
                image = _counter(width, height, n)
                if order is not None:
                    paper = tickets[order]
                    if i % 4 == 3:
                        paper = np.asarray(cv2.GaussianBlur(paper, (3, 3), 0.8), np.uint8)
                    th, tw = paper.shape[:2]
                    x, y = 60 + (i % 8) * 4, (height - th) // 2 + (i % 3) * 2
                    image[y : y + th, x : x + tw] = paper
                frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                frame.pts, frame.time_base = n, Fraction(1, fps)
                container.mux(stream.encode(frame))
                n += 1
        container.mux(stream.encode(None))
    tmp.replace(path)
    return shots


def read_order(detector: cv2.QRCodeDetector, gray: _Image) -> tuple[str | None, float]:
    """The order id of the QR code in ``gray`` (None when there is none, it does not decode
    or is not an order id) and the code's sharpness (variance of the Laplacian over it)."""
    text, points, _ = detector.detectAndDecode(gray)
    if points is None:
        return None, 0.0
    corners = np.asarray(points).reshape(-1, 2)
    x0, y0 = np.maximum(corners.min(axis=0).astype(int), 0)
    x1, y1 = corners.max(axis=0).astype(int) + 1
    region = gray[y0:y1, x0:x1]
    sharpness = float(cv2.Laplacian(region, cv2.CV_64F).var()) if region.size > 9 else 0.0
    return (text if ORDER_ID.fullmatch(text or "") else None), sharpness


class OrderTagReader(Processor):
    """Sets ``frame.meta["order"]`` (the order id on the ticket in view, or None) and
    ``frame.meta["score"]`` (its sharpness) on every frame; safe with several workers (one
    detector per thread)."""

    name = "order_tags"

    def __init__(self) -> None:
        self._local = threading.local()

    def process(self, item: Any) -> Any:
        detector = getattr(self._local, "detector", None)
        if detector is None:
            detector = self._local.detector = cv2.QRCodeDetector()
        order, score = read_order(detector, item.gray)
        item.meta["order"] = order
        item.meta["score"] = score
        return item
