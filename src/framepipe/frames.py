"""Frames: one decoded image and where it came from.

A :class:`Frame` holds a NumPy ``HxWx3`` BGR ``uint8`` image (OpenCV's convention) with its
``source_id``, ``seq`` (increasing per source, across restarts), ``ts_ms`` (wall clock at
capture, milliseconds), ``pts`` (seconds in the stream, when known), the ``segment_id`` a
segmenter gave it and a free ``meta`` dict that stages fill (an order id, a face id, a score).
Across process boundaries a frame travels as JPEG bytes plus its metadata (:meth:`to_message`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from framepipe.errors import FrameError

__all__ = ["Frame", "decode_jpeg", "encode_jpeg", "now_ms"]

Image = npt.NDArray[np.uint8]


def now_ms() -> int:
    """Wall-clock time in milliseconds."""
    return time.time_ns() // 1_000_000


def encode_jpeg(image: Image, quality: int = 85) -> bytes:
    """JPEG bytes of a BGR (or grey) image; raises :class:`FrameError` if it cannot be encoded."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise FrameError(
            f"cannot encode {type(image).__name__} "
            f"{getattr(image, 'shape', '')} as JPEG: need a uint8 HxW(x3) array"
        )
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise FrameError(f"OpenCV could not encode a {image.shape} image as JPEG")
    return buffer.tobytes()


def decode_jpeg(data: bytes) -> Image:
    """The BGR image in JPEG ``data``; raises :class:`FrameError` on bad data."""
    if not data:
        raise FrameError("cannot decode an empty JPEG")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise FrameError(f"not a decodable JPEG ({len(data)} bytes, starts {data[:4].hex()})")
    return np.asarray(image, dtype=np.uint8)


@dataclass(slots=True)
class Frame:
    """One decoded image and its provenance."""

    image: Image
    source_id: str
    seq: int
    ts_ms: int = field(default_factory=now_ms)
    pts: float | None = None
    segment_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        """Image height in pixels."""
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        return int(self.image.shape[1])

    def to_jpeg(self, quality: int = 85) -> bytes:
        """The image as JPEG bytes."""
        return encode_jpeg(self.image, quality)

    def to_message(self, quality: int = 85) -> dict[str, Any]:
        """A dict of JPEG bytes and metadata, to send to another process."""
        return {
            "jpeg": self.to_jpeg(quality),
            "source_id": self.source_id,
            "seq": self.seq,
            "ts_ms": self.ts_ms,
            "pts": self.pts,
            "segment_id": self.segment_id,
            "meta": dict(self.meta),
        }

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> Frame:
        """The frame :meth:`to_message` described."""
        try:
            return cls(
                image=decode_jpeg(message["jpeg"]),
                source_id=message["source_id"],
                seq=int(message["seq"]),
                ts_ms=int(message["ts_ms"]),
                pts=message.get("pts"),
                segment_id=message.get("segment_id"),
                meta=dict(message.get("meta") or {}),
            )
        except KeyError as exc:
            raise FrameError(f"frame message lacks {exc.args[0]!r}") from exc

    def __repr__(self) -> str:
        return (
            f"Frame({self.source_id}#{self.seq} {self.width}x{self.height} "
            f"ts_ms={self.ts_ms} segment={self.segment_id})"
        )
