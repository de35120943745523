"""Pixels in the forms decoders give them: BGR arrays, YUV 4:2:0 planes, JPEG bytes.

A frame keeps whichever form its source produced and converts on demand. The rules:

* :func:`encode_jpeg` / :func:`decode_jpeg` are the one JPEG codec for BGR (or grey) arrays
  (OpenCV), raising :class:`FrameError` with what was wrong.
* :class:`YuvPlanes` holds one decoded I420 picture (a PyAV ``yuv420p``/``yuvj420p`` frame's
  buffer, limited or full range). Its BGR is OpenCV's I420 conversion (BT.601, FFmpeg's
  default matrix); its grey is the luma plane, read-only and copied from nothing; its JPEG is
  encoded straight from the planes (libjpeg-turbo through simplejpeg), limited range first
  expanded to JPEG's full range, so it matches encoding the BGR conversion within rounding.
* :class:`JpegPicture` holds a picture captured as JPEG (an MJPEG capture): its size comes from
  the header; BGR and grey are decoded on demand; its JPEG is the captured bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import simplejpeg  # type: ignore[import-untyped]

from framepipe.errors import FrameError

__all__ = [
    "REDUCTIONS",
    "Image",
    "JpegPicture",
    "YuvPlanes",
    "check_reduction",
    "decode_jpeg",
    "encode_jpeg",
    "jpeg_size",
    "shrink",
]

Image = npt.NDArray[np.uint8]

# Studio ("limited": Y 16-235, Cb/Cr 16-240) to JFIF full range and back, as (gain, offset) of
# a saturating affine map: cv2.addWeighted computes it with SIMD, rounded as np.round of the
# exact value for all 256 codes (checked in the tests), and cheaper than a table lookup.
_LIMITED_TO_FULL_Y = (255 / 219, -16 * 255 / 219)
_LIMITED_TO_FULL_C = (255 / 224, 128 - 128 * 255 / 224)
_FULL_TO_LIMITED_Y = (219 / 255, 16.0)
_FULL_TO_LIMITED_C = (224 / 255, 128 - 128 * 224 / 255)


def _remap_range(
    data: Image, height: int, luma: tuple[float, float], chroma: tuple[float, float]
) -> Image:
    """A new I420 buffer: ``data``'s luma rows (the first ``height``) and its chroma rows
    (the rest, U then V, contiguous) each mapped by ``gain * code + offset``, saturated."""
    out = np.empty_like(data)
    for rows, (gain, offset) in ((slice(None, height), luma), (slice(height, None), chroma)):
        plane = data[rows]
        cv2.addWeighted(plane, gain, plane, 0.0, offset, dst=out[rows])
    return out


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
    return bytes(buffer.tobytes())


_REDUCED_FLAGS = {
    (False, 1): cv2.IMREAD_COLOR,
    (True, 1): cv2.IMREAD_GRAYSCALE,
    (False, 2): cv2.IMREAD_REDUCED_COLOR_2,
    (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2,
    (False, 4): cv2.IMREAD_REDUCED_COLOR_4,
    (True, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4,
    (False, 8): cv2.IMREAD_REDUCED_COLOR_8,
    (True, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
REDUCTIONS = (1, 2, 4, 8)


def check_reduction(factor: int) -> int:
    """``factor`` if it is one of :data:`REDUCTIONS`, else a :class:`FrameError` naming it."""
    if factor not in REDUCTIONS:
        raise FrameError(f"a picture can be reduced by 1, 2, 4 or 8, not {factor!r}")
    return factor


def decode_jpeg(data: bytes, *, grey: bool = False, reduce: int = 1) -> Image:
    """The BGR (or, with ``grey``, the single-channel) image in JPEG ``data``; with ``reduce``
    (2, 4 or 8) at that fraction of the size, scaled while decoding (libjpeg's DCT scaling:
    cheaper than a full decode; sizes rounded up). Raises :class:`FrameError` on bad data."""
    if not data:
        raise FrameError("cannot decode an empty JPEG")
    flag = _REDUCED_FLAGS[(grey, check_reduction(reduce))]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if image is None:
        raise FrameError(f"not a decodable JPEG ({len(data)} bytes, starts {data[:4].hex()})")
    return np.asarray(image, dtype=np.uint8)


def jpeg_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` from a JPEG's header, without decoding it."""
    try:
        height, width, _colour, _subsampling = simplejpeg.decode_jpeg_header(data)
    except ValueError as exc:
        raise FrameError(
            f"not a decodable JPEG ({len(data)} bytes, starts {data[:4].hex()}): {exc}"
        ) from exc
    return int(width), int(height)


def shrink(image: Image, reduce: int) -> Image:
    """``image`` at 1/``reduce`` of its size, each pixel the mean of the ones it covers
    (``cv2.INTER_AREA``); ``image`` itself when ``reduce`` is 1."""
    if check_reduction(reduce) == 1:
        return image
    h, w = image.shape[:2]
    size = (max(1, w // reduce), max(1, h // reduce))
    return np.asarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)


def _read_only(array: Image) -> Image:
    view = array.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True)
class YuvPlanes:
    """One I420 picture: ``data`` is ``(height * 3 / 2, width)`` uint8, Y then U then V
    (PyAV's ``frame.to_ndarray()`` of a ``yuv420p`` frame); ``full_range`` for ``yuvj420p``.
    Width and height must be even."""

    data: Image
    full_range: bool = False
    height: int = field(init=False)
    width: int = field(init=False)

    def __post_init__(self) -> None:
        rows, width = self.data.shape
        height = rows * 2 // 3
        if rows != height * 3 // 2 or height % 2 or width % 2:
            raise FrameError(f"not an I420 buffer of even size: shape {self.data.shape}")
        object.__setattr__(self, "height", height)
        object.__setattr__(self, "width", width)

    @classmethod
    def from_av(cls, frame: Any) -> YuvPlanes | None:
        """The planes of a PyAV video frame, or None when it is not even-sized 4:2:0."""
        name = frame.format.name
        if name not in ("yuv420p", "yuvj420p") or frame.width % 2 or frame.height % 2:
            return None
        return cls(np.asarray(frame.to_ndarray(), dtype=np.uint8), name == "yuvj420p")

    @property
    def y(self) -> Image:
        """The luma plane (read-only view)."""
        return _read_only(self.data[: self.height])

    def _chroma(self) -> tuple[Image, Image]:
        h, w = self.height, self.width
        quarter = h // 4
        u = self.data[h : h + quarter].reshape(h // 2, w // 2)
        v = self.data[h + quarter :].reshape(h // 2, w // 2)
        return u, v

    def to_bgr(self) -> Image:
        """A new BGR array (OpenCV's I420 conversion; full range mapped to limited first)."""
        data = self.data
        if self.full_range:
            data = _remap_range(data, self.height, _FULL_TO_LIMITED_Y, _FULL_TO_LIMITED_C)
        return np.asarray(cv2.cvtColor(data, cv2.COLOR_YUV2BGR_I420), dtype=np.uint8)

    def to_jpeg(self, quality: int = 85) -> bytes:
        """JPEG (JFIF, full range) straight from the planes, no BGR conversion."""
        planes = self
        if not self.full_range:
            full = _remap_range(self.data, self.height, _LIMITED_TO_FULL_Y, _LIMITED_TO_FULL_C)
            planes = YuvPlanes(full, full_range=True)
        y = planes.data[: planes.height]
        u, v = planes._chroma()
        return bytes(simplejpeg.encode_jpeg_yuv_planes(y, u, v, quality=int(quality)))


@dataclass(frozen=True)
class JpegPicture:
    """One picture captured as JPEG bytes (size read from the header)."""

    data: bytes
    width: int = field(init=False)
    height: int = field(init=False)

    def __post_init__(self) -> None:
        width, height = jpeg_size(self.data)
        object.__setattr__(self, "width", width)
        object.__setattr__(self, "height", height)

    def to_bgr(self) -> Image:
        """The decoded BGR image."""
        return decode_jpeg(self.data)

    def to_grey(self, reduce: int = 1) -> Image:
        """The decoded grey image (cheaper than colour), at 1/``reduce`` of the size."""
        return decode_jpeg(self.data, grey=True, reduce=reduce)
