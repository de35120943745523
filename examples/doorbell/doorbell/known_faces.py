"""The doorbell's known faces: ``<name>.jpg`` / ``.jpeg`` / ``.png`` images in a folder, one
person each, encoded by :func:`load_known`.

Whatever the folder holds, loading never crashes or stalls the doorbell; an image that cannot
be used is left out with the reason (``RejectedFace``), the others still work:

* a file name that is not valid UTF-8 or holds a control character is refused (the name is
  the person's, shown in events, logs and the web interface); no file is ever handed to OpenCV
  by name (OpenCV crashes the process on a name that is not UTF-8): each is read as bytes;
* a link (or a path) that leads out of the folder is refused;
* a file over ``max_bytes`` or an image over ``max_pixels`` (read from its header, before it
  is decoded) is refused; a larger-than-needed photo is scaled down to ``max_side`` pixels on
  its long side before detection (a JPEG decoded at a reduced scale), so a 200-megapixel photo
  costs about what a 4-megapixel one does;
* an unreadable image, no face, or several faces are refused as before.

:func:`shown_path` is how a path is shown (bytes that are not UTF-8 as ``\\xNN``).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import cv2
import numpy as np

from framepipe.errors import MediaError
from framepipe.processors.faces import (
    IMAGE_SUFFIXES,
    FaceAnalyzer,
    KnownFace,
    KnownFaces,
    RejectedFace,
)

__all__ = ["MAX_BYTES", "MAX_PIXELS", "MAX_SIDE", "encode_known", "load_known", "shown_path"]

MAX_BYTES = 50 * 1024 * 1024
"""Largest known-face file read."""
MAX_PIXELS = 120_000_000
"""Largest PNG decoded (a JPEG of any size is decoded at a reduced scale)."""
MAX_SIDE = 2000
"""Long side, in pixels, that a larger photo is scaled down to before detection."""


def shown_path(path: str | os.PathLike[str]) -> str:
    """``path`` as text that any log, JSON or terminal takes: bytes that are not UTF-8 as
    ``\\xNN``, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def load_known(
    folder: Path,
    analyzer: FaceAnalyzer,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> KnownFaces:
    """Encode every image of ``folder`` (in name order), see the module docstring. Raises
    :class:`MediaError` only when ``folder`` is not a directory."""
    if not folder.is_dir():
        raise MediaError(folder, "known faces directory does not exist")
    root = folder.resolve()
    known = KnownFaces([], [])
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        refused = _refused(path, root)
        if refused:
            known.rejected.append(RejectedFace(shown_path(path), refused))
            continue
        try:
            if not path.is_file():
                continue
            known.faces.append(
                encode_known(
                    path, analyzer, max_bytes=max_bytes, max_pixels=max_pixels, max_side=max_side
                )
            )
        except MediaError as exc:
            known.rejected.append(RejectedFace(shown_path(path), exc.reason))
        except OSError as exc:
            reason = f"cannot be read ({exc.strerror or type(exc).__name__})"
            known.rejected.append(RejectedFace(shown_path(path), reason))
    return known


def _refused(path: Path, root: Path) -> str | None:
    """Why ``path`` is not even read, or None."""
    if shown_path(path.name) != path.name:
        return (
            "the file name is not valid UTF-8 or holds a control character: rename it "
            "(the name is the person's)"
        )
    if not path.resolve().is_relative_to(root):
        return "it leads out of the known faces folder"
    return None


def encode_known(
    path: Path,
    analyzer: FaceAnalyzer,
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> KnownFace:
    """The one face of the image at ``path``, named after the file; the file is read as
    bytes, never opened by OpenCV by name. Raises :class:`MediaError` (naming the file as
    :func:`shown_path` shows it) when the file or image is too large, it is not a readable
    image, or it shows no face or several; :class:`OSError` when it cannot be read."""
    shown = shown_path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise MediaError(shown, f"{size} bytes: larger than the {max_bytes} a known face may be")
    image = _decode(path.read_bytes(), shown, max_pixels, max_side)
    faces = analyzer.analyse(image)
    if not faces:  # try harder once: a known face is worth the time
        faces = analyzer.analyse(image, upsample=analyzer.upsample + 1)
    if not faces:
        raise MediaError(shown, "no face found in the image")
    if len(faces) > 1:
        raise MediaError(
            shown,
            f"{len(faces)} faces in the image; a known-face image must show exactly one person",
        )
    return KnownFace(path.stem, faces[0].encoding, shown)


_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4))
_REDUCED += ((2, cv2.IMREAD_REDUCED_COLOR_2), (1, cv2.IMREAD_COLOR))


def _decode(data: bytes, shown: str, max_pixels: int, max_side: int) -> np.ndarray:
    """The image in ``data`` (BGR) with its long side at most ``max_side``."""
    size = image_size(data)
    if size is None:
        raise MediaError(shown, "not a readable image")
    width, height = size
    jpeg = data[:2] == b"\xff\xd8"
    if width * height > max_pixels and not jpeg:
        raise MediaError(
            shown, f"{width}x{height} pixels: larger than the {max_pixels} a known face may be"
        )
    flag = cv2.IMREAD_COLOR
    if jpeg:  # decoded at 1/2, 1/4 or 1/8 scale while it stays at least max_side long
        flag = next(
            f for scale, f in _REDUCED if max(width, height) // scale >= max_side or scale == 1
        )
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if bgr is None:
        raise MediaError(shown, "not a readable image")
    long_side = max(bgr.shape[:2])
    if long_side > max_side:
        factor = max_side / long_side
        bgr = cv2.resize(bgr, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr, dtype=np.uint8)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's or a JPEG's header, None when ``data`` is neither."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        # SOF0-SOF15 but DHT (C4), JPG (C8) and DAC (CC): the frame header with the size
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if at + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return int(width), int(height)
        at += 2 + length
    return None
