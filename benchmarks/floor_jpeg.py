"""The floor's JPEG of a decoded picture, for the benchmarks that measure the machine's floor:
I420 planes straight to simplejpeg, limited range expanded to JPEG's full range as
``framepipe.pixels`` does it (written out here, so a floor never calls framepipe)."""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg  # type: ignore[import-untyped]

QUALITY = 85

# One saturating affine map for the luma rows and one for the chroma rows of the I420
# buffer (``cv2.addWeighted``), as (gain, offset).
_LIMITED_TO_FULL_Y = (255 / 219, -16 * 255 / 219)
_LIMITED_TO_FULL_C = (255 / 224, 128 - 128 * 255 / 224)


def to_full_range(data: np.ndarray, height: int) -> np.ndarray:
    """The I420 buffer ``data`` (limited range) in full range, as a new buffer."""
    out = np.empty_like(data)
    for rows, (gain, offset) in (
        (slice(None, height), _LIMITED_TO_FULL_Y),
        (slice(height, None), _LIMITED_TO_FULL_C),
    ):
        cv2.addWeighted(data[rows], gain, data[rows], 0.0, offset, dst=out[rows])
    return out


def planes_to_jpeg(
    data: np.ndarray, height: int, width: int, full_range: bool, quality: int = QUALITY
) -> bytes:
    """The floor's encoder: I420 planes -> JPEG with simplejpeg, limited range expanded."""
    if not full_range:
        data = to_full_range(data, height)
    quarter = height // 4
    y = data[:height]
    u = data[height : height + quarter].reshape(height // 2, width // 2)
    v = data[height + quarter :].reshape(height // 2, width // 2)
    return bytes(simplejpeg.encode_jpeg_yuv_planes(y, u, v, quality=quality))
