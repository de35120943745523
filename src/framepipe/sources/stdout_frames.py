"""The frames a capture command writes to its stdout: concatenated JPEG pictures (MJPEG,
split by :class:`JpegSplitter`) or raw video of a known shape.

Guarantees:

* A JPEG picture is cut at its end of image after its scan data, never at a thumbnail's
  (markers are walked by their lengths up to the start of scan); bytes between pictures are
  skipped, and more than ``max_garbage_bytes`` of them in a row, or a picture over
  ``max_frame_bytes``, raise :class:`~framepipe.errors.FrameError` naming the stream offset.
* A picture is handed on with its header checked (:class:`~framepipe.frames.JpegPicture`),
  decoded only when a stage asks for pixels; one whose header does not decode raises
  :class:`~framepipe.errors.FrameError` naming its offset and size.
* A raw frame is converted to BGR (a writable array); a frame cut short by the end of stdout
  is dropped and logged at debug level, as is a JPEG picture cut short.
"""

from __future__ import annotations

import asyncio
from collections import deque
from logging import Logger, LoggerAdapter
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from framepipe.errors import FrameError
from framepipe.frames import JpegPicture

__all__ = ["BYTES_PER_PIXEL", "Image", "JpegSplitter", "MjpegReader", "RawReader"]

Image = npt.NDArray[np.uint8]
_Log = Logger | LoggerAdapter[Any]

BYTES_PER_PIXEL = {"bgr24": 3, "rgb24": 3, "gray": 1}
"""The raw pixel formats a capture may write, and their bytes per pixel."""

_SOI = b"\xff\xd8"
_EOI = b"\xff\xd9"
_SOS = 0xDA
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: markers without a length


class JpegSplitter:
    """Splits a byte stream of concatenated JPEG images, across reads.

    Markers are walked by their lengths up to the start of scan, so a thumbnail (an SOI/EOI
    pair inside an APP segment) does not cut a frame; the frame ends at the first EOI after the
    scan data. Bytes outside frames are skipped and counted as garbage.
    """

    def __init__(self, max_frame_bytes: int, max_garbage_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.max_garbage_bytes = max_garbage_bytes
        self.buf = bytearray()
        self.offset = 0  # stream offset of buf[0]
        self.garbage = 0  # bytes skipped since the last frame
        self.garbage_offset = 0  # stream offset of the first of them
        self.garbage_sample = b""
        self._pos: int | None = None  # marker walk position while buf starts with SOI
        self._scan: int | None = None  # where to look for EOI once in the scan data

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The complete JPEG frames (stream offset, bytes) that ``data`` completes."""
        self.buf += data
        frames: list[tuple[int, bytes]] = []
        while True:
            if self._pos is None and not self._find_soi():
                break
            end = self._find_end()
            if end is None:
                break
            if end < 0:  # not a JPEG after all: skip its SOI and look again
                self._skip(2)
                continue
            frames.append((self.offset, bytes(self.buf[:end])))
            del self.buf[:end]
            self.offset += end
            self.garbage = 0
            self._pos = self._scan = None
        if len(self.buf) > self.max_frame_bytes:
            raise FrameError(
                f"a JPEG frame at stdout offset {self.offset} is larger than "
                f"max_frame_bytes={self.max_frame_bytes} without its end marker"
            )
        if self.garbage > self.max_garbage_bytes:
            raise FrameError(
                f"stdout is not an MJPEG stream: {self.garbage} bytes from offset "
                f"{self.garbage_offset} hold no JPEG frame "
                f"(they start with {self.garbage_sample!r})"
            )
        return frames

    @property
    def pending(self) -> int:
        """Bytes held back (an incomplete frame)."""
        return len(self.buf)

    def _find_soi(self) -> bool:
        index = self.buf.find(_SOI)
        if index < 0:  # keep a last 0xFF: it may be the first half of a split SOI
            self._skip(len(self.buf) - 1 if self.buf.endswith(b"\xff") else len(self.buf))
            return False
        self._skip(index)
        self._pos = 2
        return True

    def _skip(self, count: int) -> None:
        if count <= 0:
            return
        if self.garbage == 0:
            self.garbage_offset = self.offset
            self.garbage_sample = bytes(self.buf[:24])
        self.garbage += count
        del self.buf[:count]
        self.offset += count
        self._pos = self._scan = None

    def _find_end(self) -> int | None:
        """End index of the frame at buf[0]; None: need more data; -1: not a JPEG."""
        buf = self.buf
        if self._scan is None:
            pos = self._pos or 2
            while True:
                while (
                    pos < len(buf)
                    and buf[pos] == 0xFF
                    and pos + 1 < len(buf)
                    and buf[pos + 1] == 0xFF
                ):
                    pos += 1  # fill bytes
                if pos + 2 > len(buf):
                    self._pos = pos
                    return None
                if buf[pos] != 0xFF:
                    return -1
                marker = buf[pos + 1]
                if marker in _STANDALONE:
                    pos += 2
                    continue
                if marker in (0x00, 0xD8, 0xD9):  # stuffing, SOI again, EOI before any scan
                    return -1
                if pos + 4 > len(buf):
                    self._pos = pos
                    return None
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                if length < 2:
                    return -1
                pos += 2 + length
                if marker == _SOS:
                    self._scan = pos
                    break
        index = buf.find(_EOI, self._scan)
        if index < 0:
            self._scan = max(self._scan, len(buf) - 1)
            return None
        return index + 2


class MjpegReader:
    """The JPEG pictures of a capture's stdout, one at a time."""

    def __init__(
        self,
        stdout: asyncio.StreamReader,
        source_id: str,
        log: _Log,
        *,
        max_frame_bytes: int,
        max_garbage_bytes: int,
    ) -> None:
        self.stdout = stdout
        self.source_id = source_id
        self.log = log
        self.splitter = JpegSplitter(max_frame_bytes, max_garbage_bytes)
        self.ready: deque[tuple[int, bytes]] = deque()

    async def read(self) -> JpegPicture | None:
        """The next JPEG picture (its header checked; decoded when a stage asks for pixels),
        or None at the end of stdout."""
        while not self.ready:
            chunk = await self.stdout.read(1 << 20)
            if not chunk:
                if self.splitter.pending:
                    self.log.debug(
                        "stdout ended inside a frame (%d bytes dropped)", self.splitter.pending
                    )
                return None
            try:
                self.ready.extend(self.splitter.feed(chunk))
            except FrameError as exc:
                raise FrameError(str(exc), source_id=self.source_id) from None
        offset, data = self.ready.popleft()
        try:
            return JpegPicture(data)
        except FrameError as exc:
            raise FrameError(
                f"the JPEG frame at stdout offset {offset} ({len(data)} bytes) "
                f"does not decode: {exc}",
                source_id=self.source_id,
            ) from exc


class RawReader:
    """The raw video frames (``pix_fmt``, ``shape``) of a capture's stdout, one at a time."""

    def __init__(
        self, stdout: asyncio.StreamReader, log: _Log, shape: tuple[int, int, int], pix_fmt: str
    ) -> None:
        self.stdout = stdout
        self.log = log
        self.pix_fmt = pix_fmt
        self.shape = shape
        self.frame_bytes = shape[0] * shape[1] * shape[2]

    async def read(self) -> Image | None:
        """The next frame converted to BGR, or None at the end of stdout."""
        try:
            data = await self.stdout.readexactly(self.frame_bytes)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.log.debug(
                    "stdout ended inside a frame (%d of %d bytes)",
                    len(exc.partial),
                    self.frame_bytes,
                )
            return None
        pixels = np.frombuffer(data, np.uint8).reshape(self.shape)
        if self.pix_fmt == "bgr24":
            return pixels.copy()  # writable, like every other frame's image
        code = cv2.COLOR_RGB2BGR if self.pix_fmt == "rgb24" else cv2.COLOR_GRAY2BGR
        return np.asarray(cv2.cvtColor(pixels, code), dtype=np.uint8)
