"""What an image's header says, read without decoding a pixel: :func:`read_header`.

Every place that must know an image's size before it lets a decoder near it goes by this one
parser: the media toolkit's picture limit (:func:`framepipe.media.limits.image_size`), the
service's thumbnails and the known-face photos.

Guarantees:

* JPEG (any frame type: baseline, extended, progressive, lossless, arithmetic), PNG, WebP
  (lossy, lossless, extended) and BMP (OS/2 and Windows headers) are recognised by their
  signatures; anything else is None.
* A header is read within ``data`` only (``bytes`` or a ``memoryview``): no index goes past
  its end, so a truncated or hostile header gives ``size=None``, never an exception, and a
  JPEG's marker walk ends at its end.
* A JPEG's size is the one its decoder finds: bytes between two segments are skipped as
  libjpeg skips them ("extraneous bytes before marker"), so a stray byte cannot hide the frame
  header from a limit that the decoder would then not see.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FORMATS", "ImageHeader", "decoded_pixels", "jpeg_single_scan", "read_header"]

FORMATS = "JPEG, PNG, WebP or BMP"
"""The formats :func:`read_header` knows, as messages name them."""

_JPEG = b"\xff\xd8\xff"
_PNG = b"\x89PNG\r\n\x1a\n"


class Buffer(Protocol):
    """What the parser reads: slices of bytes and a length (bytes, memoryview)."""

    def __getitem__(self, index: slice, /) -> bytes: ...
    def __len__(self) -> int: ...


@dataclass(frozen=True)
class ImageHeader:
    """An image's format (``JPEG``, ``PNG``, ``WebP``, ``BMP``) and its ``(width, height)``;
    ``size`` is None when the data begins as that format but its size cannot be read (cut
    off, or damaged), or says a side of 0."""

    kind: str
    size: tuple[int, int] | None


def read_header(data: Buffer) -> ImageHeader | None:
    """The header of the image ``data`` begins with, or None when it is none of
    :data:`FORMATS`."""
    head = bytes(data[:32])
    if head.startswith(_JPEG):
        return _checked("JPEG", _jpeg_size(data))
    if head.startswith(_PNG):
        ihdr = len(head) >= 24 and head[12:16] == b"IHDR"
        return _checked("PNG", struct.unpack(">II", head[16:24]) if ihdr else None)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _checked("WebP", _webp_size(head))
    if head.startswith(b"BM"):
        return _checked("BMP", _bmp_size(head))
    return None


def _checked(kind: str, size: tuple[int, int] | None) -> ImageHeader:
    if size is None or size[0] <= 0 or size[1] <= 0:
        return ImageHeader(kind, None)
    return ImageHeader(kind, (int(size[0]), int(size[1])))


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:  # extended: the canvas, 24 bits each, minus one
        return 1 + int.from_bytes(head[24:27], "little"), 1 + int.from_bytes(head[27:30], "little")
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:  # lossless: 14 bits each
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":  # lossy
        width, height = struct.unpack("<HH", head[26:30])
        return width & 0x3FFF, height & 0x3FFF
    return None


def _bmp_size(head: bytes) -> tuple[int, int] | None:
    header = int.from_bytes(head[14:18], "little")
    if header == 12 and len(head) >= 22:  # OS/2 BITMAPCOREHEADER: unsigned 16 bits
        width, height = struct.unpack("<HH", head[18:22])
        return width, height
    if header >= 40 and len(head) >= 26:  # BITMAPINFOHEADER and later: signed 32 bits
        width, height = struct.unpack("<ii", head[18:26])
        return abs(width), abs(height)  # a negative height is a top-down bitmap
    return None


def _jpeg_size(data: Buffer) -> tuple[int, int] | None:
    """Walk a JPEG's marker segments from just after SOI to its frame header (SOFn)."""
    end = len(data)
    at = 2
    while at + 4 <= end:
        if data[at : at + 1] != b"\xff":  # stray bytes between segments: decoders skip them
            at += 1
            continue
        marker = data[at + 1 : at + 2][0]
        if marker == 0xFF:  # a fill byte before the marker (T.81 B.1.1.2)
            at += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            at += 2
            continue
        if marker in (0xD8, 0xD9):  # another SOI, or EOI before any frame
            return None
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if length < 2:
            return None
        # SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC): the frame header with the size
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > end:
                return None
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        at += 2 + length
    return None


def jpeg_single_scan(data: bytes) -> bool:
    """Whether the JPEG in ``data`` is sequential (SOF0, SOF1 or SOF9) with every component
    of its frame in its first scan: the only kind libjpeg decodes reduced without a buffer of
    the full picture's coefficients. ``False`` for anything else or markers it cannot read."""
    frame_components = 0
    pos = 2
    end = len(data)
    while pos < end:
        if data[pos] != 0xFF:
            return False
        while pos < end and data[pos] == 0xFF:  # fill bytes before a marker (T.81 B.1.1.2)
            pos += 1
        if pos >= end:
            return False
        marker = data[pos]
        pos += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            continue
        if pos + 2 > end or marker in (0x00, 0xD8, 0xD9):
            return False
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > end:
            return False
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn
            if frame_components or marker not in (0xC0, 0xC1, 0xC9) or length < 8:
                return False
            frame_components = data[pos + 7]
        elif marker == 0xDA:  # SOS: the first scan
            return length >= 3 and 0 < frame_components == data[pos + 2]
        pos += length
    return False


def decoded_pixels(kind: str, width: int, height: int, factor: int, data: bytes) -> int:
    """The pixels a decode of the image (``kind``, ``width`` x ``height``, bytes ``data``)
    at ``1/factor`` holds: the reduced picture's (libjpeg rounds up) only for a single-scan
    sequential JPEG (:func:`jpeg_single_scan`); any other image, a progressive JPEG
    included, holds its whole picture (libjpeg keeps every coefficient whatever the scale)."""
    if kind == "JPEG" and factor > 1 and jpeg_single_scan(data):
        return -(-width // factor) * -(-height // factor)
    return width * height
