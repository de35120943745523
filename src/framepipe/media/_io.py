"""Shared plumbing: atomic outputs, opening inputs, progress, rate conversion, H.264 writer."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import av.container
import av.video.stream
from av.video.reformatter import VideoReformatter

from framepipe.errors import MediaError

__all__ = [
    "H264Writer",
    "Progress",
    "ProgressCallback",
    "atomic_output",
    "decode",
    "estimate_frames",
    "even",
    "fit_size",
    "frame_seconds",
    "open_video",
    "resample",
    "stream_rate",
]

ProgressCallback = Callable[[float], None]


def even(n: float) -> int:
    """``n`` rounded to the nearest even integer, at least 2 (H.264 4:2:0 needs even sides)."""
    return max(2, int(n / 2 + 0.5) * 2)


@contextlib.contextmanager
def atomic_output(dst: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``dst`` (same suffix); rename it to ``dst`` on success.

    On any exception (including ``KeyboardInterrupt``) the temp file is removed and ``dst`` is
    left as it was, so a failed run never leaves a partial file that looks done."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.stem}.{secrets.token_hex(4)}.part{dst.suffix}")
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def open_video(src: Path | str) -> Iterator[tuple[av.container.InputContainer,
                                                  av.video.stream.VideoStream]]:
    """Open ``src`` for reading and yield (container, first video stream), multi-threaded decode.

    A missing, unreadable or non-video file raises :class:`MediaError` naming the path."""
    path = Path(src)
    if not path.exists():
        raise MediaError(path, "no such file")
    if not path.is_file():
        raise MediaError(path, "not a file")
    try:
        container = av.open(str(path), "r")
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise MediaError(path, f"cannot be opened as a video file ({exc})") from exc
    try:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise MediaError(path, f"holds no video stream ({kinds})")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
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


def resample(frames: Iterator[av.VideoFrame], src_rate: Fraction,
             out_rate: Fraction) -> Iterator[av.VideoFrame]:
    """Constant-rate output at ``out_rate`` from frames at their own timestamps.

    Each output slot ``n`` (at ``n / out_rate`` s from the first frame) shows the source frame
    nearest before it: frames are dropped or repeated as needed (also turns a variable frame
    rate into a constant one)."""
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
        end = last_t - t0 + 1 / float(src_rate)
        while n * slot + half <= end:
            yield prev
            n += 1


class H264Writer:
    """Encodes frames into an H.264 MP4 (libx264) at a constant frame rate.

    Frames of another size or pixel format are converted (libswscale) on the way in, by one
    scaler kept for the whole file (building one per frame costs ~5x more). The encoder uses
    frame threads, as the ffmpeg command line does, so encoding overlaps the caller's work."""

    def __init__(self, path: Path, *, width: int, height: int, fps: Fraction,
                 crf: int = 23, preset: str = "medium", pix_fmt: str = "yuv420p") -> None:
        self.path = path
        self.width, self.height = width, height
        self.pix_fmt = pix_fmt
        self.frames = 0
        self._container = av.open(str(path), "w", format="mp4")
        try:
            stream = self._container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.options = {"crf": str(crf), "preset": preset}
            stream.codec_context.thread_type = "FRAME"
            self._stream = stream
            self._scaler = VideoReformatter()
            self._time_base = Fraction(1) / fps
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

    def close(self) -> None:
        try:
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
