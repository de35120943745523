"""``probe``: what a video file holds."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import av.container
import av.stream
import av.video.stream

from framepipe.errors import MediaError
from framepipe.media.decoding import open_video
from framepipe.media.limits import DEFAULT_MAX_PIXELS, pixel_limit
from framepipe.media.rotation import frame_rotation
from framepipe.video_length import (
    announced_duration,
    announced_frames,
    plays,
    stream_start,
    tagged_end,
)

__all__ = ["INDEX_TIMESTAMPS", "SCAN_PACKETS", "MediaInfo", "probe"]

INDEX_TIMESTAMPS = 100_000
"""At most this many frame timestamps are read from a container's index (an MP4's sample
table, no I/O) to tell a variable frame rate."""
SCAN_PACKETS = 300
"""Without a complete index, this many packets from the start are demuxed (not decoded)."""


@dataclass(frozen=True)
class MediaInfo:
    """Facts about a video file.

    ``rotation`` is the display rotation in degrees counter-clockwise (0, 90, 180, 270), from
    the stream's display matrix or, failing that, the legacy ``rotate`` tag (which is
    clockwise): how far players turn the stored picture to show it upright. ``width`` and
    ``height`` are of the stored picture; :attr:`display_size` is the upright one. The media
    functions that write images or video turn it upright themselves.
    ``duration`` is the video stream's length in seconds: the stream's own (MP4, MOV: after
    the edit list), else its track's ``DURATION`` tag (Matroska/WebM written by FFmpeg or
    mkvmerge), else the container's when the video is its only stream, else where its last
    packet ends (its pts plus its duration, from the stream's start: the packets from the
    last keyframe before the container's end are demuxed, not decoded, or the whole stream
    when that finds none; not for a stream without timestamps), else the container's.
    ``container_duration`` is the container's (its longest stream's: a sound track longer
    than the video makes it longer than ``duration``; None when it gives none).
    ``frames`` comes from the container header (the frames that play: not those an edit list
    hides, as a trim with ``ffmpeg -ss ... -c copy`` leaves), else it is estimated from
    ``duration`` x fps.
    ``fps`` is the average frame rate (frames / duration; for a variable frame rate, the
    average) unless the container gives none, then FFmpeg's guess.
    ``audio_duration`` is the first audio stream's length in seconds (None without audio): the
    stream's own, else its ``DURATION`` tag (from the stream's start, or from 0 when that is
    negative: the encoder's priming, which the decoder drops), else the container's.

    ``variable_frame_rate`` is a hint read from the timestamps of the frames that play (not
    decoded; not the frames an edit list hides): True when some frame lasts more than 10 %
    (and more than one timestamp tick) longer or shorter than the median frame, as after a
    gap, a burst or a camera changing its rate; False when every frame lasts about the same;
    None when the timestamps are missing (a raw ``.h264`` stream). With a complete index (MP4,
    MOV) each frame's duration is its sample's (to the next sample's decoding time), for all
    the frames; else the frames are those of the first :data:`SCAN_PACKETS` packets that play,
    so a change further into such a file goes unnoticed.
    """

    path: Path
    duration: float
    fps: float
    frames: int
    width: int
    height: int
    video_codec: str
    pix_fmt: str | None
    audio_codec: str | None
    rotation: int
    size: int
    container: str
    audio_duration: float | None = None
    variable_frame_rate: bool | None = None
    container_duration: float | None = None

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown: the stored size, swapped by a quarter-turn rotation."""
        if self.rotation in (90, 270):
            return self.height, self.width
        return self.width, self.height

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (the path as a string)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _scan(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, path: Path
) -> tuple[av.VideoFrame | None, list[int] | None]:
    """The first frame (decoded) and the durations of the frames that play (:func:`~framepipe.
    video_length.plays`), in the stream's time base (None: no timestamps to tell them by), in
    one pass from the start.

    When the index lists every frame (an MP4/MOV's sample table, read with the header), a
    frame's duration is from its sample's decoding time to the next sample's, for the samples
    the index does not flag as hidden by an edit list: the index has decoding times only, and
    with B-frames the hidden samples of a trim are interleaved in decoding order with the
    shown ones, so the gaps between the shown samples' times are not their durations. Else the
    first :data:`SCAN_PACKETS` packets that play are demuxed (not decoded): the gaps between
    their presentation times, sorted. A decode error before the first frame is a
    :class:`MediaError`; a read error after it ends the sample (the operations that read the
    whole file report a broken one)."""
    entries = stream.index_entries
    indexed = bool(stream.frames) and len(entries) >= stream.frames
    durations: list[int] | None = None
    if indexed:
        listed = list(itertools.islice(entries, INDEX_TIMESTAMPS))
        if any(not entry.is_discard for entry in listed):
            durations = [
                after.timestamp - entry.timestamp
                for entry, after in itertools.pairwise(listed)
                if not entry.is_discard and after.timestamp > entry.timestamp
            ]
    stamps: list[int] = []
    start = stream.start_time
    first: av.VideoFrame | None = None
    scanned = 0
    try:
        for packet in container.demux(stream):
            if not indexed and packet.size and scanned < SCAN_PACKETS and plays(packet, start):
                scanned += 1
                stamp = packet.pts if packet.pts is not None else packet.dts
                if stamp is not None:
                    stamps.append(stamp)
            if first is None:
                decoded = packet.decode()
                if decoded:
                    assert isinstance(decoded[0], av.VideoFrame)
                    first = decoded[0]
            if first is not None and (indexed or scanned >= SCAN_PACKETS):
                break
    except av.FFmpegError as exc:
        if first is None:
            raise MediaError(path, f"the video stream cannot be decoded ({exc})") from exc
    if not indexed and stamps:
        stamps.sort()
        durations = [b - a for a, b in itertools.pairwise(stamps) if b > a]
    return first, durations


def _variable(durations: list[int] | None) -> bool | None:
    """True when a frame's duration differs from the median's by over 10 % and one tick."""
    if durations is None:
        return None
    if not durations:
        return False
    median = statistics.median(durations)
    return any(abs(d - median) > max(0.1 * median, 1) for d in durations)


def _seconds(container: av.container.InputContainer) -> float | None:
    """The container's duration in seconds (None when it gives none)."""
    return None if container.duration is None else container.duration / av.time_base


def _last_end(container: av.container.InputContainer, stream: av.stream.Stream) -> int | None:
    """Where the stream's last packet that plays ends (pts plus duration, in the stream's time
    base; a video packet without a duration lasts one frame at the stream's rate; None when
    no packet is timed): the packets from the keyframe before the container's end are demuxed
    (not decoded), or, when that finds none (no known end, or a seek that lands after the
    stream's last packet), all of them."""
    start = stream.start_time
    frame = 0
    if isinstance(stream, av.video.stream.VideoStream):
        rate = stream.average_rate or stream.guessed_rate
        if rate and stream.time_base:
            frame = round(1 / (rate * stream.time_base))

    def scan() -> int | None:
        end: int | None = None
        for packet in container.demux(stream):
            if packet.pts is None or not packet.size or not plays(packet, start):
                continue
            stop = packet.pts + (packet.duration or frame)
            end = stop if end is None else max(end, stop)
        return end

    try:
        if container.duration is not None:
            container.seek(container.duration + (container.start_time or 0))
            end = scan()
            if end is not None:
                return end
        container.seek(container.start_time or 0)
        return scan()
    except av.FFmpegError:
        return None


def _track_seconds(
    container: av.container.InputContainer, stream: av.stream.Stream, start: int
) -> float | None:
    """A stream's length from ``start`` (in its time base) to where its last packet ends (None
    when no packet is timed)."""
    end = _last_end(container, stream)
    if end is None or stream.time_base is None:
        return None
    return max(0.0, float((end - start) * stream.time_base))


def _video_seconds(
    container: av.container.InputContainer, stream: av.video.stream.VideoStream, timed: bool
) -> float:
    """The video stream's length (see :class:`MediaInfo`'s ``duration``); its packets are
    measured only when they are ``timed`` (the first ones had timestamps: a raw ``.h264``
    stream's have none)."""
    announced = announced_duration(stream, container)
    if announced is not None:
        return announced
    measured = _track_seconds(container, stream, stream.start_time or 0) if timed else None
    if measured is not None:
        return measured
    return _seconds(container) or 0.0


def _audio_seconds(container: av.container.InputContainer, sound: av.stream.Stream) -> float:
    """The sound stream's length (see :class:`MediaInfo`'s ``audio_duration``)."""
    if sound.duration is not None and sound.time_base is not None:
        return float(sound.duration * sound.time_base)
    end = tagged_end(sound)
    if end is not None:
        return max(0.0, end - max(0.0, stream_start(sound)))
    whole = _seconds(container)
    if whole is not None:
        return whole
    return _track_seconds(container, sound, max(0, sound.start_time or 0)) or 0.0


def probe(path: Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> MediaInfo:
    """Read a video file's duration, fps, frame count, size, codecs, rotation, byte size and
    whether its frame rate varies.

    Raises :class:`MediaError` naming the path for a missing, unreadable or non-video file, and
    for a video whose picture is larger than ``max_pixels`` (default
    :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192; 0: no limit), with its size
    and the limit in the message, before any frame is decoded (``probe(path, max_pixels=0)``
    reads it all the same). Only the first frame is decoded (to check that the stream decodes
    and to read its rotation)."""
    path = Path(path)
    with open_video(path, max_pixels=pixel_limit(max_pixels)) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        first, durations = _scan(container, stream, path)
        rotation = frame_rotation(first, stream)
        container_duration = _seconds(container)
        duration = _video_seconds(container, stream, durations is not None)
        audio = container.streams.audio
        audio_duration = _audio_seconds(container, audio[0]) if audio else None
        frames = announced_frames(stream)
        if not frames and duration and fps:
            frames = max(1, round(duration * fps))
        return MediaInfo(
            path=path,
            duration=duration,
            fps=fps,
            frames=frames,
            width=stream.width,
            height=stream.height,
            video_codec=stream.codec_context.name,
            pix_fmt=stream.pix_fmt,
            audio_codec=audio[0].codec_context.name if audio else None,
            rotation=rotation,
            size=path.stat().st_size,
            container=container.format.name,
            audio_duration=audio_duration,
            variable_frame_rate=_variable(durations),
            container_duration=container_duration,
        )
