"""The media toolkit given hostile files: a watermark image is held to the picture-size limit
before it is decoded. Real FFmpeg (PyAV) and OpenCV."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from framepipe.errors import MediaError
from framepipe.media import probe, watermark
from media import make_clip

FAST = "ultrafast"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` and whose pixels are one zlib stream of
    zero rows cut short: what a decompression bomb's first bytes look like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    pixels = zlib.compress(b"\x00" * (1 + 4 * width) * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


def test_a_watermark_image_larger_than_the_limit_is_refused_before_it_is_decoded(
    tmp_path: Path,
) -> None:
    """The video was held to ``max_pixels``, its watermark image was not: OpenCV decoded any
    image it allows (up to 2**30 pixels, 4 GB as RGBA) and the watermark was written."""
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(64, 48))
    logo = tmp_path / "logo.png"
    cv2.imwrite(str(logo), np.full((200, 200, 4), 255, np.uint8))
    dst = tmp_path / "out" / "marked.mp4"
    with pytest.raises(MediaError, match=r"the watermark image is 200x200 \(40,000 pixels\)") as e:
        watermark(clip, dst, image=logo, max_pixels=100 * 100, preset=FAST)
    assert e.value.path == logo and not dst.exists()

    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(MediaError, match="the watermark image is 30000x30000") as e:
        watermark(clip, dst, image=bomb, preset=FAST)  # the default limit, 8192 x 8192
    assert e.value.path == bomb and not dst.exists()

    # within the limit, it is blended in
    watermark(clip, dst, image=logo, max_pixels=200 * 200, preset=FAST, margin=0)
    assert probe(dst).width == 64
