"""The one image-header parser (framepipe.image_header) that the media toolkit's picture
limit, the service's thumbnails and the known-face photos go by: the size OpenCV decodes, from
the header alone, and never an exception on data cut anywhere or garbled."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest

from framepipe.image_header import ImageHeader, read_header

IMAGE = np.random.default_rng(7).integers(0, 255, (37, 53, 3), dtype=np.uint8)


@pytest.mark.parametrize(
    ("ext", "params", "kind"),
    [
        (".jpg", [], "JPEG"),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], "JPEG"),
        (".png", [], "PNG"),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 80], "WebP"),
        (".webp", [cv2.IMWRITE_WEBP_QUALITY, 101], "WebP"),  # lossless
        (".bmp", [], "BMP"),
    ],
)
def test_each_format_gives_the_size_opencv_decodes(ext: str, params: list[int], kind: str) -> None:
    ok, encoded = cv2.imencode(ext, IMAGE, params)
    assert ok
    data = encoded.tobytes()
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert read_header(data) == ImageHeader(kind, (decoded.shape[1], decoded.shape[0]))
    assert read_header(memoryview(data)) == read_header(data)


def test_data_cut_anywhere_or_garbled_never_raises() -> None:
    """Every prefix of each format's first 2 KB, and random damage to the header: a header,
    None, or a size that the data says; never an exception, never an index past the end."""
    rng = random.Random(3)
    for ext in (".jpg", ".png", ".webp", ".bmp"):
        data = cv2.imencode(ext, IMAGE)[1].tobytes()
        whole = read_header(data)
        assert whole is not None and whole.size == (53, 37)
        for cut in range(min(len(data), 2048)):
            header = read_header(data[:cut])
            assert header is None or header.kind == whole.kind
        for _ in range(300):
            damaged = bytearray(data[:512])
            for _ in range(rng.randint(1, 8)):
                damaged[rng.randrange(2, len(damaged))] = rng.randrange(256)
            read_header(bytes(damaged))
    assert read_header(b"") is None and read_header(b"GIF89a....") is None
    assert read_header(b"\xff\xd8\xff") == ImageHeader("JPEG", None)


def test_a_jpeg_s_fill_bytes_and_a_zero_side_are_read_as_the_standard_says() -> None:
    data = cv2.imencode(".jpg", IMAGE)[1].tobytes()
    filled = data[:2] + b"\xff\xff\xff" + data[2:]  # fill bytes before the first marker
    assert read_header(filled) == ImageHeader("JPEG", (53, 37))
    sof = data.index(b"\xff\xc0")
    zero_height = data[: sof + 5] + b"\x00\x00" + data[sof + 7 :]
    assert read_header(zero_height) == ImageHeader("JPEG", None)
