"""Shared plumbing: atomic outputs, opening inputs, the picture-size limit, progress, rate
conversion, rotation, audio kept through a re-encode, the H.264 writer."""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import itertools
import math
import os
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import av.audio.stream
import av.container
import av.filter
import av.video.stream
import cv2
import numpy as np
from av.video.reformatter import VideoReformatter

from framepipe.errors import MediaError

__all__ = [
    "AAC_RATES",
    "BACKSTOP",
    "DEFAULT_MAX_PIXELS",
    "TEMP_SLOTS",
    "AudioFormat",
    "AudioQueue",
    "H264Writer",
    "Progress",
    "ProgressCallback",
    "Upright",
    "atomic_output",
    "audio_format",
    "check_output_size",
    "check_picture",
    "decode",
    "decode_with_audio",
    "estimate_frames",
    "even",
    "fit_size",
    "frame_duration",
    "frame_rotation",
    "frame_seconds",
    "image_size",
    "open_video",
    "peek",
    "pixel_limit",
    "resample",
    "stream_rate",
    "stream_start",
    "upright_image",
]

T = TypeVar("T")

ProgressCallback = Callable[[float], None]


def even(n: float) -> int:
    """``n`` rounded to the nearest even integer, at least 2 (H.264 4:2:0 needs even sides)."""
    return max(2, int(n / 2 + 0.5) * 2)


TEMP_SLOTS = 8
"""Temp files one output can have at once (writers of the same ``dst`` at the same time)."""

_OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def _temp_slot(dst: Path, slot: int) -> Path:
    """The name of ``dst``'s temp file number ``slot``: ``.out.part.mp4``, ``.out.1.part.mp4``
    ... (the suffix kept: writers choose the format by it)."""
    number = f".{slot}" if slot else ""
    return dst.with_name(f".{dst.stem}{number}.part{dst.suffix}")


def _same_file(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd`` (not renamed or replaced)."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _lock(fd: int) -> bool | None:
    """Take ``fd``'s exclusive lock without waiting: True, False if a live process holds it,
    None if the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _claim_temp(dst: Path) -> tuple[int | None, Path]:
    """A locked, empty temp file for ``dst``: (its locked descriptor, its path).

    Takes the first slot no live writer holds, reusing what a killed writer left there
    (truncated), then removes the files of the later slots that no live writer holds. On a
    file system without locks: a new, randomly named file and no descriptor."""
    for slot in range(TEMP_SLOTS):
        tmp = _temp_slot(dst, slot)
        while True:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o666)
            locked = _lock(fd)
            if locked is None:
                with contextlib.suppress(OSError):
                    if os.fstat(fd).st_size == 0:
                        tmp.unlink()
                os.close(fd)
                return None, dst.with_name(f".{dst.stem}.{secrets.token_hex(4)}.part"
                                           f"{dst.suffix}")
            # A writer that finished between our open and our lock renamed the file to dst:
            # holding its lock says nothing about the slot, which must be opened again.
            if locked and not _same_file(fd, tmp):
                os.close(fd)
                continue
            break
        if not locked:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        for later in range(slot + 1, TEMP_SLOTS):
            _remove_abandoned(_temp_slot(dst, later))
        return fd, tmp
    raise MediaError(dst, f"{TEMP_SLOTS} writes of this file are already in progress")


def _remove_abandoned(path: Path) -> None:
    """Delete the temp file ``path`` if no live writer holds its lock (its writer was killed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS)
    except OSError:
        return  # none there (the usual case), or a link or something else: not ours
    try:
        if _lock(fd) and _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dst: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``dst`` (same suffix); rename it to ``dst`` on success.

    On any exception (including ``KeyboardInterrupt``) the temp file is removed and ``dst`` is
    left as it was, so a failed run never leaves a partial file that looks done.

    A writer that is killed (SIGKILL, a SIGTERM without a handler, a power cut) cannot remove
    its temp file, so temp files have fixed names per ``dst`` (``.out.part.mp4``, then
    ``.out.1.part.mp4`` ... for writes of the same ``dst`` at the same time, at most
    :data:`TEMP_SLOTS`), each held under an exclusive lock (``flock``) while its writer lives:
    the next write of ``dst`` reuses the first slot nobody holds and deletes the later ones
    nobody holds, so a killed run's partial file lasts until the next write of the same output,
    and a write in progress is never disturbed. Temp files are opened without following a
    symbolic link."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _claim_temp(dst)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        if fd is not None:
            os.close(fd)


# -- the picture-size limit ----------------------------------------------------------------------

DEFAULT_MAX_PIXELS = 8192 * 8192
"""The default picture-size limit (the setting ``media_max_pixels``): 8192 x 8192, room for
8K UHD (7680 x 4320) and the largest H.264/HEVC level, while one decoded frame stays near
100 MB (yuv420p) and its BGR copy near 200 MB."""

BACKSTOP = 4
"""FFmpeg's own ``max_pixels`` is this many times the limit (see :func:`open_video`)."""

_RAISE_IT = ("raise the limit with max_pixels= or the setting FRAMEPIPE_MEDIA_MAX_PIXELS "
             "(0: no limit)")


def pixel_limit(max_pixels: int | None) -> int:
    """The picture-size limit in pixels, 0 for none: ``max_pixels`` when given, else the
    setting ``media_max_pixels`` (``FRAMEPIPE_MEDIA_MAX_PIXELS`` or the config file; default
    :data:`DEFAULT_MAX_PIXELS`). A bad setting raises :class:`ConfigError` naming it; a bad
    ``max_pixels`` raises :class:`ValueError`."""
    if max_pixels is None:
        from framepipe.config import load_settings

        return load_settings().media_max_pixels
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(f"max_pixels must be a whole number >= 0 (0: no limit), not "
                         f"{max_pixels!r}")
    return max_pixels


def _limit_text(limit: int) -> str:
    side = math.isqrt(limit)
    return f"{limit:,} pixels" + (f" ({side}x{side})" if side * side == limit else "")


def check_picture(path: Path | str, width: int, height: int, limit: int,
                  what: str = "its picture") -> None:
    """Raise :class:`MediaError` naming ``path``, its size and the limit (and how to raise it)
    when a ``width`` x ``height`` picture is larger than ``limit`` pixels (0: no limit)."""
    if limit and width * height > limit:
        raise MediaError(path, f"{what} is {width}x{height} ({width * height:,} pixels), "
                               f"larger than the limit of {_limit_text(limit)}: refused "
                               f"before decoding; {_RAISE_IT}")


def check_output_size(width: int, height: int, limit: int) -> None:
    """Raise :class:`ValueError` when a requested output of ``width`` x ``height`` is larger
    than ``limit`` pixels (0: no limit), before anything is decoded or written."""
    if limit and width * height > limit:
        raise ValueError(f"the requested output size {width}x{height} "
                         f"({width * height:,} pixels) is larger than the limit of "
                         f"{_limit_text(limit)}; {_RAISE_IT}")


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
        return (int.from_bytes(head[24:27], "little") + 1,
                int.from_bytes(head[27:30], "little") + 1)
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


@contextlib.contextmanager
def open_video(src: Path | str, *, max_pixels: int) -> Iterator[
        tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open ``src`` for reading and yield (container, first video stream), multi-threaded decode.

    A missing, unreadable or non-video file raises :class:`MediaError` naming the path. So does
    a video whose picture is larger than ``max_pixels`` (0: no limit), judged from the size
    the demuxer and parsers read from the headers, before any frame is decoded. FFmpeg itself
    gets :data:`BACKSTOP` times the limit as its own ``max_pixels`` (its stream probing and the
    decoder then allocate no larger frame), a backstop for sizes the headers do not tell (a
    size change mid-stream); the margin is there because FFmpeg counts padded, aligned sizes
    (1920x1080 H.264 is coded as 1920x1088)."""
    path = Path(src)
    if not path.exists():
        raise MediaError(path, "no such file")
    if not path.is_file():
        raise MediaError(path, "not a file")
    options = {"max_pixels": str(BACKSTOP * max_pixels)} if max_pixels else {}
    try:
        container = av.open(str(path), "r", options=options)
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise MediaError(path, f"cannot be opened as a video file ({exc})") from exc
    try:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise MediaError(path, f"holds no video stream ({kinds})")
        stream = container.streams.video[0]
        check_picture(path, stream.width, stream.height, max_pixels)
        stream.thread_type = "AUTO"
        if max_pixels:
            stream.codec_context.options = {**stream.codec_context.options, **options}
        yield container, stream
    finally:
        container.close()


def estimate_frames(stream: av.video.stream.VideoStream,
                    container: av.container.InputContainer) -> int:
    """The stream's frame count from the header, else from duration x frame rate (0: unknown)."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    seconds = None
    if stream.duration is not None and stream.time_base is not None:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        seconds = container.duration / av.time_base
    if seconds and rate:
        return max(1, round(seconds * float(rate)))
    return 0


class Progress:
    """Reports ``done / total`` as 0-100 to a callback: non-decreasing, below 100 until
    :meth:`finish`, and at most once per whole percent."""

    def __init__(self, callback: ProgressCallback | None, total: int) -> None:
        self._callback = callback
        self.total = max(0, total)
        self.done = 0
        self._last = -1.0

    def step(self, n: int = 1) -> None:
        self.done += n
        if self._callback is None or self.total <= 0:
            return
        pct = min(99.0, float(int(100 * self.done / self.total)))
        if pct > self._last:
            self._last = pct
            self._callback(pct)

    def finish(self) -> None:
        if self._callback is not None:
            self._last = 100.0
            self._callback(100.0)


def frame_seconds(frame: av.VideoFrame, index: int, rate: Fraction) -> float:
    """The frame's presentation time in seconds (from its pts, else from its index)."""
    t = frame.time
    if t is None:
        return index / float(rate)
    return float(t)


def frame_duration(frame: av.VideoFrame, rate: Fraction) -> float:
    """How long the frame is shown, in seconds: its own duration (the container's, e.g. an MP4
    sample's, which a variable frame rate sets frame by frame) when known, else one frame at
    ``rate``."""
    duration = getattr(frame, "duration", None)
    if duration and duration > 0 and frame.time_base is not None:
        return float(duration * frame.time_base)
    return 1 / float(rate)


def resample(frames: Iterator[av.VideoFrame], src_rate: Fraction,
             out_rate: Fraction) -> Iterator[av.VideoFrame]:
    """Constant-rate output at ``out_rate`` from frames at their own timestamps.

    Output slot ``n`` (at ``T = n / out_rate`` s from the first frame) shows the latest source
    frame whose timestamp is before ``T`` plus half a slot, as the ffmpeg command line's
    ``fps`` filter does (it rounds each timestamp to the nearest slot): frames are dropped or
    repeated by their timestamps, so a variable frame rate (bursts, gaps) becomes a constant
    one in order and in time. The output lasts until the last frame's end (its timestamp plus
    its own duration, :func:`frame_duration`), rounded to whole slots: within half a slot of
    the source's video duration."""
    slot = 1 / float(out_rate)
    half = slot / 2
    prev: av.VideoFrame | None = None
    t0 = 0.0
    last_t = 0.0
    n = 0
    for i, frame in enumerate(frames):
        t = frame_seconds(frame, i, src_rate)
        if prev is None:
            t0 = t
        else:
            while n * slot + half <= t - t0:
                yield prev
                n += 1
        prev, last_t = frame, t
    if prev is not None:
        end = last_t - t0 + frame_duration(prev, src_rate)
        while n * slot + half <= end:
            yield prev
            n += 1


# -- rotation ------------------------------------------------------------------------------------


def _rotation_tag(stream: av.video.stream.VideoStream) -> int | None:
    """The legacy ``rotate`` tag (clockwise degrees) as counter-clockwise degrees, or None."""
    value = dict(stream.metadata).get("rotate")
    if value is None:
        return None
    try:
        return (-int(float(value))) % 360
    except ValueError:
        return None


def frame_rotation(frame: av.VideoFrame | None, stream: av.video.stream.VideoStream) -> int:
    """How far a decoded frame must be turned counter-clockwise to be shown upright: 0, 90,
    180 or 270, from the frame's display matrix (FFmpeg attaches the stream's to every frame),
    else the stream's legacy ``rotate`` tag. Other angles are rounded to a quarter turn."""
    degrees = 0.0
    if frame is not None:
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            degrees = float(frame.rotation or 0)
    if not degrees:
        degrees = float(_rotation_tag(stream) or 0)
    return (round(degrees / 90) * 90) % 360


_TURN_FILTERS: dict[int, tuple[tuple[str, str | None], ...]] = {
    90: (("transpose", "cclock"),),
    180: (("hflip", None), ("vflip", None)),
    270: (("transpose", "clock"),),
}
_CV2_TURNS = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180,
              270: cv2.ROTATE_90_CLOCKWISE}


def upright_image(image: np.ndarray, rotation: int) -> np.ndarray:
    """A decoded image (any channels) turned ``rotation`` degrees counter-clockwise."""
    if rotation % 360 == 0:
        return image
    return np.asarray(cv2.rotate(image, _CV2_TURNS[rotation % 360]))


class Upright:
    """Turns decoded frames upright (``rotation`` degrees counter-clockwise, as FFmpeg's
    command line does with its transpose/flip filters) and drops their display matrix, so an
    encoded output shows upright with no rotation of its own. ``rotation`` 0 passes frames
    through untouched. One filter graph per instance, built at the first frame."""

    def __init__(self, rotation: int) -> None:
        if rotation % 90:
            raise ValueError(f"rotation must be a multiple of 90, not {rotation}")
        self.rotation = rotation % 360
        self._graph: av.filter.Graph | None = None

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The upright size of a ``width`` x ``height`` frame."""
        return (height, width) if self.rotation in (90, 270) else (width, height)

    def __call__(self, frame: av.VideoFrame) -> av.VideoFrame:
        if not self.rotation:
            return frame
        if self._graph is None:
            graph = av.filter.Graph()
            node = graph.add_buffer(width=frame.width, height=frame.height,
                                    format=frame.format,
                                    time_base=frame.time_base or Fraction(1, 1000))
            for name, args in (*_TURN_FILTERS[self.rotation],
                               ("sidedata", "mode=delete:type=DISPLAYMATRIX")):
                nxt = graph.add(name, args) if args is not None else graph.add(name)
                node.link_to(nxt)
                node = nxt
            node.link_to(graph.add("buffersink"))
            graph.configure()
            self._graph = graph
        self._graph.push(frame)
        out = self._graph.pull()
        assert isinstance(out, av.VideoFrame)
        return out

    def frames(self, frames: Iterable[av.VideoFrame]) -> Iterator[av.VideoFrame]:
        """Each of ``frames`` upright."""
        for frame in frames:
            yield self(frame)


def peek(items: Iterator[T]) -> tuple[T | None, Iterator[T]]:
    """The first item (None if there is none) and an iterator that still yields it."""
    first = next(items, None)
    if first is None:
        return None, iter(())
    return first, itertools.chain([first], items)


# -- audio ---------------------------------------------------------------------------------------

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
"""Sample rates the AAC encoder takes; another source rate is converted to 48 kHz."""


@dataclass(frozen=True)
class AudioFormat:
    """The audio of an output: AAC at ``rate`` Hz, ``layout`` ``mono`` or ``stereo``."""

    rate: int
    layout: str

    @property
    def channels(self) -> int:
        return 1 if self.layout == "mono" else 2


def audio_format(stream: av.audio.stream.AudioStream) -> AudioFormat:
    """The output format that keeps ``stream``'s sound: its rate (48 kHz if AAC lacks it),
    mono for one channel, else stereo (more channels are mixed down)."""
    ctx = stream.codec_context
    rate = int(ctx.sample_rate or stream.rate or 48000)
    channels = ctx.layout.nb_channels if ctx.layout is not None else 2
    return AudioFormat(rate if rate in AAC_RATES else 48000,
                       "mono" if channels == 1 else "stereo")


class AudioQueue:
    """Audio on its way into one output file, on the output's timeline.

    Source frames (any format, rate, layout) are converted to ``fmt`` (planar float) and
    queued; :class:`H264Writer` takes them out as its video reaches them, so the file is
    interleaved. A source is a *part* (:meth:`begin`): its audio is aligned with its video,
    source time ``t0`` (the video's start) landing at the part's start on the output timeline;
    audio that starts later is preceded by silence, audio that starts earlier is cut."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._pending: collections.deque[np.ndarray] = collections.deque()
        self.pending_samples = 0
        self._resampler: av.AudioResampler | None = None
        self._t0 = 0.0
        self._lead: int | None = None  # samples to pad (> 0) or cut (< 0) at the part's start
        self._first_time: float | None = None

    def begin(self, t0: float = 0.0) -> None:
        """Start a new part whose video starts at ``t0`` seconds of its source."""
        self._resampler = av.AudioResampler(format="fltp", layout=self.fmt.layout,
                                            rate=self.fmt.rate)
        self._t0 = t0
        self._lead = None
        self._first_time = None

    def push(self, frame: av.AudioFrame) -> None:
        """Queue one decoded source frame of the current part."""
        if self._resampler is None:
            self.begin()
        assert self._resampler is not None
        if self._first_time is None:
            self._first_time = float(frame.time) if frame.time is not None else self._t0
        for out in self._resampler.resample(frame):
            self._queue(out)

    def flush(self) -> None:
        """The current part's source has no more audio: drain the converter."""
        if self._resampler is not None:
            for out in self._resampler.resample(None):
                self._queue(out)
            self._resampler = None

    def _queue(self, frame: av.AudioFrame) -> None:
        samples = np.asarray(frame.to_ndarray(), dtype=np.float32)
        if self._lead is None:
            start = self._first_time if self._first_time is not None else self._t0
            self._lead = round((start - self._t0) * self.fmt.rate)
            if self._lead > 0:
                self._append(np.zeros((self.fmt.channels, self._lead), np.float32))
                self._lead = 0
        if self._lead < 0:
            cut = min(-self._lead, samples.shape[1])
            samples = samples[:, cut:]
            self._lead += cut
        if samples.shape[1]:
            self._append(samples)

    def _append(self, samples: np.ndarray) -> None:
        self._pending.append(samples)
        self.pending_samples += samples.shape[1]

    def take(self, limit: int | None = None) -> list[np.ndarray]:
        """Remove and return up to ``limit`` queued samples (all if None), in order."""
        out: list[np.ndarray] = []
        want = self.pending_samples if limit is None else max(0, min(limit,
                                                                     self.pending_samples))
        while want > 0:
            head = self._pending[0]
            if head.shape[1] <= want:
                out.append(self._pending.popleft())
            else:
                out.append(head[:, :want])
                self._pending[0] = head[:, want:]
            taken = out[-1].shape[1]
            want -= taken
            self.pending_samples -= taken
        return out

    def clear(self) -> None:
        """Drop whatever is queued."""
        self._pending.clear()
        self.pending_samples = 0


# -- writing -------------------------------------------------------------------------------------


class H264Writer:
    """Encodes frames into an H.264 MP4 (libx264) at a constant frame rate, with an AAC track
    when given an :class:`AudioQueue`.

    Frames of another size or pixel format are converted (libswscale) on the way in, by one
    scaler kept for the whole file (building one per frame costs ~5x more). The encoder uses
    frame threads, as the ffmpeg command line does, so encoding overlaps the caller's work.

    Audio: after each video frame the queued audio up to that frame's end is encoded, so the
    tracks interleave. :meth:`end_part` makes the audio exactly as long as the video so far
    (cut, or padded with silence); :meth:`close` writes the rest of the queue (audio may run
    past the last frame, as the ffmpeg command line keeps it)."""

    def __init__(self, path: Path, *, width: int, height: int, fps: Fraction,
                 crf: int = 23, preset: str = "medium", pix_fmt: str = "yuv420p",
                 audio: AudioQueue | None = None, audio_bitrate: int = 128_000) -> None:
        self.path = path
        self.width, self.height = width, height
        self.pix_fmt = pix_fmt
        self.fps = fps
        self.frames = 0
        self.audio = audio
        self.audio_samples = 0
        self._container = av.open(str(path), "w", format="mp4")
        try:
            stream = self._container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.options = {"crf": str(crf), "preset": preset}
            stream.codec_context.thread_type = "FRAME"
            self._stream = stream
            self._scaler = VideoReformatter()
            self._time_base = Fraction(1) / fps
            self._audio_stream: av.audio.stream.AudioStream | None = None
            if audio is not None:
                astream = self._container.add_stream("aac", rate=audio.fmt.rate)
                astream.layout = audio.fmt.layout
                astream.bit_rate = audio_bitrate
                self._audio_stream = astream
                self._audio_time_base = Fraction(1, audio.fmt.rate)
        except BaseException:
            self._container.close()
            raise

    def write(self, frame: av.VideoFrame) -> None:
        if (frame.width, frame.height, frame.format.name) != (self.width, self.height,
                                                               self.pix_fmt):
            frame = self._scaler.reformat(frame, width=self.width, height=self.height,
                                          format=self.pix_fmt, interpolation="BICUBIC")
        frame.pts = self.frames
        frame.time_base = self._time_base
        self._container.mux(self._stream.encode(frame))
        self.frames += 1
        if self.audio is not None and self.audio.pending_samples:
            self._release(self._video_samples())

    def _video_samples(self) -> int:
        """The video's length so far, in audio samples."""
        assert self.audio is not None
        return round(self.frames * self.audio.fmt.rate / self.fps)

    def _release(self, until: int | None) -> None:
        """Encode queued audio up to output sample ``until`` (all of it if None)."""
        assert self.audio is not None
        limit = None if until is None else until - self.audio_samples
        for chunk in self.audio.take(limit):
            self._encode_audio(chunk)

    def _encode_audio(self, samples: np.ndarray | None) -> None:
        assert self._audio_stream is not None
        assert self.audio is not None
        if samples is None:
            self._container.mux(self._audio_stream.encode(None))
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples), format="fltp",
                                           layout=self.audio.fmt.layout)
        frame.sample_rate = self.audio.fmt.rate
        frame.pts = self.audio_samples
        frame.time_base = self._audio_time_base
        self._container.mux(self._audio_stream.encode(frame))
        self.audio_samples += samples.shape[1]

    def end_part(self) -> None:
        """The current part's video and audio are all in: make the audio end where the video
        ends (cut the rest, or pad with silence)."""
        if self.audio is None:
            return
        self.audio.flush()
        end = self._video_samples()
        self._release(end)
        self.audio.clear()
        gap = end - self.audio_samples
        if gap > 0:
            self._encode_audio(np.zeros((self.audio.fmt.channels, gap), np.float32))

    def close(self) -> None:
        try:
            if self.audio is not None:
                self.audio.flush()
                self._release(None)
                self._encode_audio(None)
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def abort(self) -> None:
        self._container.close()

    def __enter__(self) -> H264Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.abort()


def decode(container: av.container.InputContainer, stream: av.video.stream.VideoStream,
           path: Path) -> Iterator[av.VideoFrame]:
    """The stream's frames; a decode error becomes :class:`MediaError` naming ``path``."""
    try:
        yield from container.decode(stream)
    except av.FFmpegError as exc:
        raise MediaError(path, f"decoding failed ({exc})") from exc


def decode_with_audio(container: av.container.InputContainer,
                      stream: av.video.stream.VideoStream,
                      audio: av.audio.stream.AudioStream | None,
                      on_audio: Callable[[av.AudioFrame], None],
                      path: Path) -> Iterator[av.VideoFrame]:
    """The video stream's frames, in one pass over the file that also decodes ``audio`` (when
    given) and hands its frames to ``on_audio`` as they come. A video or container error
    becomes :class:`MediaError` naming ``path``; an audio packet that cannot be decoded is
    skipped (the sound has a gap there), as players do, rather than failing the video."""
    if audio is None:
        yield from decode(container, stream, path)
        return
    try:
        for packet in container.demux(stream, audio):
            if packet.stream.index == stream.index:
                for frame in packet.decode():
                    assert isinstance(frame, av.VideoFrame)
                    yield frame
                continue
            try:
                sounds = packet.decode()
            except av.FFmpegError:
                continue
            for sound in sounds:
                assert isinstance(sound, av.AudioFrame)
                on_audio(sound)
    except av.FFmpegError as exc:
        raise MediaError(path, f"decoding failed ({exc})") from exc


def stream_start(stream: av.video.stream.VideoStream) -> float:
    """The stream's start time in seconds (0 when unknown)."""
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def stream_rate(stream: av.video.stream.VideoStream) -> Fraction:
    """The stream's frame rate (average, else guessed, else 25)."""
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else Fraction(25)


def fit_size(src_w: int, src_h: int, width: int | None, height: int | None) -> tuple[int, int]:
    """Output size: both given -> as given; one -> the other keeps the aspect; none -> source.

    Always even."""
    if width is not None and height is not None:
        return even(width), even(height)
    if width is not None:
        return even(width), even(src_h * width / src_w)
    if height is not None:
        return even(src_w * height / src_h), even(height)
    return even(src_w), even(src_h)
