"""Thumbnails of stored frames: a JPEG of the object store, downscaled on the server and kept.

Guarantees: a thumbnail is at most ``width`` pixels wide (an image narrower than that is
re-encoded, never enlarged) and keeps the image's aspect ratio; an image is decoded only after
its size was read from its header (:func:`image_size`: JPEG, PNG, WebP, BMP; any other data is
a :class:`NotAnImageError`, never given to a decoder) and only when its decode holds at most
:data:`MAX_PIXELS` pixels (else an :class:`ImageTooLargeError`): a small file declaring a huge
picture cannot make the service allocate more than that budget's decode. A JPEG wider than
twice the thumbnail is decoded reduced (1/2, 1/4, 1/8); for a single-scan sequential JPEG
(baseline or extended, all components in its first scan) the reduced size is what counts
against the budget, as libjpeg then decodes it a row of blocks at a time (a 10000x5000 camera
still is decoded at 1250x625); a progressive, multi-scan, lossless or hierarchical JPEG, or one
whose markers cannot be read, counts at its full size, as libjpeg keeps every DCT coefficient
of the full picture while decoding it whatever the reduction. Data of none of these formats is
a :class:`NotAnImageError`; data that begins as one of them but whose size cannot be read or
that cannot be decoded (a truncated upload, a file cut off while it was written, damaged bytes)
is a :class:`CorruptImageError` (a kind of :class:`NotAnImageError`); neither is ever a server
error; the cache holds at most ``max_bytes`` of thumbnails (least recently used dropped first),
keyed by the store, the key and the width, so a key of one store never answers for another's.

Thumbnails are made in worker threads, at most :class:`ThumbnailSlots` ``size`` at once (the
service's ``thumbnail_concurrency``): a burst of requests for large images holds at most that
many decodes (each up to the pixel budget: 120 MB at the default) and that many threads of the
service's pool. A request past the bound waits on the event loop (no thread, no image held)
for a slot at most ``wait`` seconds, then is a :class:`ThumbnailsBusyError`; a slot is given
back when its thread ends, whether the request is still there to answer or not.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import TypeVar

import cv2
import numpy as np

from framepipe.backends.objects import ObjectStore
from framepipe.errors import FramepipeError
from framepipe.image_header import FORMATS, decoded_pixels, read_header

__all__ = [
    "DEFAULT_CONCURRENCY",
    "MAX_PIXELS",
    "SLOT_WAIT",
    "CorruptImageError",
    "ImageTooLargeError",
    "NotAnImageError",
    "ObjectTooLargeError",
    "ThumbnailCache",
    "ThumbnailSlots",
    "ThumbnailsBusyError",
    "image_size",
]

MAX_PIXELS = 40_000_000
"""The default pixel budget (the ``thumbnail_max_pixels`` setting): the most pixels an image
may have to be decoded for a thumbnail (8K UHD has 33 million; decoded as BGR, 40 million take
120 MB)."""

DEFAULT_CONCURRENCY = 2
"""The default ``thumbnail_concurrency``: thumbnails made at once in a process. A fixed number
rather than the CPU count because the bound is on memory (each decode up to 120 MB at the
default budget): two hold at most 240 MB on any machine."""

SLOT_WAIT = 5.0
"""Seconds a thumbnail request waits for a slot before it is refused (503 with Retry-After).
Why 5: on a two-core machine (measured) a thumbnail at the default budget takes 1.3-1.9 s (a
noisy 40 MP progressive JPEG or PNG) and one of a typical stored frame about 20 ms (a noisy
1080p camera JPEG, decoded reduced), so two slots drain in 5 s a queue of several worst-case
images or the hundreds of frames of the dashboard's strips that come into view at once; and
5 s is far below the 30-60 s after which browsers and proxies give up, so a client whose turn
does not come is told so, not left hanging, while a waiting request costs a coroutine only."""

_T = TypeVar("_T")


class NotAnImageError(FramepipeError):
    """A stored object that was asked for as an image is not one (or not of a format whose
    size can be read before decoding it)."""


class CorruptImageError(NotAnImageError):
    """A stored object that begins as an image of a known format (``kind``: JPEG, PNG, WebP or
    BMP) but is truncated or corrupt: its size cannot be read, or it cannot be decoded."""

    def __init__(self, kind: str, what: str) -> None:
        self.kind = kind
        super().__init__(f"the {kind} image is truncated or corrupt: {what}")


class ImageTooLargeError(FramepipeError):
    """An image's decode would hold more pixels than the budget (``limit``; ``width`` x
    ``height`` from its header); it was not decoded."""

    def __init__(self, width: int, height: int, limit: int) -> None:
        self.width = width
        self.height = height
        self.limit = limit
        super().__init__(
            f"the image is {width}x{height} pixels, over the {limit} a thumbnail is made from"
        )


class ObjectTooLargeError(FramepipeError):
    """An object asked for as an image is larger (``size`` bytes) than any image within the
    pixel budget can be (``limit``, :func:`max_image_bytes`); it was not read."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"the object is {size} bytes, over the {limit} an image a thumbnail is made from can be"
        )


def max_image_bytes(max_pixels: int) -> int:
    """The most bytes an image of at most ``max_pixels`` pixels is read as: its pixels
    uncompressed as RGB (what no JPEG, PNG or WebP of them exceeds by much), plus 1 MiB of
    headers and metadata."""
    return max_pixels * 3 + (1 << 20)


class ThumbnailsBusyError(FramepipeError):
    """No thumbnail slot came free within ``wait`` seconds: ``slots`` thumbnails were being
    made all that time. Nothing was read or decoded; the request may be sent again."""

    def __init__(self, slots: int, wait: float) -> None:
        self.slots = slots
        self.wait = wait
        super().__init__(
            f"the service is busy making thumbnails ({slots} at once, the "
            f"thumbnail_concurrency setting) and none was free within {wait:g} s"
        )

    @property
    def retry_after(self) -> int:
        """Seconds after which a client may try again (for a ``Retry-After`` header)."""
        return max(1, math.ceil(self.wait))


# Decoding at 1/2, 1/4 or 1/8 of the size is much cheaper than decoding whole and shrinking.
_REDUCED = (
    (8, cv2.IMREAD_REDUCED_COLOR_8),
    (4, cv2.IMREAD_REDUCED_COLOR_4),
    (2, cv2.IMREAD_REDUCED_COLOR_2),
)


def image_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` of the image in ``data``, read from its header without
    decoding it (:func:`framepipe.image_header.read_header`); :class:`NotAnImageError` when
    ``data`` is not a JPEG, PNG, WebP or BMP (the formats thumbnails are made of),
    :class:`CorruptImageError` when it begins as one but its header cannot be read (cut off,
    or damaged)."""
    header = read_header(data)
    if header is None:
        raise NotAnImageError(f"the object is not a {FORMATS} image")
    if header.size is None:
        raise CorruptImageError(header.kind, "its size cannot be read from its header")
    return header.kind, header.size[0], header.size[1]


def downscale(data: bytes, width: int, quality: int = 80, *, max_pixels: int = MAX_PIXELS) -> bytes:
    """``data`` (an image) as a JPEG at most ``width`` pixels wide; an image whose decode
    would hold more than ``max_pixels`` pixels (by its header: the full picture, or the
    reduced one for a single-scan sequential JPEG decoded reduced) is refused undecoded;
    :class:`CorruptImageError` when its header reads but its data cannot be decoded."""
    kind, known, height = image_size(data)
    factor = 1
    flags = cv2.IMREAD_COLOR
    if kind == "JPEG":
        for reduction, reduced in _REDUCED:
            if known // reduction >= width:
                factor, flags = reduction, reduced
                break
    if decoded_pixels(kind, known, height, factor, data) > max_pixels:
        raise ImageTooLargeError(known, height, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None:  # its header was read: what follows is cut off or damaged
        raise CorruptImageError(kind, "it cannot be decoded")
    h, w = image.shape[:2]
    if w > width:
        image = cv2.resize(
            image, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA
        )
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:  # pragma: no cover - OpenCV encodes any decoded image
        raise NotAnImageError("the image could not be encoded as JPEG")
    return bytes(encoded)


class ThumbnailSlots:
    """At most ``size`` thumbnails made at once in worker threads; a request past them waits
    for a slot at most ``wait`` seconds (:data:`SLOT_WAIT`), else
    :class:`ThumbnailsBusyError`. Used from one event loop (the service's)."""

    def __init__(self, size: int, wait: float = SLOT_WAIT) -> None:
        if size < 1:
            raise ValueError(f"thumbnail slots must be at least 1, not {size}")
        if wait < 0:
            raise ValueError(f"the wait for a thumbnail slot cannot be negative ({wait})")
        self.size = size
        self.wait = wait
        self._free = asyncio.Semaphore(size)
        self._busy = 0

    @property
    def busy(self) -> int:
        """Slots held now (threads making a thumbnail)."""
        return self._busy

    def _give_back(self, done: asyncio.Future[_T]) -> None:
        self._busy -= 1
        self._free.release()
        if not done.cancelled():
            done.exception()  # retrieved: a request that went away leaves no "never retrieved"

    async def run(self, work: Callable[[], _T]) -> _T:
        """``work()`` in a worker thread once a slot is free (:class:`ThumbnailsBusyError`
        when none is within ``wait`` seconds). The slot is held until the thread ends: a
        request cancelled meanwhile (its client went away) stops waiting for the result, not
        the thread, which keeps its slot to the end and then gives it back."""
        try:
            async with asyncio.timeout(self.wait):
                await self._free.acquire()
        except TimeoutError:
            raise ThumbnailsBusyError(self.size, self.wait) from None
        try:
            context = contextvars.copy_context()
            thread = asyncio.get_running_loop().run_in_executor(None, context.run, work)
        except BaseException:
            self._free.release()
            raise
        self._busy += 1
        thread.add_done_callback(self._give_back)
        return await asyncio.shield(thread)


class ThumbnailCache:
    """Downscaled JPEGs by (store, key, width), at most ``max_bytes`` in all (thread-safe),
    and the service's :class:`ThumbnailSlots` (:meth:`slots`)."""

    def __init__(self, max_bytes: int = 32 * 1024 * 1024, *, slot_wait: float = SLOT_WAIT) -> None:
        self.max_bytes = max_bytes
        self.slot_wait = slot_wait
        """The ``wait`` of the slots :meth:`slots` makes."""
        self._items: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self._slots: ThumbnailSlots | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self.hits = 0
        self.misses = 0

    def slots(self, size: int) -> ThumbnailSlots:
        """The bound on the thumbnails made at once for this cache: made at the first call
        in each event loop (an app served again in a new loop gets new slots), with ``size``
        slots (the service's ``thumbnail_concurrency``, fixed while it runs) and
        :attr:`slot_wait`; a later call with another ``size`` is a :class:`ValueError`."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            self._slots = ThumbnailSlots(size, self.slot_wait)
            self._slots_loop = loop
        elif self._slots.size != size:
            raise ValueError(
                f"the thumbnail slots were made with {self._slots.size}, not {size}: the "
                "concurrency of a service's thumbnails is fixed while it runs"
            )
        return self._slots

    @property
    def busy(self) -> int:
        """Thumbnails being made now (the slots held; 0 before any was made)."""
        return 0 if self._slots is None else self._slots.busy

    def kept(self, store: ObjectStore, key: str, width: int) -> bytes | None:
        """The thumbnail of ``key`` in ``store`` when it is kept, else None (nothing read: a
        lookup cheap enough for the event loop, made before waiting for a slot)."""
        cache_key = (store.url, key, width)
        with self._lock:
            data = self._items.get(cache_key)
            if data is not None:
                self._items.move_to_end(cache_key)
                self.hits += 1
            return data

    def kept_in(self, stores: list[ObjectStore], key: str, width: int) -> bytes | None:
        """The thumbnail of ``key`` kept for the first of ``stores`` it is kept for, else None
        (nothing read; a route reading ``key`` from several stores asks this before waiting
        for a slot)."""
        for store in stores:
            data = self.kept(store, key, width)
            if data is not None:
                return data
        return None

    def get(
        self, store: ObjectStore, key: str, width: int, *, max_pixels: int = MAX_PIXELS
    ) -> bytes:
        """The thumbnail of ``key`` in ``store`` (read and made on a miss, refused when its
        decode would hold more than ``max_pixels`` pixels, and unread when the object is larger
        than such an image can be; raises what ``store.get`` raises, :class:`NotAnImageError`,
        :class:`ImageTooLargeError` or :class:`ObjectTooLargeError`)."""
        data = self.kept(store, key, width)
        if data is not None:
            return data
        cache_key = (store.url, key, width)
        size, limit = store.stat(key).size, max_image_bytes(max_pixels)
        if size > limit:  # read whole, it would be held in memory for nothing
            raise ObjectTooLargeError(size, limit)
        data = downscale(store.get(key), width, max_pixels=max_pixels)
        with self._lock:
            self.misses += 1
            if cache_key not in self._items and len(data) <= self.max_bytes:
                self._items[cache_key] = data
                self._size += len(data)
                while self._size > self.max_bytes:
                    _, dropped = self._items.popitem(last=False)
                    self._size -= len(dropped)
        return data
