"""The picture-size limit: how large a picture the toolkit decodes or writes, judged from
headers before any frame is decoded.

Every function that reads a video or images takes ``max_pixels`` (default
:data:`DEFAULT_MAX_PIXELS`; 0: no limit). The toolkit reads no setting: the job steps
(:mod:`framepipe.media.steps`) pass the setting ``media_max_pixels`` in."""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

from framepipe.errors import MediaError

__all__ = [
    "BACKSTOP",
    "DEFAULT_MAX_PIXELS",
    "check_output_size",
    "check_picture",
    "image_size",
    "pixel_limit",
]

DEFAULT_MAX_PIXELS = 8192 * 8192
"""The picture-size limit every function's ``max_pixels`` defaults to (and the default of the
setting ``media_max_pixels``, which the job steps pass in): 8192 x 8192, room for 8K UHD
(7680 x 4320) and the largest H.264/HEVC level, while one decoded frame stays near 100 MB
(yuv420p) and its BGR copy near 200 MB."""

BACKSTOP = 4
"""FFmpeg's own ``max_pixels`` is this many times the limit (see
:func:`~framepipe.media.decoding.open_video`)."""

_RAISE_IT = (
    "raise the limit with max_pixels= or the setting FRAMEPIPE_MEDIA_MAX_PIXELS (0: no limit)"
)


def pixel_limit(max_pixels: int) -> int:
    """``max_pixels`` checked as a picture-size limit (pixels; 0: no limit). Anything but a
    whole number >= 0 raises :class:`ValueError`. Reads no setting: a caller that has
    settings (a job step) passes ``media_max_pixels`` in."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(
            f"max_pixels must be a whole number >= 0 (0: no limit), not {max_pixels!r}"
        )
    return max_pixels


def _limit_text(limit: int) -> str:
    side = math.isqrt(limit)
    return f"{limit:,} pixels" + (f" ({side}x{side})" if side * side == limit else "")


def check_picture(
    path: Path | str, width: int, height: int, limit: int, what: str = "its picture"
) -> None:
    """Raise :class:`MediaError` naming ``path``, its size and the limit (and how to raise it)
    when a ``width`` x ``height`` picture is larger than ``limit`` pixels (0: no limit)."""
    if limit and width * height > limit:
        raise MediaError(
            path,
            f"{what} is {width}x{height} ({width * height:,} pixels), "
            f"larger than the limit of {_limit_text(limit)}: refused "
            f"before decoding; {_RAISE_IT}",
        )


def check_output_size(width: int, height: int, limit: int) -> None:
    """Raise :class:`ValueError` when a requested output of ``width`` x ``height`` is larger
    than ``limit`` pixels (0: no limit), before anything is decoded or written."""
    if limit and width * height > limit:
        raise ValueError(
            f"the requested output size {width}x{height} "
            f"({width * height:,} pixels) is larger than the limit of "
            f"{_limit_text(limit)}; {_RAISE_IT}"
        )


def image_size(path: Path | str) -> tuple[int, int] | None:
    """(width, height) of a PNG, JPEG, BMP or WebP image read from its header alone (no pixel
    is decoded); None for another format or a header that cannot be parsed."""
    try:
        with open(path, "rb") as file:
            head = file.read(32)
            if head.startswith(b"\x89PNG\r\n\x1a\n") and head[12:16] == b"IHDR":
                width, height = struct.unpack(">II", head[16:24])
                return int(width), int(height)
            if head.startswith(b"BM") and len(head) >= 26:
                width, height = struct.unpack("<ii", head[18:26])
                return abs(int(width)), abs(int(height))
            if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
                return _webp_size(head)
            if head.startswith(b"\xff\xd8"):
                file.seek(2)
                return _jpeg_size(file)
    except (OSError, struct.error):
        return None
    return None


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(head) >= 25:
        (bits,) = struct.unpack("<I", head[21:25])
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(head) >= 30:
        return (
            int.from_bytes(head[24:27], "little") + 1,
            int.from_bytes(head[27:30], "little") + 1,
        )
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(file: Any) -> tuple[int, int] | None:
    """Walk a JPEG's marker segments (from just after SOI) to its frame header."""
    while True:
        byte = file.read(1)
        if not byte:
            return None
        if byte != b"\xff":
            continue
        marker = file.read(1)
        while marker == b"\xff":  # fill bytes
            marker = file.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0x01 or 0xD0 <= code <= 0xD9:  # markers without a length
            if code == 0xD9:
                return None
            continue
        length_bytes = file.read(2)
        if len(length_bytes) < 2:
            return None
        (length,) = struct.unpack(">H", length_bytes)
        if code in _JPEG_SOF:
            data = file.read(5)
            if len(data) < 5:
                return None
            height, width = struct.unpack(">HH", data[1:5])
            return int(width), int(height)
        file.seek(length - 2, os.SEEK_CUR)
