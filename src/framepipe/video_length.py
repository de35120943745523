"""How long a video stream is, as its header announces it and as decoded, and whether a file
was decoded whole: one rule for the media toolkit (:func:`framepipe.media.decoding.
decode_source`) and :class:`~framepipe.sources.VideoSource`.

A small module on PyAV alone, so that the sources use it without loading the media toolkit
(:mod:`framepipe.media.timing` re-exports its time helpers).

An MP4/MOV trimmed without re-encoding (``ffmpeg -ss 1 -t 2 -c copy``, a phone's trim) keeps
the samples it cut inside the file and hides them with an edit list: its header's frame count
(``nb_frames``) counts them, though they are never shown (FFmpeg's decoder drops them). The
lengths here are the ones that play: the frames its index does not mark as hidden, and the
stream's duration after the edit list (what the demuxer reports). Which packets play is one
rule (:func:`plays`): :func:`framepipe.media.probe`'s frame-rate hint and its measure of where
a stream ends, and the undecoded JPEG frames of :class:`~framepipe.sources.VideoSource` follow
it; the header's frame count (:func:`announced_frames`) follows the part of it an index
tells. How long the video is, as far as the header tells it, is one rule too
(:func:`video_duration`)."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import av
import av.container
import av.packet
import av.stream
import av.video.stream

__all__ = [
    "COMPLETE_SHARE",
    "DecodedLength",
    "announced_duration",
    "announced_frames",
    "frame_duration",
    "frame_seconds",
    "plays",
    "stream_rate",
    "stream_start",
    "tagged_end",
    "video_duration",
]

COMPLETE_SHARE = 0.95
"""A file's video is truncated when what was decoded comes to less than this share of what
its header announces, less two frames (see :meth:`DecodedLength.shortfall`)."""

_SLACK_FRAMES = 2


def stream_start(stream: av.stream.Stream) -> float:
    """The stream's start time in seconds (0 when unknown)."""
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def plays(packet: av.packet.Packet[Any], start: int | None) -> bool:
    """Whether a demuxed ``packet`` holds a frame that is shown, by two signs the packet
    carries: not when the demuxer flags it discard (the samples an MP4/MOV edit list hides, as
    a trim with ``ffmpeg -ss ... -c copy`` leaves them: the decoder decodes such a packet for
    its references and drops its frame), nor when it is timed before ``start``, the stream's
    start time in its time base (``stream.start_time``; None: unknown).

    The second sign is for a file that begins with an open GOP's leading pictures: a
    recording, or a copy of a stream, that starts at an I-frame whose B-frames come after it
    in decoding order but before it in time (in Matroska: FFmpeg takes the first packet's time
    for the stream's start, and flags nothing). They refer to a picture before the file, and
    FFmpeg's H.264 and MPEG-2 decoders drop them: with the sign, a count of the packets that
    play is the decoder's. (No result of today's callers changes by it: probe's frame-rate
    sample sorts the times, among which those pictures sit at the same spacing, and where a
    stream ends is its latest packet's end; an MJPEG stream has no such pictures. An MP4/MOV's
    start is where its edit list starts, and what comes before it is flagged.)

    The decoder's own decisions are not foreseen: a packet without a timestamp plays (``ffmpeg
    -ss ... -c copy`` of such a file leaves the leading pictures untimed, or at the start
    itself: they count here, though the decoder drops them), as does a picture that turns out
    not to decode. An index entry (``stream.index_entries``) tells only the flag:
    :func:`announced_frames` counts the entries not flagged."""
    if packet.is_discard:
        return False
    return start is None or packet.pts is None or packet.pts >= start


def stream_rate(stream: av.video.stream.VideoStream) -> Fraction:
    """The stream's frame rate (average, else guessed, else 25)."""
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else Fraction(25)


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


def announced_frames(stream: av.video.stream.VideoStream) -> int:
    """The frames the file's header counts that play (0: it counts none). With an index that
    lists every frame (an MP4/MOV's sample table, read with the header, no I/O), those it does
    not mark as hidden by an edit list; else the header's count as it is."""
    total = int(stream.frames or 0)
    if total <= 0:
        return 0
    entries = stream.index_entries
    if len(entries) < total:
        return total
    return sum(1 for entry in entries if not entry.is_discard)


def announced_duration(
    stream: av.video.stream.VideoStream, container: av.container.InputContainer
) -> float | None:
    """The video stream's length in seconds as the file's header announces it (None when it
    announces none): the stream's own duration (MP4, MOV: after the edit list; TS's
    estimate), else the track's ``DURATION`` tag (Matroska/WebM, written by FFmpeg and
    mkvmerge: the track's end time, less the stream's start), else the container's duration
    when the video is its only stream (with sound, that may be the sound's length)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    end = tagged_end(stream)
    if end is not None:
        return max(0.0, end - stream_start(stream))
    if container.duration is not None and len(container.streams) == 1:
        return float(container.duration / av.time_base)
    return None


def video_duration(
    stream: av.video.stream.VideoStream,
    container: av.container.InputContainer,
    measured: float | None = None,
) -> float | None:
    """The video stream's length in seconds, one rule for :func:`framepipe.media.probe`, the
    media steps' frame estimates (:func:`framepipe.media.timing.estimate_frames`) and the
    thumbnails' times: its announced length (:func:`announced_duration`: the stream's own, its
    track's ``DURATION`` tag, the container's when the video is the file's only stream), else
    ``measured`` (where the caller found the stream's packets to end, from its start: probe
    measures; the others read no packet for it and pass None), else the container's duration
    (None when there is none).

    The container's is an estimate, the one left when nothing in the header is the video's
    own (a Matroska file written to a pipe or live, a browser's recording): it is the longest
    stream's, so with a sound track that outlasts the video it is the sound's length, too long
    for the video (a thumbnail's "middle" then falls late, a frame estimate comes out high);
    with sound as long as the video, the usual case, it is about right."""
    announced = announced_duration(stream, container)
    if announced is not None:
        return announced
    if measured is not None:
        return measured
    if container.duration is not None:
        return float(container.duration / av.time_base)
    return None


def tagged_end(stream: av.stream.Stream) -> float | None:
    """Where the stream ends, in seconds, as its ``DURATION`` tag says (Matroska/WebM, written
    by FFmpeg and mkvmerge: the track's last timestamp plus its duration; None without it)."""
    for name, value in (stream.metadata or {}).items():
        if name.upper() == "DURATION" or name.upper().startswith("DURATION-"):
            end = _clock_seconds(str(value))
            if end is not None:
                return end
    return None


def _clock_seconds(text: str) -> float | None:
    """``HH:MM:SS.fraction`` in seconds (None if it is not that)."""
    parts = text.strip().split(":")
    if len(parts) != 3:
        return None
    try:
        seconds = int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) else None


class DecodedLength:
    """What has been decoded of one pass over a file's video stream, told each frame in
    presentation order (:meth:`add`), and whether that is the whole of it (:meth:`shortfall`).
    Read the header (``shortfall``) before the container is closed."""

    def __init__(
        self, stream: av.video.stream.VideoStream, container: av.container.InputContainer
    ) -> None:
        self.stream = stream
        self.container = container
        self.rate = stream_rate(stream)
        self.frames = 0
        self.end = stream_start(stream)

    def add(self, frame: av.VideoFrame) -> None:
        """Count ``frame``; the decoded video now ends where it ends (its time plus its own
        duration, :func:`frame_seconds`, :func:`frame_duration`)."""
        self.end = frame_seconds(frame, self.frames, self.rate) + frame_duration(frame, self.rate)
        self.frames += 1

    @property
    def seconds(self) -> float:
        """The decoded video's length: from the stream's start to the end of its last frame."""
        return max(0.0, self.end - stream_start(self.stream))

    def shortfall(self) -> str | None:
        """None when the file was decoded whole (or cannot be judged), else why it is taken for
        truncated (an interrupted upload, whose header still announces the whole video):
        ``"truncated: its header announces ... but only ... could be decoded"``.

        When the header counts frames (MP4, MOV: :func:`announced_frames`, so frames an edit
        list hides are not expected), fewer decoded than :data:`COMPLETE_SHARE` of that count
        less two; else, when it announces a duration (:func:`announced_duration`: Matroska/
        WebM's track duration ...), decoded video (:attr:`seconds`) short of that share of it
        less two frames. A file whose header announces neither (MPEG-TS, a raw stream: their
        length is estimated from what is there) is never judged truncated."""
        expected = announced_frames(self.stream)
        if expected:
            if self.frames < COMPLETE_SHARE * expected - _SLACK_FRAMES:
                return (
                    f"truncated: its header announces {expected} frames but only "
                    f"{self.frames} could be decoded"
                )
            return None
        announced = announced_duration(self.stream, self.container)
        slack = _SLACK_FRAMES / float(self.rate)
        if announced and self.seconds < COMPLETE_SHARE * announced - slack:
            return (
                f"truncated: its header announces {announced:.2f} s of video but only "
                f"{self.seconds:.2f} s could be decoded"
            )
        return None
