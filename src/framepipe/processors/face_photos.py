"""Known-face photos: which files of a folder may be read, and how one is read safely.

The rules every known-faces folder follows (:func:`~framepipe.processors.faces.load_known_faces`
and :meth:`~framepipe.processors.faces.FaceAnalyzer.encode_known` apply them):

* no file is ever handed to OpenCV by name (OpenCV crashes the process with a segmentation
  fault on a name that is not valid UTF-8): a photo is read as bytes and decoded in memory;
* a file name that is not valid UTF-8 or holds a control character is refused (the name is
  the person's, shown in events, logs and web pages), as is a link or path that leads out of
  the folder (:func:`refusal`);
* only a regular file is read (a FIFO or device named ``.jpg`` is refused, never waited on),
  at most ``max_bytes`` of it; only PNG and JPEG data is decoded, whatever the suffix says;
* an image whose decode would hold more than ``max_pixels`` (read from its header, before
  decoding) is refused; a JPEG is decoded at 1/2, 1/4 or 1/8 scale while it stays at least
  ``max_side`` long, so a 200-megapixel baseline photo costs about what a 4-megapixel one
  does, while a progressive JPEG counts whole (libjpeg keeps all its coefficients at any
  scale: :func:`~framepipe.image_header.decoded_pixels`); every photo is then scaled down to
  ``max_side`` pixels on its long side;
* every failure is a :class:`~framepipe.errors.MediaError` naming the file as
  :func:`shown_path` shows it (bytes that are not UTF-8 as ``\\xNN``), with the reason.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt

from framepipe.confined import open_for_reading
from framepipe.errors import MediaError
from framepipe.image_header import decoded_pixels, read_header

__all__ = [
    "MAX_BYTES",
    "MAX_PIXELS",
    "MAX_SIDE",
    "decode_photo",
    "image_size",
    "read_photo",
    "read_photo_bytes",
    "refusal",
    "shown_path",
]

MAX_BYTES = 50 * 1024 * 1024
"""Largest known-face file read."""
MAX_PIXELS = 120_000_000
"""Largest PNG decoded (a JPEG of any size is decoded at a reduced scale)."""
MAX_SIDE = 2000
"""Long side, in pixels, that a larger photo is scaled down to before detection."""

Image = npt.NDArray[np.uint8]


def shown_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """``path`` as text that any log, JSON or terminal takes: bytes that are not UTF-8 as
    ``\\xNN``, control characters escaped."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def refusal(path: Path, folder: Path) -> str | None:
    """Why the file ``path`` of ``folder`` must not be read as a known face, or None: its
    name is not valid UTF-8 or holds a control character, or it (a link, or a link on the way)
    leads out of ``folder``. Never raises, a link loop included."""
    if shown_path(path.name) != path.name:
        return (
            "the file name is not valid UTF-8 or holds a control character: rename it "
            "(the name is the person's)"
        )
    # os.path.realpath, not Path.resolve: it does not raise on a link loop
    root = os.path.realpath(os.fsencode(folder))
    target = os.path.realpath(os.fsencode(path))
    if os.path.commonpath([root, target]) != root:
        return "it leads out of the known faces folder"
    return None


def read_photo_bytes(path: str | os.PathLike[str], *, max_bytes: int = MAX_BYTES) -> bytes:
    """The content of the regular file at ``path``, at most ``max_bytes`` of it. Opened
    without blocking (a FIFO is refused, never waited on). Raises :class:`MediaError` naming
    the file when it is not a regular file, is larger than ``max_bytes`` or cannot be read."""
    shown = shown_path(path)
    try:
        fd = open_for_reading(path)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise MediaError(shown, "not a regular file") from None
        raise MediaError(shown, _unreadable(exc)) from exc
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if info.st_size > max_bytes:
            raise MediaError(
                shown, f"{info.st_size} bytes: larger than the {max_bytes} a known face may be"
            )
        try:
            data = file.read(max_bytes + 1)
        except OSError as exc:
            raise MediaError(shown, _unreadable(exc)) from exc
    if len(data) > max_bytes:  # it grew while read
        raise MediaError(shown, f"larger than the {max_bytes} bytes a known face may be")
    return data


def _unreadable(exc: OSError) -> str:
    return f"cannot be read ({exc.strerror or type(exc).__name__})"


_REDUCED = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
    (1, cv2.IMREAD_COLOR),
)


def decode_photo(
    data: bytes,
    shown: str,
    *,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> Image:
    """The BGR image in PNG or JPEG ``data``, its long side at most ``max_side``. Raises
    :class:`MediaError` naming ``shown`` when ``data`` is neither, cannot be decoded, or is a
    PNG (or a JPEG once reduced) over ``max_pixels``."""
    size = image_size(data)
    if size is None:
        raise MediaError(shown, "not a readable image")
    width, height = size
    jpeg = data[:2] == b"\xff\xd8"
    scale, flag = 1, cv2.IMREAD_COLOR
    if jpeg:  # decoded at 1/2, 1/4 or 1/8 scale while it stays at least max_side long
        scale, flag = next(
            (s, f) for s, f in _REDUCED if max(width, height) // s >= max_side or s == 1
        )
    if decoded_pixels("JPEG" if jpeg else "PNG", width, height, scale, data) > max_pixels:
        raise MediaError(
            shown, f"{width}x{height} pixels: larger than the {max_pixels} a known face may be"
        )
    bgr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flag)
    if bgr is None:
        raise MediaError(shown, "not a readable image")
    long_side = max(bgr.shape[:2])
    if long_side > max_side:
        factor = max_side / long_side
        bgr = cv2.resize(bgr, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(bgr, dtype=np.uint8)


def read_photo(
    path: str | os.PathLike[str],
    *,
    max_bytes: int = MAX_BYTES,
    max_pixels: int = MAX_PIXELS,
    max_side: int = MAX_SIDE,
) -> Image:
    """The photo at ``path`` as a BGR image: :func:`read_photo_bytes` then
    :func:`decode_photo`; :class:`MediaError` naming the file for what either refuses."""
    data = read_photo_bytes(path, max_bytes=max_bytes)
    return decode_photo(data, shown_path(path), max_pixels=max_pixels, max_side=max_side)


def image_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's or a JPEG's header
    (:func:`framepipe.image_header.read_header`), None when ``data`` is neither or its size
    cannot be read."""
    header = read_header(data)
    return header.size if header is not None and header.kind in ("PNG", "JPEG") else None
