"""Frames: one picture and where it came from.

A :class:`Frame` holds a picture with its ``source_id``, ``seq`` (increasing per source, across
restarts), ``ts_ms`` (wall clock at capture, milliseconds), ``pts`` (seconds in the stream, when
known), the ``segment_id`` a segmenter gave it and a free ``meta`` dict that stages fill (an order
id, a face id, a score). Across process boundaries a frame travels as JPEG bytes plus its
metadata (:meth:`Frame.to_message`).

Frames are lazy. A frame from a decoder keeps the decoder's YUV planes (or a capture's JPEG
bytes) and converts only what is asked for:

* ``frame.image`` is the NumPy ``HxWx3`` BGR ``uint8`` image (OpenCV's convention), converted on
  first access and cached. Assigning it replaces the picture.
* ``frame.gray`` is a read-only grey image: the luma plane at no cost (limited range, 16-235,
  for most video), or a grey-only JPEG decode. ``frame.small_gray(2)`` is the same at half
  size, for readers that do not need every pixel (a JPEG is then decoded already scaled).
* ``frame.to_jpeg()`` of a frame whose ``image`` was never read is encoded straight from the
  planes (or is the captured JPEG as it is). Once ``image`` has been read, a stage may have
  changed it in place, so from then on ``gray`` and the JPEG come from ``image``: a stage's
  drawing is always in what is stored.

Frames built from an array (``Frame(image, source_id, seq)``) behave as plain arrays always did.
"""

from __future__ import annotations

import time
from typing import Any

import cv2
import numpy as np

from framepipe.errors import FrameError
from framepipe.pixels import (
    Image,
    JpegPicture,
    YuvPlanes,
    check_reduction,
    decode_jpeg,
    encode_jpeg,
    shrink,
)

__all__ = ["Frame", "Image", "JpegPicture", "YuvPlanes", "decode_jpeg", "encode_jpeg", "now_ms"]

Picture = YuvPlanes | JpegPicture


def now_ms() -> int:
    """Wall-clock time in milliseconds."""
    return time.time_ns() // 1_000_000


class Frame:
    """One picture (an array, YUV planes or JPEG bytes; see the module) and its provenance."""

    __slots__ = (
        "_grey",
        "_image",
        "_picture",
        "meta",
        "pts",
        "segment_id",
        "seq",
        "source_id",
        "ts_ms",
    )

    def __init__(
        self,
        image: Image | None,
        source_id: str,
        seq: int,
        ts_ms: int | None = None,
        pts: float | None = None,
        segment_id: str | None = None,
        meta: dict[str, Any] | None = None,
        *,
        picture: Picture | None = None,
    ) -> None:
        if image is None and picture is None:
            raise FrameError(f"frame {source_id}#{seq} has no picture: give an image or planes")
        self._image = image
        self._picture = picture if image is None else None
        self._grey: Image | None = None
        self.source_id = source_id
        self.seq = seq
        self.ts_ms = now_ms() if ts_ms is None else ts_ms
        self.pts = pts
        self.segment_id = segment_id
        self.meta: dict[str, Any] = {} if meta is None else meta

    @property
    def image(self) -> Image:
        """The BGR image (converted on first access; see the module for what that changes)."""
        if self._image is None:
            assert self._picture is not None
            self._image = self._picture.to_bgr()
        self._picture = None
        self._grey = None
        return self._image

    @image.setter
    def image(self, value: Image) -> None:
        self._image = value
        self._picture = None
        self._grey = None

    @property
    def gray(self) -> Image:
        """A read-only grey image: the luma plane, a grey decode, or ``image`` converted."""
        picture = self._picture
        if picture is None:
            image = self._image
            assert image is not None
            grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
            view = np.asarray(grey, dtype=np.uint8).view()
            view.flags.writeable = False
            return view
        if self._grey is None:
            if isinstance(picture, YuvPlanes):
                self._grey = picture.y
            else:
                grey = picture.to_grey()
                grey.flags.writeable = False
                self._grey = grey
        return self._grey

    def small_gray(self, reduce: int = 2) -> Image:
        """A read-only grey image at 1/``reduce`` of the size (``reduce`` 1, 2, 4 or 8), made
        the cheapest way the picture allows: a captured JPEG is decoded already scaled (libjpeg's
        DCT scaling, sizes rounded up), planes and images are area-averaged from ``gray``. For
        readers that do not need every pixel (a large QR code, a motion gate): a half-size scan
        costs about a quarter of a full one. Not cached."""
        check_reduction(reduce)
        picture = self._picture
        if reduce == 1:
            return self.gray
        if isinstance(picture, JpegPicture):
            small = picture.to_grey(reduce)
        else:
            small = shrink(self.gray, reduce)
        small.flags.writeable = False
        return small

    def peek(self) -> Image:
        """The BGR image for an observer in another thread (a preview, a dashboard), leaving the
        frame as it is: a new conversion while the picture has not been converted, else
        ``image`` itself (do not modify it)."""
        picture = self._picture
        if picture is not None:
            return picture.to_bgr()
        assert self._image is not None
        return self._image

    @property
    def planes(self) -> YuvPlanes | None:
        """The decoder's planes while ``image`` has not been read, else None."""
        picture = self._picture  # read once: another thread may take the frame over
        return picture if isinstance(picture, YuvPlanes) else None

    @property
    def captured_jpeg(self) -> bytes | None:
        """The JPEG bytes the capture produced while ``image`` has not been read, else None."""
        picture = self._picture
        return picture.data if isinstance(picture, JpegPicture) else None

    @property
    def height(self) -> int:
        """Image height in pixels."""
        if self._picture is not None:
            return self._picture.height
        assert self._image is not None
        return int(self._image.shape[0])

    @property
    def width(self) -> int:
        """Image width in pixels."""
        if self._picture is not None:
            return self._picture.width
        assert self._image is not None
        return int(self._image.shape[1])

    def to_jpeg(self, quality: int = 85) -> bytes:
        """The picture as JPEG bytes: from the planes, the captured bytes as they are, or the
        BGR image once it has been read (see the module)."""
        picture = self._picture
        if isinstance(picture, YuvPlanes):
            return picture.to_jpeg(quality)
        if isinstance(picture, JpegPicture):
            return picture.data
        return encode_jpeg(self.image, quality)

    def with_image(self, image: Image) -> Frame:
        """A new frame with ``image`` and this frame's provenance (``meta`` copied)."""
        return Frame(
            image, self.source_id, self.seq, self.ts_ms, self.pts, self.segment_id, dict(self.meta)
        )

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
        """The frame :meth:`to_message` described (decoded when its pixels are first used)."""
        try:
            return cls(
                None,
                source_id=message["source_id"],
                seq=int(message["seq"]),
                ts_ms=int(message["ts_ms"]),
                pts=message.get("pts"),
                segment_id=message.get("segment_id"),
                meta=dict(message.get("meta") or {}),
                picture=JpegPicture(message["jpeg"]),
            )
        except KeyError as exc:
            raise FrameError(f"frame message lacks {exc.args[0]!r}") from exc

    def __repr__(self) -> str:
        return (
            f"Frame({self.source_id}#{self.seq} {self.width}x{self.height} "
            f"ts_ms={self.ts_ms} segment={self.segment_id})"
        )
