"""``probe``: what a video file holds."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import av.container
import av.packet
import av.stream
import av.video.stream

from framepipe.errors import MediaError
from framepipe.media.decoding import open_video
from framepipe.media.limits import DEFAULT_MAX_PIXELS, pixel_limit
from framepipe.media.progress import check_stop
from framepipe.media.rotation import frame_rotation
from framepipe.video_length import (
    announced_duration,
    announced_frames,
    plays,
    stream_start,
    tagged_end,
    video_duration,
)

__all__ = ["INDEX_TIMESTAMPS", "SCAN_PACKETS", "MediaInfo", "probe"]

INDEX_TIMESTAMPS = 100_000
"""At most this many frame timestamps (the first, in decoding order) are read from a
container's index (an MP4's sample table, no I/O) to tell a variable frame rate."""
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
    ``duration`` is the video stream's length in seconds
    (:func:`~framepipe.video_length.video_duration`): the stream's own (MP4, MOV: after the
    edit list), else its track's ``DURATION`` tag (Matroska/WebM written by FFmpeg or
    mkvmerge), else the container's when the video is its only stream, else where its last
    packet ends (its pts plus its duration, from the stream's start; not for a stream without
    timestamps), else the container's.
    ``container_duration`` is the container's (its longest stream's: a sound track longer
    than the video makes it longer than ``duration``; None when it gives none).
    ``frames`` comes from the container header (the frames that play: not those an edit list
    hides, as a trim with ``ffmpeg -ss ... -c copy`` leaves), else it is estimated from
    ``duration`` x fps.
    ``fps`` is the average frame rate (frames / duration; for a variable frame rate, the
    average) unless the container gives none, then FFmpeg's guess.
    ``audio_duration`` is the first audio stream's length in seconds (None without audio): the
    stream's own, else its ``DURATION`` tag, else where its last packet ends (from the
    stream's start, or from 0 when that is negative: the encoder's priming, which the decoder
    drops), else the container's. (A stream FFmpeg met no packet of while opening the file,
    as the sound of a file that holds seconds of video before it, is given the container's
    start and duration as its own, and that is then taken as the stream's.)

    Where the video's and the sound's last packets end is measured only for the streams the
    header gives no length (a Matroska file written to a pipe or live, a browser's
    recording), in one demux pass (not decoded) over those streams together. With a
    container duration, the pass starts at the keyframe before it (with an index, as
    Matroska's cues, only the file's tail is read; without one, the seek reads its way
    there), and a stream that has no packet there (the video of a file whose sound outlasts
    it, or a container duration that is wrong) is measured in a second pass, from the start.
    Without one (a live Matroska), the pass from the start that reads the frame-rate sample
    goes on to the end: the file is read once.

    ``variable_frame_rate`` is a hint read from the timestamps of the frames that play (not
    decoded; not the frames an edit list hides): True when some frame lasts more than 10 %
    (and more than one timestamp tick) longer or shorter than the median frame, as after a
    gap, a burst or a camera changing its rate; False when every frame lasts about the same;
    None when the timestamps are missing (a raw ``.h264`` stream). With a complete index (MP4,
    MOV) each frame's duration is its sample's (to the next sample's decoding time), for the
    samples among the index's first :data:`INDEX_TIMESTAMPS` (100,000, in decoding order:
    over an hour at 25 fps) less the last of them; else the frames are those of the first
    :data:`SCAN_PACKETS` packets that play. A change further into the file goes unnoticed.
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


class _Ends:
    """Where each measured stream's last packet that plays (:func:`~framepipe.video_length.
    plays`) ends, told its packets as they are demuxed: the largest pts plus duration, in the
    stream's time base (a video packet without a duration lasts one frame at the stream's
    rate; a packet without a pts is not timed)."""

    def __init__(self, streams: list[av.stream.Stream]) -> None:
        self.streams = {stream.index: stream for stream in streams}
        self.ends: dict[int, int] = {}
        self._frame: dict[int, int] = {}
        for stream in streams:
            ticks = 0
            if isinstance(stream, av.video.stream.VideoStream):
                rate = stream.average_rate or stream.guessed_rate
                if rate and stream.time_base:
                    ticks = round(1 / (rate * stream.time_base))
            self._frame[stream.index] = ticks

    def add(self, packet: av.packet.Packet[Any]) -> None:
        stream = self.streams.get(packet.stream_index)
        if stream is None or packet.pts is None or not packet.size:
            return
        if not plays(packet, stream.start_time):
            return
        stop = packet.pts + (packet.duration or self._frame[stream.index])
        end = self.ends.get(stream.index)
        self.ends[stream.index] = stop if end is None else max(end, stop)

    def drop(self, stream: av.stream.Stream) -> None:
        """Measure ``stream`` no more (its packets are not timed)."""
        self.streams.pop(stream.index, None)
        self.ends.pop(stream.index, None)

    def missing(self) -> list[av.stream.Stream]:
        """The measured streams no packet was timed for yet."""
        return [stream for index, stream in self.streams.items() if index not in self.ends]

    def seconds(self, stream: av.stream.Stream, start: int) -> float | None:
        """The stream's length from ``start`` (in its time base) to where its last packet
        ends (None: not measured, or no packet timed)."""
        end = self.ends.get(stream.index)
        if end is None or stream.time_base is None:
            return None
        return max(0.0, float((end - start) * stream.time_base))


def _scan(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    ends: _Ends,
) -> tuple[av.VideoFrame | None, list[int] | None]:
    """The first frame (decoded) and the durations of the frames that play (:func:`~framepipe.
    video_length.plays`), in the stream's time base (None: no timestamps to tell them by), in
    one pass from the start.

    When the index lists every frame (an MP4/MOV's sample table, read with the header), a
    frame's duration is from its sample's decoding time to the next sample's, for the samples
    the index does not flag as hidden by an edit list, among its first
    :data:`INDEX_TIMESTAMPS`: the index has decoding times only, and with B-frames the hidden
    samples of a trim are interleaved in decoding order with the shown ones, so the gaps
    between the shown samples' times are not their durations. Else the first
    :data:`SCAN_PACKETS` packets that play are demuxed (not decoded): the gaps between their
    presentation times, sorted.

    When ``ends`` measures streams, the pass goes on to the end of the file, over the video
    and those streams, and tells ``ends`` each of their packets: the measurement and the
    sample in one read of the file (for a file whose end cannot be sought: no container
    duration). The video is measured no more once the sample found its packets untimed.
    Else the pass stops once the sample is taken.

    A decode error before the first frame is a :class:`MediaError`; a read error after it ends
    the pass (the operations that read the whole file report a broken one; ``ends`` keeps
    where the packets read until then end)."""
    indexed = bool(stream.frames) and len(stream.index_entries) >= stream.frames
    durations = _index_durations(stream) if indexed else None
    others = [other for other in ends.streams.values() if other.index != stream.index]
    stamps: list[int] = []
    start = stream.start_time
    first: av.VideoFrame | None = None
    scanned = 0
    sampled = False
    try:
        for packet in container.demux(stream, *others):
            check_stop()
            ends.add(packet)
            if sampled or packet.stream_index != stream.index:
                continue
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
                sampled = True
                if not indexed and not stamps:
                    ends.drop(stream)
                if not ends.streams:
                    break
    except av.FFmpegError as exc:
        if first is None:
            raise MediaError(path, f"the video stream cannot be decoded ({exc})") from exc
    if not indexed and stamps:
        stamps.sort()
        durations = [b - a for a, b in itertools.pairwise(stamps) if b > a]
    return first, durations


def _index_durations(stream: av.video.stream.VideoStream) -> list[int] | None:
    """The durations of the samples among the index's first :data:`INDEX_TIMESTAMPS` (in
    decoding order) that it does not flag as hidden, each to the next sample's decoding time
    (the last of them has no next: it is left out); None when it flags all of them."""
    listed = list(itertools.islice(stream.index_entries, INDEX_TIMESTAMPS))
    if all(entry.is_discard for entry in listed):
        return None
    return [
        after.timestamp - entry.timestamp
        for entry, after in itertools.pairwise(listed)
        if not entry.is_discard and after.timestamp > entry.timestamp
    ]


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


def _measure_from_the_end(container: av.container.InputContainer, ends: _Ends) -> None:
    """Tell ``ends`` the packets of the streams it measures, for a file with a container
    duration: those from the keyframe before the container's end (with an index, as Matroska's
    cues, the seek reads only the tail; without one the demuxer reads its way there); then,
    for the streams that had no timed packet there (a seek that lands after a stream's last
    packet: a video shorter than its sound, or a container duration too long), all their
    packets in one pass from the start. A read error ends a pass (``ends`` keeps what it was
    told)."""
    begin = container.start_time or 0
    tail = [] if container.duration is None else [container.duration + begin]
    for seek_to in [*tail, begin]:
        missing = ends.missing()
        if not missing:
            return
        try:
            container.seek(seek_to)
            for packet in container.demux(*missing):
                check_stop()
                ends.add(packet)
        except av.FFmpegError:
            continue


def _audio_seconds(
    container: av.container.InputContainer, sound: av.stream.Stream, ends: _Ends
) -> float:
    """The sound stream's length (see :class:`MediaInfo`'s ``audio_duration``)."""
    announced = _announced_audio(sound)
    if announced is not None:
        return announced
    measured = ends.seconds(sound, max(0, sound.start_time or 0))
    if measured is not None:
        return measured
    return _seconds(container) or 0.0


def _announced_audio(sound: av.stream.Stream) -> float | None:
    """The sound stream's own duration, else its ``DURATION`` tag's end from its start (from
    0 when that is negative: the encoder's priming, which the decoder drops); None: neither."""
    if sound.duration is not None and sound.time_base is not None:
        return float(sound.duration * sound.time_base)
    end = tagged_end(sound)
    if end is not None:
        return max(0.0, end - max(0.0, stream_start(sound)))
    return None


def probe(path: Path | str, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> MediaInfo:
    """Read a video file's duration, fps, frame count, size, codecs, rotation, byte size and
    whether its frame rate varies.

    Raises :class:`MediaError` naming the path for a missing, unreadable or non-video file, and
    for a video whose picture is larger than ``max_pixels`` (default
    :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192; 0: no limit), with its size
    and the limit in the message, before any frame is decoded (``probe(path, max_pixels=0)``
    reads it all the same). Only the first frame is decoded (to check that the stream decodes
    and to read its rotation). What is read besides the header: the first
    :data:`SCAN_PACKETS` video packets when the index does not list every frame, and the
    packets :class:`MediaInfo` measures a stream's length by when the header gives none
    (demuxed, not decoded). So ``probe`` takes no length limit: it tells a file's length, and
    the operations that decode its frames refuse a file longer than theirs."""
    path = Path(path)
    with open_video(path, max_pixels=pixel_limit(max_pixels), length=None) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        audio = container.streams.audio
        sound = audio[0] if audio else None
        measure: list[av.stream.Stream] = []
        if announced_duration(stream, container) is None:
            measure.append(stream)
        if sound is not None and _announced_audio(sound) is None:
            measure.append(sound)
        ends = _Ends(measure)
        in_one_pass = bool(measure) and container.duration is None
        first, durations = _scan(container, stream, path, ends if in_one_pass else _Ends([]))
        rotation = frame_rotation(first, stream)
        if measure and not in_one_pass:
            if durations is None:
                ends.drop(stream)  # its packets are not timed
            _measure_from_the_end(container, ends)
        measured = ends.seconds(stream, stream.start_time or 0)
        duration = video_duration(stream, container, measured) or 0.0
        audio_duration = _audio_seconds(container, sound, ends) if sound is not None else None
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
            container_duration=_seconds(container),
        )
