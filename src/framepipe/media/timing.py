"""Time in a video: a stream's rate, start and length, frames' timestamps, and conversion to a
constant frame rate by timestamp (so a variable frame rate comes out constant, in order and in
time). The stream's rate, start and announced length and the frames' times are
:mod:`framepipe.video_length`'s (the sources use them too), re-exported here."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import av
import av.container
import av.video.stream

from framepipe.video_length import (
    announced_duration,
    announced_frames,
    frame_duration,
    frame_seconds,
    stream_rate,
    stream_start,
    video_duration,
)

__all__ = [
    "announced_duration",
    "announced_frames",
    "estimate_frames",
    "frame_duration",
    "frame_seconds",
    "resample",
    "stream_rate",
    "stream_start",
    "video_duration",
]


def estimate_frames(
    stream: av.video.stream.VideoStream, container: av.container.InputContainer
) -> int:
    """The stream's frame count from the header (the frames that play:
    :func:`~framepipe.video_length.announced_frames`), else its length as the header tells it
    (:func:`~framepipe.video_length.video_duration`: the video's announced length, not a longer
    sound track's, else the container's) x its frame rate (0: unknown). An estimate for
    progress totals: nothing is read."""
    frames = announced_frames(stream)
    if frames:
        return frames
    rate = stream.average_rate or stream.guessed_rate
    seconds = video_duration(stream, container)
    if seconds and rate:
        return max(1, round(seconds * float(rate)))
    return 0


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
