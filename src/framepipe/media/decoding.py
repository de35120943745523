"""Reading a video: opening it within the picture-size and length limits, and decoding its frames
(with its sound, in the same pass, when an output keeps it) within the length limit.

Only the file itself is read: formats whose file names other files or network addresses to
read (an HLS playlist, an ffconcat list, an SDP or RTSP description: :data:`REFUSED_FORMATS`)
are refused before FFmpeg reads any of them, so a playlist given as a video (a client's object
``x.m3u8`` naming ``/srv/private/clip.mp4``) cannot make a step read, and publish, a file
outside the roots it was confined to."""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import av
import av.audio.stream
import av.container
import av.video.stream

from framepipe.errors import MediaError
from framepipe.media.audio import AudioQueue, audio_format
from framepipe.media.limits import BACKSTOP, LengthGuard, LengthLimit, check_length, check_picture
from framepipe.media.progress import check_stop
from framepipe.media.timing import frame_seconds, stream_rate, stream_start
from framepipe.video_length import (
    COMPLETE_SHARE,
    DecodedLength,
    announced_frames,
    video_duration,
)

__all__ = [
    "COMPLETE_SHARE",
    "REFUSED_FORMATS",
    "Decoding",
    "decode",
    "decode_failed",
    "decode_source",
    "decode_with_audio",
    "media_seconds",
    "open_video",
    "peek",
]

T = TypeVar("T")

REFUSED_FORMATS = frozenset({"concat", "dash", "hls", "imf", "rtp", "rtsp", "sap", "sdp"})
"""FFmpeg's demuxers that read other files or network addresses named inside the file."""

_NAMED_BY_THEIR_HEAD = ((b"#EXTM3U", "an HLS playlist"), (b"ffconcat version", "an ffconcat list"))


@functools.cache
def _allowed_formats() -> str:
    """FFmpeg's ``format_whitelist``: every demuxer of this build but :data:`REFUSED_FORMATS`."""
    names: set[str] = set()
    for name in av.formats_available:
        try:
            fmt = av.ContainerFormat(name, "r")
        except ValueError:
            continue  # a muxer only
        if not set(fmt.name.split(",")) & REFUSED_FORMATS:
            names.add(fmt.name)
    return ",".join(sorted(names))


def _open_failure(path: Path, exc: Exception) -> MediaError:
    """Why ``path`` cannot be opened: an empty file (an upload that failed) is named as one,
    and so is a playlist (see the module)."""
    with contextlib.suppress(OSError), open(path, "rb") as file:
        head = file.read(32)
        if not head:
            return MediaError(path, "is empty (0 bytes): not a video")
        head = head.lstrip(b"\xef\xbb\xbf")
        for marker, what in _NAMED_BY_THEIR_HEAD:
            if head.startswith(marker):
                return MediaError(
                    path, f"is {what}, which names other files: not read (only a video file is)"
                )
    return MediaError(path, f"cannot be opened as a video file ({exc})")


def media_seconds(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream
) -> float | None:
    """The file's length in seconds as its header announces it (None: it announces none): the
    longer of its video's (:func:`~framepipe.video_length.video_duration`) and the container's
    (its longest stream's: a sound track longer than the video is decoded too)."""
    whole = None if container.duration is None else container.duration / av.time_base
    lengths = [s for s in (video_duration(stream, container), whole) if s is not None]
    return max(lengths, default=None)


@contextlib.contextmanager
def open_video(
    src: Path | str, *, max_pixels: int, length: LengthLimit | None
) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream]]:
    """Open ``src`` for reading and yield (container, first video stream), multi-threaded decode.

    A missing, unreadable or non-video file raises :class:`MediaError` naming the path. So does
    a video whose picture is larger than ``max_pixels`` (0: no limit), judged from the size
    the demuxer and parsers read from the headers, before any frame is decoded, and, given a
    ``length`` limit (every operation that decodes the frames; ``probe`` gives none), a file
    whose header announces a longer media (:func:`media_seconds`) or more frames (an MP4's
    count) than it allows: the frames of a file whose header tells less are held to it while
    they are decoded (:func:`decode`). FFmpeg itself
    gets :data:`BACKSTOP` times the limit as its own ``max_pixels`` (its stream probing and the
    decoder then allocate no larger frame), a backstop for sizes the headers do not tell (a
    size change mid-stream); the margin is there because FFmpeg counts padded, aligned sizes
    (1920x1080 H.264 is coded as 1920x1088).

    A format that reads other files or addresses named inside the file (an HLS playlist ...:
    :data:`REFUSED_FORMATS`) raises :class:`MediaError` naming the path, before any of them
    is opened (FFmpeg's ``format_whitelist``)."""
    path = Path(src)
    if not path.exists():
        raise MediaError(path, "no such file")
    if not path.is_file():
        raise MediaError(path, "not a file")
    options = {"max_pixels": str(BACKSTOP * max_pixels)} if max_pixels else {}
    try:
        container = av.open(
            str(path),
            "r",
            options=options,
            container_options={"format_whitelist": _allowed_formats()},
        )
    except (av.FFmpegError, UnicodeDecodeError) as exc:
        raise _open_failure(path, exc) from exc
    try:
        if not container.streams.video:
            kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
            raise MediaError(path, f"holds no video stream ({kinds})")
        stream = container.streams.video[0]
        check_picture(path, stream.width, stream.height, max_pixels)
        if length is not None:
            check_length(
                path,
                length,
                seconds=media_seconds(container, stream),
                frames=announced_frames(stream),
            )
        stream.thread_type = "AUTO"
        if max_pixels:
            stream.codec_context.options = {**stream.codec_context.options, **options}
        yield container, stream
    finally:
        container.close()


class _Held:
    """One pass over a file's video (and sound) held to a :class:`LengthLimit`
    (:class:`LengthGuard`), from the video stream's start: a video frame by its timestamp (by
    its index at the stream's rate, without one) and by its count; a sound frame by its
    timestamp and by the samples decoded before it (from where the first one starts), so
    neither timestamps that stand still nor ones that leap let more through."""

    def __init__(
        self,
        container: av.container.InputContainer,
        stream: av.video.stream.VideoStream,
        path: Path,
        limit: LengthLimit,
    ) -> None:
        announced = media_seconds(container, stream)
        self.video = LengthGuard(path, limit, "its video", announced=announced)
        self.sound = LengthGuard(path, limit, "its sound", announced=announced)
        self.start = stream_start(stream)
        self.rate = stream_rate(stream)
        self.samples = 0
        self.sound_from: float | None = None

    def frame(self, frame: av.VideoFrame) -> None:
        self.video.frame(frame_seconds(frame, self.video.frames, self.rate) - self.start)

    def sound_frame(self, frame: av.AudioFrame) -> None:
        by_time = None if frame.time is None else float(frame.time) - self.start
        if self.sound_from is None:
            self.sound_from = by_time or 0.0
        by_count = self.sound_from + self.samples / (frame.sample_rate or 1)
        self.sound.reach(by_count if by_time is None else max(by_count, by_time))
        self.samples += frame.samples


def decode(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    *,
    limit: LengthLimit,
) -> Iterator[av.VideoFrame]:
    """The stream's frames; a decode error becomes :class:`MediaError` naming ``path``, and so
    does the frame that passes ``limit`` (by its time from the stream's start, or the count of
    frames: see :class:`~framepipe.media.limits.LengthGuard`), raised before it is yielded.
    Each frame is preceded by :func:`~framepipe.media.progress.check_stop`."""
    held = _Held(container, stream, path, limit)
    try:
        check_stop()
        for frame in container.decode(stream):
            held.frame(frame)
            yield frame
            check_stop()
    except av.FFmpegError as exc:
        raise MediaError(path, f"decoding failed ({exc})") from exc


def decode_with_audio(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    audio: av.audio.stream.AudioStream | None,
    on_audio: Callable[[av.AudioFrame], None],
    path: Path,
    *,
    limit: LengthLimit,
) -> Iterator[av.VideoFrame]:
    """The video stream's frames, in one pass over the file that also decodes ``audio`` (when
    given) and hands its frames to ``on_audio`` as they come. A video or container error
    becomes :class:`MediaError` naming ``path``; an audio packet that cannot be decoded is
    skipped (the sound has a gap there), as players do, rather than failing the video. A
    video or sound frame that passes ``limit`` is a :class:`MediaError` naming ``path``, as
    in :func:`decode`, raised before it is yielded or handed on. Each packet is preceded by
    :func:`~framepipe.media.progress.check_stop`."""
    if audio is None:
        yield from decode(container, stream, path, limit=limit)
        return
    held = _Held(container, stream, path, limit)
    try:
        for packet in container.demux(stream, audio):
            check_stop()
            if packet.stream.index == stream.index:
                for frame in packet.decode():
                    assert isinstance(frame, av.VideoFrame)
                    held.frame(frame)
                    yield frame
                continue
            try:
                sounds = packet.decode()
            except av.FFmpegError:
                continue
            for sound in sounds:
                assert isinstance(sound, av.AudioFrame)
                held.sound_frame(sound)
                on_audio(sound)
    except av.FFmpegError as exc:
        raise MediaError(path, f"decoding failed ({exc})") from exc


def decode_failed(exc: MediaError) -> bool:
    """Whether ``exc``, raised by :func:`decode` or :func:`decode_with_audio`, is FFmpeg failing
    to decode (a broken or truncated file: a caller may keep the frames decoded before it), not
    a frame past the length limit."""
    return isinstance(exc.__cause__, av.FFmpegError)


@dataclass
class Decoding:
    """One source's video being decoded: its first frame, every frame (the first included)
    and the queue its sound goes to (None when no sound is kept)."""

    first: av.VideoFrame
    frames: Iterator[av.VideoFrame]
    audio: AudioQueue | None


def decode_source(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    *,
    audio: bool | AudioQueue,
    limit: LengthLimit,
) -> Decoding:
    """Start decoding ``stream``, in one pass over the file that also decodes the source's
    sound (its first audio stream) as :func:`decode_with_audio` does.

    ``audio``: True keeps the sound in a new :class:`AudioQueue` in the format that keeps it
    (:func:`~framepipe.media.audio.audio_format`), aligned with the video's start; the result's
    ``audio`` is None when the source has none. An :class:`AudioQueue` (one output track fed by
    several sources, as ``concat`` does) begins a new part of it at the video's start, fed by
    this source's sound, or left silent when it has none. False decodes no sound.

    The first frame is decoded here: a stream without one raises :class:`MediaError` naming
    ``path``, before anything is written. A frame past ``limit`` is a :class:`MediaError`
    naming ``path``, raised by ``frames`` (see :func:`decode_with_audio`).

    A truncated file (an interrupted upload, whose header still announces the whole video) is
    a :class:`MediaError` naming ``path``, raised by ``frames`` when they run out, so an output
    being written from them is never completed. The rule
    (:meth:`~framepipe.video_length.DecodedLength.shortfall`, shared with
    :class:`~framepipe.sources.VideoSource`): when the header counts frames (MP4, MOV), fewer
    decoded than :data:`COMPLETE_SHARE` of the frames that play, less two (frames an edit list
    hides, as a trim with ``ffmpeg -ss ... -c copy`` or a phone's trim leaves, are not
    expected); else, when it announces a duration (Matroska/WebM's track duration ...),
    decoded frames ending short of that share of it less two frames. A file whose header
    announces neither (MPEG-TS, a raw stream: their length is estimated from what is there)
    cannot be judged."""
    queue: AudioQueue | None = None
    astream = container.streams.audio[0] if audio is not False and container.streams.audio else None
    if isinstance(audio, AudioQueue):
        queue = audio
    elif audio and astream is not None:
        queue = AudioQueue(audio_format(astream))
    if queue is not None:
        queue.begin(stream_start(stream))
    first, frames = peek(
        _complete(
            decode_with_audio(
                container,
                stream,
                astream,
                queue.push if queue is not None else _ignore,
                path,
                limit=limit,
            ),
            container,
            stream,
            path,
        )
    )
    if first is None:
        raise MediaError(path, "holds no decodable video frames")
    return Decoding(first, frames, queue)


def _complete(
    frames: Iterator[av.VideoFrame],
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
) -> Iterator[av.VideoFrame]:
    """``frames``, then a :class:`MediaError` if they were fewer or shorter than the header
    announces (see :func:`decode_source`)."""
    decoded = DecodedLength(stream, container)
    for frame in frames:
        decoded.add(frame)
        yield frame
    problem = decoded.shortfall()
    if problem is not None:
        raise MediaError(path, problem)


def _ignore(frame: av.AudioFrame) -> None:
    pass


def peek(items: Iterator[T]) -> tuple[T | None, Iterator[T]]:
    """The first item (None if there is none) and an iterator that still yields it."""
    first = next(items, None)
    if first is None:
        return None, iter(())
    return first, itertools.chain([first], items)
