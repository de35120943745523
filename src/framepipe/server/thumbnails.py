"""Thumbnails of stored frames: a JPEG of the object store, downscaled on the server and kept.

Guarantees: a thumbnail is at most ``width`` pixels wide (an image narrower than that is
re-encoded, never enlarged) and keeps the image's aspect ratio; what is not an image
(``cv2.imdecode`` cannot read it) is a :class:`NotAnImageError`, never a server error; the
cache holds at most ``max_bytes`` of thumbnails (least recently used dropped first), keyed by
the store, the key and the width, so a key of one store never answers for another's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import cv2
import numpy as np

from framepipe.backends.objects import ObjectStore
from framepipe.errors import FrameError, FramepipeError
from framepipe.pixels import jpeg_size

__all__ = ["NotAnImageError", "ThumbnailCache"]


class NotAnImageError(FramepipeError):
    """A stored object that was asked for as an image is not one."""


# Decoding at 1/2, 1/4 or 1/8 of the size is much cheaper than decoding whole and shrinking.
_REDUCED = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


def _image_width(data: bytes) -> int | None:
    """The width of a JPEG from its header, without decoding (None: not a JPEG we can read)."""
    try:
        return jpeg_size(data)[0]
    except FrameError:
        return None


def downscale(data: bytes, width: int, quality: int = 80) -> bytes:
    """``data`` (an image) as a JPEG at most ``width`` pixels wide."""
    flags = cv2.IMREAD_COLOR
    known = _image_width(data)
    if known is not None:
        for factor, reduced in _REDUCED:
            if known // factor >= width:
                flags = reduced
                break
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:
        raise NotAnImageError("the object is not an image that can be decoded")
    h, w = image.shape[:2]
    if w > width:
        image = cv2.resize(
            image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA
        )
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any decoded image
        raise NotAnImageError("the image could not be encoded as JPEG")
    return bytes(encoded)


class ThumbnailCache:
    """Downscaled JPEGs by (store, key, width), at most ``max_bytes`` in all (thread-safe)."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, store: ObjectStore, key: str, width: int) -> bytes:
        """The thumbnail of ``key`` in ``store`` (read and made on a miss; raises what
        ``store.get`` raises, or :class:`NotAnImageError`)."""
        cache_key = (store.url, key, width)
        with self._lock:
            data = self._items.get(cache_key)
            if data is not None:
                self._items.move_to_end(cache_key)
                self.hits += 1
                return data
        data = downscale(store.get(key), width)
        with self._lock:
            self.misses += 1
            if cache_key not in self._items and len(data) <= self.max_bytes:
                self._items[cache_key] = data
                self._size += len(data)
                while self._size > self.max_bytes:
                    _, dropped = self._items.popitem(last=False)
                    self._size -= len(dropped)
        return data
