"""``VideoSource``: files, RTSP, TCP/HTTP streams and devices decoded with PyAV.

Guarantees of one :meth:`VideoSource.frames` session:

* Decoding runs in a dedicated thread, never on the event loop. Frames reach the consumer
  through a bounded hand-off (``max_queue`` frames); a slow consumer holds the decoder back
  instead of growing memory.
* ``started(None)`` is called (on the event loop) once the container is open and has a
  video stream, before the first frame.
* Any failure in the thread (cannot open, no video stream, corrupt or truncated data, a network
  read that times out) reaches the consumer as :class:`~framepipe.errors.SourceError` naming
  the source and the URL, with PyAV's exception as ``__cause__``; its message shows every URL
  with its secrets masked (:func:`~framepipe.urls.safe_text`), PyAV's words included. The
  thread never dies silently and the consumer never waits forever for a dead thread.
* A local file that cannot be opened (missing, unreadable, empty, not a video or corrupt
  beyond its header), that has no video stream, or that is looped and has no frame fails
  with :class:`~framepipe.errors.InvalidSourceError` (``permanent``: a supervisor does
  not restart it, every session would fail alike). A URL, a device or a local path taken as
  a stream (``live=True``) fails with a plain ``SourceError``, restarted until it is back.
* The end of a file (without ``loop``) or of a stream the server closed is a normal end: the
  iterator returns. A file that ends clearly before the length its header announces (the rule
  of the media toolkit, :meth:`~framepipe.video_length.DecodedLength.shortfall`: its frames
  that play, frames an edit list hides, as a ``ffmpeg -ss ... -c copy`` trim leaves, not
  counted; else its duration) is reported as truncated (``SourceError``), after the frames
  it had.
* Closing the iterator (``aclose``, ``break`` in ``async for``, cancelling the consumer) stops
  the thread and joins it. The thread checks its stop flag between packets (of every stream:
  a stream whose video stopped while its audio flows is stopped too) and while it paces or
  waits for room, so it stops at once. A stop also interrupts PyAV's blocking open or read
  (a camera that accepts the connection and never answers), within FFmpeg's next check of
  its interrupt callback, about 0.1 s (:mod:`framepipe.sources.interrupt`; with a PyAV that
  allows no interruption, the call returns by ``open_timeout``/``read_timeout``). ``aclose``
  waits for the thread without blocking the event loop, at most the longer of those
  timeouts and a second.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import av
import av.error
import numpy as np

from framepipe.errors import FrameError, SourceError
from framepipe.frames import Frame, now_ms
from framepipe.logs import get_logger
from framepipe.pixels import Image, JpegPicture, YuvPlanes
from framepipe.sources.base import (
    InvalidSourceError,
    Source,
    StartedCallback,
    check_decode_threads,
    decoder_threads,
)
from framepipe.sources.devices import is_device
from framepipe.sources.handoff import Channel, Decoded, Pacer, Stopped
from framepipe.sources.interrupt import watching
from framepipe.urls import safe_text, safe_url
from framepipe.video_length import DecodedLength, plays

__all__ = ["VideoSource"]


_NETWORK_SCHEMES = frozenset(
    {"rtsp", "rtsps", "rtmp", "rtmps", "tcp", "udp", "http", "https", "srt", "rtp", "hls"}
)
_MAX_BAD_PACKETS = 25  # consecutive undecodable packets tolerated on a live stream


def _default_source_id(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme in ("", "file") or len(parts.scheme) == 1:  # a path (or a Windows drive)
        name = Path(parts.path if parts.scheme == "file" else url).stem
    else:
        host = parts.hostname or parts.scheme
        name = host + (f"_{parts.port}" if parts.port else "")
        path = parts.path.strip("/")
        if path:
            name += "_" + path.replace("/", "_")
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "video"


class VideoSource(Source):
    """Frames of a video file, network stream (RTSP, TCP, HTTP ...) or device, decoded by PyAV.

    ``url`` is a path or a URL PyAV/FFmpeg can open. ``source_id`` defaults to a name derived
    from it (the file's stem, or host, port and path). ``realtime=True`` paces frames at their
    native rate by pts (for files; a live stream is paced by its sender). ``loop=True`` restarts
    a file from the beginning at its end, pts continuing to increase. ``options`` are FFmpeg
    options (RTSP defaults to ``rtsp_transport=tcp``); ``container_format`` forces a demuxer
    (``v4l2`` is chosen for a camera's device node). ``open_timeout``/``read_timeout`` bound network
    I/O. ``max_queue`` bounds the frames decoded ahead of the consumer.

    Frames are lazy (see :mod:`framepipe.frames`). With ``bgr_via_opencv`` (default), a
    yuv420p/yuvj420p frame of even size keeps its planes: ``frame.gray`` is the luma plane,
    ``frame.to_jpeg()`` encodes the planes, and ``frame.image`` converts with
    ``cv2.cvtColor(..., COLOR_YUV2BGR_I420)`` on first access (BT.601 matrix, like FFmpeg's
    default; full-range yuvj420p first mapped to limited range), which is faster than PyAV 18's
    ``to_ndarray(format="bgr24")``; other frames are converted by PyAV as they are decoded.

    ``live`` is False for a file played once (its end ends a pipeline) and True otherwise
    (a device, a network URL, a looped file); ``fps`` is the stream's nominal rate, known once
    a session has opened it. The ``live`` argument overrides how the URL is taken: a video
    file served over HTTP (a web server, a presigned S3 URL) is a network URL that ends, so
    ``live=False`` plays it once like a local file (not paced, read as fast as it decodes, its
    end ends the pipeline instead of restarting it, a short read reported as truncation);
    ``live=True`` takes a local path as a stream (a FIFO fed by another program).

    A stream of JPEG pictures (MJPEG: a USB camera asked for it with
    ``options={"input_format": "mjpeg"}``, many IP cameras' ``/mjpeg`` URLs, MJPEG files) is
    not decoded while ``keep_jpeg`` and ``bgr_via_opencv`` (the defaults): each packet
    becomes a frame holding the camera's JPEG bytes, so a frame that is only stored is
    never decoded and re-encoded, and ``frame.gray`` is a grey-only (or, with ``small_gray``,
    a DCT-scaled) decode. A packet that is not a whole JPEG with its own Huffman tables (some
    AVI MJPEG leaves them out) switches the session to decoding. The packets a decoder would
    not show are skipped (:func:`~framepipe.video_length.plays`: those an MOV's edit list
    hides, as a trim with ``ffmpeg -ss ... -c copy`` leaves them), so the frames and their
    timestamps are the decoder's.

    ``decode_threads`` is the decoder's thread count (:func:`~framepipe.sources.base.
    decoder_threads`): None decodes a paced input (a camera, a stream, ``realtime``) in the
    capture thread alone, with no frame held back and the least CPU per frame, and lets FFmpeg
    choose (frame and slice threads) for a file read as fast as it decodes; 0 always lets
    FFmpeg choose; a count is used as it is. A pipeline whose stages keep the other cores busy
    decodes a file faster with 1.

    A frame whose size differs from the previous frame's carries ``meta["size_changed"] = True``
    (the first change of a session is logged as a warning, later ones at debug level).
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        source_id: str | None = None,
        *,
        realtime: bool = False,
        loop: bool = False,
        options: Mapping[str, str] | None = None,
        open_timeout: float = 10.0,
        read_timeout: float = 10.0,
        max_queue: int = 8,
        bgr_via_opencv: bool = True,
        container_format: str | None = None,
        keep_jpeg: bool = True,
        decode_threads: int | None = None,
        live: bool | None = None,
    ) -> None:
        url = os.fspath(url)
        super().__init__(source_id or _default_source_id(url))
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, not {max_queue}")
        check_decode_threads(decode_threads, f"source {self.source_id}")
        self.url = url
        self.realtime = realtime
        self.loop = loop
        self.open_timeout = float(open_timeout)
        self.read_timeout = float(read_timeout)
        self.max_queue = max_queue
        self.bgr_via_opencv = bgr_via_opencv
        self.keep_jpeg = keep_jpeg
        self.decode_threads = decode_threads
        scheme = urlsplit(url).scheme.lower()
        self.is_network = scheme in _NETWORK_SCHEMES
        device = is_device(url)
        is_file = (scheme in ("", "file") or len(scheme) == 1) and not device
        if live is not None:
            is_file = not live
        self.live = loop or not is_file  # a file played once is finite
        self._is_file = is_file
        self.options: dict[str, str] = {}
        if scheme in ("rtsp", "rtsps"):
            self.options["rtsp_transport"] = "tcp"
        self.options.update(options or {})
        if container_format is None and device:
            container_format = "v4l2"
        self.container_format = container_format
        self._log = get_logger(self.source_id)

    @property
    def paced(self) -> bool:
        """A device or stream makes frames at its own pace; a file only with ``realtime``."""
        return self.realtime or not self._is_file

    def describe(self) -> str:
        """The URL (password hidden) and the pacing flags."""
        flags = [name for name, on in (("realtime", self.realtime), ("loop", self.loop)) if on]
        return safe_url(self.url) + (f" ({', '.join(flags)})" if flags else "")

    # -- the consumer side (event loop) -----------------------------------------------------

    async def frames(self, started: StartedCallback | None = None) -> AsyncGenerator[Frame, None]:
        """One capture session; see the module docstring for its guarantees."""
        channel = Channel(asyncio.get_running_loop(), self.max_queue)
        thread = threading.Thread(
            target=self._run,
            args=(channel,),
            daemon=True,
            name=f"framepipe-decode-{self.source_id}",
        )
        thread.start()
        ended = False
        try:
            while True:
                kind, payload = await channel.get()
                if kind == "frame":
                    item: Decoded = payload
                    picture = item.picture
                    yield Frame(
                        image=picture if isinstance(picture, np.ndarray) else None,
                        picture=None if isinstance(picture, np.ndarray) else picture,
                        source_id=self.source_id,
                        seq=self.next_seq(),
                        ts_ms=item.ts_ms,
                        pts=item.pts,
                        meta=item.meta,
                    )
                elif kind == "opened":
                    if started is not None:
                        started(None)
                elif kind == "error":
                    ended = True  # the thread posts "end" right after; join below is short
                    raise payload
                else:
                    ended = True
                    return
        finally:
            channel.stop()
            if ended or await self._await_end(channel):
                thread.join()  # "end" is the thread's last act: this returns at once
            else:
                self._log.warning(
                    "decode thread of %s is still blocked in I/O; it exits when that call returns",
                    self.describe(),
                )

    async def _await_end(self, channel: Channel) -> bool:
        """Wait (without blocking the loop) until the stopped thread posts its end."""

        async def drain() -> None:
            while (await channel.get())[0] != "end":
                pass

        limit = max(self.open_timeout, self.read_timeout) + 1.0
        try:
            await asyncio.wait_for(drain(), timeout=limit)
        except TimeoutError:
            return False
        return True

    # -- the decode thread ------------------------------------------------------------------

    def _run(self, channel: Channel) -> None:
        try:
            with watching(channel.stopped):  # a stop interrupts PyAV's blocking open and reads
                self._decode(channel)
        except Stopped:
            pass
        except Exception as exc:
            if not channel.stopped.is_set():  # else: the stop's own interruption
                channel.post("error", self._error_of(exc))
        finally:
            channel.post("end")

    def _error_of(self, exc: Exception) -> SourceError:
        if isinstance(exc, SourceError):
            return exc
        if isinstance(exc, av.error.ExitError):  # PyAV's timeout interrupted a blocking read
            return self._fail(f"no data within {self.read_timeout:g}s", exc)
        return self._fail("error while reading", exc)

    @property
    def _local_file(self) -> bool:
        """A file of this machine (not a device, a FIFO taken as a stream, or a URL)."""
        return self._is_file and not self.is_network

    def _fail(
        self, message: str, exc: BaseException | None = None, *, invalid: bool = False
    ) -> SourceError:
        """The error naming the URL and ``message`` (and ``exc``'s words); with ``invalid``,
        for a local file, the :class:`InvalidSourceError` that no restart can mend."""
        text = f"{safe_url(self.url)}: {message}"
        if exc is not None:  # PyAV repeats the URL as given, password and all
            text += f": {safe_text(str(exc).replace(self.url, safe_url(self.url)))}"
        kind = InvalidSourceError if invalid and self._local_file else SourceError
        error = kind(text, source_id=self.source_id)
        error.__cause__ = exc
        return error

    def _open(self) -> Any:
        if not self.is_network and os.path.isfile(self.url) and os.path.getsize(self.url) == 0:
            raise self._fail("cannot open, the file is empty (0 bytes)", invalid=True)
        try:
            return av.open(
                self.url,
                options=self.options,
                format=self.container_format,
                timeout=(self.open_timeout, self.read_timeout),
            )
        except av.error.InvalidDataError as exc:
            raise self._fail(
                "cannot open, not a readable video (unknown format, corrupt or truncated)",
                exc,
                invalid=True,
            ) from exc
        except av.error.ExitError as exc:
            raise self._fail(f"cannot open, no answer within {self.open_timeout:g}s", exc) from exc
        except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
            raise self._fail("cannot open", exc, invalid=True) from exc
        except Exception as exc:
            raise self._fail("cannot open", exc) from exc

    def _decode(self, channel: Channel) -> None:
        pts_offset = 0.0
        next_pts = 0.0  # where the next pass starts when looping
        pacer = Pacer(channel.stopped) if self.realtime else None
        last_size: tuple[int, int] | None = None
        size_changes = 0
        passes = 0
        while True:
            container = self._open()
            try:
                if not container.streams.video:
                    kinds = ", ".join(s.type for s in container.streams) or "none"
                    raise self._fail(f"no video stream (streams: {kinds})", invalid=True)
                stream = container.streams.video[0]
                self._set_threads(stream)
                jpeg = _JpegPackets(stream) if self.keep_jpeg and self.bgr_via_opencv else None
                if passes == 0:
                    channel.post("opened")
                rate = stream.average_rate or stream.guessed_rate
                frame_time = 1.0 / float(rate) if rate else 0.04
                if rate:
                    self.fps = float(rate)
                if pacer is not None:  # a gap of 10 frames and at least 1 s: a discontinuity
                    pacer.max_gap = max(1.0, 10 * frame_time)
                count, bad = 0, [0]
                decoded = DecodedLength(stream, container)
                first_time: float | None = None
                last_pts = next_pts
                for packet in _packets_of(container, stream, channel.stopped):
                    for frame in self._frames_of(packet, jpeg, bad, count, passes):
                        time_s = frame.time
                        if time_s is None:
                            time_s = (first_time or 0.0) + count * frame_time
                        if first_time is None:
                            first_time = time_s
                            pts_offset = next_pts - time_s if passes else 0.0
                        pts = time_s + pts_offset
                        meta: dict[str, Any] = {}
                        size = (frame.width, frame.height)
                        if last_size is not None and size != last_size:
                            meta["size_changed"] = True
                            size_changes += 1
                            log = self._log.warning if size_changes == 1 else self._log.debug
                            log(
                                "frame size changed from %dx%d to %dx%d at frame %d of %s",
                                *last_size,
                                *size,
                                count + 1,
                                self.describe(),
                            )
                        last_size = size
                        picture = self._picture(frame)
                        decoded.add(frame)
                        count += 1
                        last_pts = pts
                        if pacer is not None:
                            pacer.wait_until(pts)
                        # a paced file's frame is "captured" when its time comes, not when
                        # the decoder, running ahead, produced it
                        ts = now_ms()
                        if not channel.put_frame(Decoded(picture, pts, ts, meta)):
                            raise Stopped
                self._check_complete(decoded)
            finally:
                container.close()
            if not self.loop:
                return
            if count == 0:
                raise self._fail("cannot loop: the file has no frames", invalid=True)
            passes += 1
            next_pts = last_pts + frame_time

    def _set_threads(self, stream: Any) -> None:
        threads = decoder_threads(self.decode_threads, paced=self.paced)
        stream.thread_type = "NONE" if threads == 1 else "AUTO"
        stream.codec_context.thread_count = threads

    def _frames_of(
        self, packet: Any, jpeg: _JpegPackets | None, bad: list[int], count: int, passes: int
    ) -> list[Any]:
        """The frames of ``packet``: taken as JPEG while ``jpeg`` can, else decoded."""
        taken = jpeg.take(packet) if jpeg is not None else None
        return self._decode_packet(packet, bad, count, passes) if taken is None else taken

    def _decode_packet(self, packet: Any, bad: list[int], count: int, passes: int) -> list[Any]:
        """The frames of ``packet``. An undecodable packet of a network stream is skipped
        (``bad[0]`` counts them in a row) until more than a few come in a row; in a file it
        fails the source, naming how far it got."""
        try:
            decoded: list[Any] = packet.decode()
        except av.error.InvalidDataError as exc:
            bad[0] += 1
            if not self.is_network or bad[0] > _MAX_BAD_PACKETS:
                raise self._fail(
                    f"corrupt or truncated data after {count} frames of pass {passes + 1}", exc
                ) from exc
            if bad[0] == 1:
                self._log.warning("skipping undecodable packet: %s", exc)
            return []
        bad[0] = 0
        return decoded

    def _check_complete(self, decoded: DecodedLength) -> None:
        """Fail a file that ended clearly before the length its header announces (a device or
        a stream is not judged)."""
        problem = decoded.shortfall() if self._is_file else None
        if problem is not None:
            raise self._fail(problem)

    def _picture(self, frame: Any) -> Image | YuvPlanes | JpegPicture:
        """The frame's planes, kept for a lazy conversion (even-sized 4:2:0, the usual case,
        with ``bgr_via_opencv``), a packet's JPEG kept as it is, or the BGR image converted by
        PyAV."""
        if isinstance(frame, _JpegFrame):
            return frame.picture
        planes = YuvPlanes.from_av(frame) if self.bgr_via_opencv else None
        if planes is not None:
            return planes
        return np.asarray(frame.to_ndarray(format="bgr24"), dtype=np.uint8)


def _packets_of(container: Any, stream: Any, stopped: threading.Event) -> Iterator[Any]:
    """The packets of ``stream``; :class:`Stopped` once ``stopped`` is set, which is checked at
    the packets of every stream: a camera whose video hung while its audio goes on is stopped
    too, not read for as long as it sends."""
    index = stream.index
    for packet in container.demux():
        if stopped.is_set():
            raise Stopped
        if packet.stream_index == index:
            yield packet


@dataclass(slots=True)
class _JpegFrame:
    """A packet of an MJPEG stream taken as it is, with what the decode loop reads of a frame."""

    picture: JpegPicture
    time: float | None

    @property
    def width(self) -> int:
        return self.picture.width

    @property
    def height(self) -> int:
        return self.picture.height


class _JpegPackets:
    """Takes an MJPEG stream's packets as pictures without decoding them, while every packet
    is a whole JPEG with its own Huffman tables; on the first that is not, gives up for the
    session (the caller decodes that packet and the rest). A packet the decoder would not show
    (:func:`~framepipe.video_length.plays`: an edit list hides it) is skipped."""

    def __init__(self, stream: Any) -> None:
        self.on = stream.codec_context.name == "mjpeg"
        self.start: int | None = stream.start_time

    def take(self, packet: Any) -> list[Any] | None:
        """``[frame]`` for a packet taken as it is, ``[]`` for one that does not play, or None
        when the packet goes to the decoder (the end-of-stream flush packet, and everything
        once taking has stopped)."""
        if not self.on:
            return None
        if packet.size == 0:
            return None  # the demuxer's flush packet: decoding it drains nothing here
        if not plays(packet, self.start):
            return []  # hidden: the decoder would decode it and drop its picture
        data = bytes(packet)
        if not (data.startswith(b"\xff\xd8") and b"\xff\xc4" in data):
            self.on = False
            return None
        try:
            picture = JpegPicture(data)
        except FrameError:
            self.on = False
            return None
        time_s = None if packet.pts is None else float(packet.pts * packet.time_base)
        return [_JpegFrame(picture, time_s)]
