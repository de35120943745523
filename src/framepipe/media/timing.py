"""Time in a video: a stream's rate, start and length, frames' timestamps, and conversion to a
constant frame rate by timestamp (so a variable frame rate comes out constant, in order and in
time)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from fractions import Fraction

import av
import av.container
import av.video.stream

__all__ = [
    "announced_duration",
    "estimate_frames",
    "frame_duration",
    "frame_seconds",
    "resample",
    "stream_rate",
    "stream_start",
]


def stream_start(stream: av.video.stream.VideoStream) -> float:
    """The stream's start time in seconds (0 when unknown)."""
    if stream.start_time is not None and stream.time_base is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def stream_rate(stream: av.video.stream.VideoStream) -> Fraction:
    """The stream's frame rate (average, else guessed, else 25)."""
    rate = stream.average_rate or stream.guessed_rate
    return Fraction(rate) if rate else Fraction(25)


def announced_duration(
    stream: av.video.stream.VideoStream, container: av.container.InputContainer
) -> float | None:
    """The video stream's length in seconds as the file's header announces it (None when it
    announces none): the stream's own duration (MP4, MOV; TS's estimate), else the track's
    ``DURATION`` tag (Matroska/WebM, written by FFmpeg and mkvmerge: the track's end time, less
    the stream's start), else the container's duration when the video is its only stream (with
    sound, that may be the sound's length)."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    for name, value in (stream.metadata or {}).items():
        if name.upper() == "DURATION" or name.upper().startswith("DURATION-"):
            end = _clock_seconds(str(value))
            if end is not None:
                return max(0.0, end - stream_start(stream))
    if container.duration is not None and len(container.streams) == 1:
        return float(container.duration / av.time_base)
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


def estimate_frames(
    stream: av.video.stream.VideoStream, container: av.container.InputContainer
) -> int:
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


def resample(
    frames: Iterator[av.VideoFrame], src_rate: Fraction, out_rate: Fraction
) -> Iterator[av.VideoFrame]:
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
