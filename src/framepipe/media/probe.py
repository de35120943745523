"""``probe``: what a video file holds."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import av.container
import av.video.stream

from framepipe.errors import MediaError
from framepipe.media.decoding import open_video
from framepipe.media.limits import DEFAULT_MAX_PIXELS, pixel_limit
from framepipe.media.rotation import frame_rotation
from framepipe.media.timing import estimate_frames

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
    ``frames`` comes from the container header (the frames that play: not those an edit list
    hides, as a trim with ``ffmpeg -ss ... -c copy`` leaves), else it is estimated from
    duration x fps.
    ``fps`` is the average frame rate (frames / duration; for a variable frame rate, the
    average) unless the container gives none, then FFmpeg's guess.
    ``audio_duration`` is the first audio stream's length in seconds (None without audio).

    ``variable_frame_rate`` is a hint read from the frames' timestamps (not decoded): True when
    some frame lasts more than 10 % (and more than one timestamp tick) longer or shorter than
    the median frame, as after a gap, a burst or a camera changing its rate; False when every
    frame lasts about the same; None when the timestamps are missing (a raw ``.h264`` stream).
    All timestamps are read from a complete index (MP4), else the first :data:`SCAN_PACKETS`
    packets, so a change further into such a file goes unnoticed.
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
) -> tuple[av.VideoFrame | None, list[int]]:
    """The first frame (decoded) and the frames' timestamps in the stream's time base, sorted:
    all of them from the index when it lists every frame, else those of the first
    :data:`SCAN_PACKETS` packets (demuxed, not decoded), in one pass from the start. A decode
    error before the first frame is a :class:`MediaError`; a read error after it ends the
    sample (the operations that read the whole file report a broken one)."""
    entries = stream.index_entries
    indexed = bool(stream.frames) and len(entries) >= stream.frames
    stamps = (
        [e.timestamp for e in itertools.islice(entries, INDEX_TIMESTAMPS) if not e.is_discard]
        if indexed
        else []
    )
    first: av.VideoFrame | None = None
    scanned = 0
    try:
        for packet in container.demux(stream):
            if not indexed and packet.size and scanned < SCAN_PACKETS:
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
    return first, sorted(stamps)


def _variable(stamps: list[int]) -> bool | None:
    """True when a frame's duration differs from the median's by over 10 % and one tick."""
    durations = [b - a for a, b in itertools.pairwise(stamps) if b > a]
    if not durations:
        return None if not stamps else False
    median = statistics.median(durations)
    return any(abs(d - median) > max(0.1 * median, 1) for d in durations)


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
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        first, stamps = _scan(container, stream, path)
        rotation = frame_rotation(first, stream)
        audio = container.streams.audio
        audio_duration = None
        if audio:
            sound = audio[0]
            if sound.duration is not None and sound.time_base is not None:
                audio_duration = float(sound.duration * sound.time_base)
            else:
                audio_duration = duration
        return MediaInfo(
            path=path,
            duration=duration,
            fps=fps,
            frames=estimate_frames(stream, container),
            width=stream.width,
            height=stream.height,
            video_codec=stream.codec_context.name,
            pix_fmt=stream.pix_fmt,
            audio_codec=audio[0].codec_context.name if audio else None,
            rotation=rotation,
            size=path.stat().st_size,
            container=container.format.name,
            audio_duration=audio_duration,
            variable_frame_rate=_variable(stamps),
        )
