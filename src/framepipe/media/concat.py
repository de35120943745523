"""``concat``: intro + main + splash screen into one H.264 MP4."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from framepipe.errors import MediaError
from framepipe.media.atomic import atomic_output
from framepipe.media.audio import AudioFormat, AudioQueue, audio_format
from framepipe.media.decoding import decode, decode_source, media_seconds, open_video, peek
from framepipe.media.limits import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    DEFAULT_MAX_PIXELS,
    LengthGuard,
    LengthLimit,
    check_length,
    check_output_size,
    length_limit,
    pixel_limit,
)
from framepipe.media.progress import Progress, ProgressCallback
from framepipe.media.rotation import Upright, frame_rotation
from framepipe.media.timing import estimate_frames, resample, stream_rate
from framepipe.media.writer import H264Writer, even

__all__ = ["concat"]


def _fit(frames: Iterator[av.VideoFrame], width: int, height: int) -> Iterator[av.VideoFrame]:
    """Scale each frame to fit ``width`` x ``height`` keeping its aspect; pad with black."""
    for frame in frames:
        if frame.width * height == frame.height * width:
            yield frame  # same aspect: the writer scales it
            continue
        factor = min(width / frame.width, height / frame.height)
        w, h = even(frame.width * factor), even(frame.height * factor)
        w, h = min(w, width), min(h, height)
        small = frame.reformat(
            width=w, height=h, format="bgr24", interpolation="BICUBIC"
        ).to_ndarray()
        top, left = (height - h) // 2, (width - w) // 2
        padded = cv2.copyMakeBorder(
            small,
            top,
            height - h - top,
            left,
            width - w - left,
            cv2.BORDER_CONSTANT,
            value=(0, 0, 0),
        )
        yield av.VideoFrame.from_ndarray(np.asarray(padded, dtype=np.uint8), format="bgr24")


@dataclass(frozen=True)
class _Part:
    path: Path
    frames: int
    seconds: float  # as its header announces (0: it announces none)
    rate: Fraction
    width: int  # upright
    height: int
    rotation: int
    audio: AudioFormat | None


def _survey(path: Path, limit: int, length: LengthLimit) -> _Part:
    with open_video(path, max_pixels=limit, length=length) as (container, stream):
        first, _ = peek(decode(container, stream, path, limit=length))
        if first is None:
            raise MediaError(path, "holds no decodable video frames")
        turn = Upright(frame_rotation(first, stream))
        width, height = turn.size(stream.width, stream.height)
        sound = container.streams.audio
        return _Part(
            path,
            estimate_frames(stream, container),
            media_seconds(container, stream) or 0.0,
            stream_rate(stream),
            width,
            height,
            turn.rotation,
            audio_format(sound[0]) if sound else None,
        )


def concat(
    parts: Sequence[Path | str],
    dst: Path | str,
    *,
    width: int | None = None,
    height: int | None = None,
    fps: float | Fraction | None = None,
    crf: int = 23,
    preset: str = "medium",
    audio: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
    progress: ProgressCallback | None = None,
) -> Path:
    """Join ``parts`` (e.g. intro, main clip, splash screen) into one H.264 MP4 at ``dst``.

    Every part is re-encoded to one size and frame rate: ``width``/``height``/``fps`` when
    given, else the first part's (upright: a part with a display rotation is turned upright
    first, and the output has no rotation). A part of another aspect ratio is letterboxed
    (scaled to fit, padded black); another frame rate is converted (frames dropped or
    repeated).

    Audio: when any part has sound (and ``audio`` is true) the output has one AAC track at
    the first such part's rate, stereo if any part is stereo. Each part's sound is aligned with
    its video and made exactly as long as that part's video (cut, or padded with silence), so
    the parts stay in sync; a part without sound contributes silence. When no part has
    sound, the output has none.

    Size limit: each part is checked before it is decoded, and a part whose picture is
    larger than ``max_pixels`` (default :data:`~framepipe.media.DEFAULT_MAX_PIXELS`,
    8192 x 8192; 0: no limit) is refused with a :class:`MediaError` naming that part, its size
    and the limit; a requested output larger than the limit is a :class:`ValueError`. A
    truncated part (its header announces more than can be decoded, see
    :func:`~framepipe.media.decoding.decode_source`) is a :class:`MediaError` naming it, not a
    short part.

    Length limit: each part is held to ``max_duration`` seconds and ``max_frame_count`` frames
    (defaults :data:`~framepipe.media.DEFAULT_MAX_DURATION`, 6 hours, and
    :data:`~framepipe.media.DEFAULT_MAX_FRAME_COUNT`; 0: no limit, each) as
    :func:`~framepipe.media.normalise` holds its source, and so is the joined output: parts
    whose headers announce more together are refused before any is decoded, with a
    :class:`MediaError` naming the part that passes the limit, and the output is stopped at
    the frame that passes it (naming the part being joined then). Atomic write."""
    paths = [Path(p) for p in parts]
    if not paths:
        raise ValueError("concat needs at least one part")
    limit = pixel_limit(max_pixels)
    length = length_limit(max_duration, max_frame_count)
    survey = [_survey(path, limit, length) for path in paths]
    first = survey[0]
    out_w = even(width if width is not None else first.width)
    out_h = even(height if height is not None else first.height)
    check_output_size(out_w, out_h, limit)
    out_rate = Fraction(fps).limit_denominator(1001) if fps else first.rate
    total, seconds = 0, 0.0
    for part in survey:  # each part is within the limit (open_video): are they together?
        total += round(part.frames * out_rate / part.rate)
        seconds += part.seconds
        joined_at = f"joined at {float(out_rate):g} fps, the parts up to this one make"
        check_length(part.path, length, seconds=seconds, frames=total, what=joined_at)
    sounds = [part.audio for part in survey if part.audio is not None] if audio else []
    queue = None
    if sounds:
        stereo = any(fmt.layout == "stereo" for fmt in sounds)
        queue = AudioQueue(AudioFormat(sounds[0].rate, "stereo" if stereo else "mono"))
    dst = Path(dst)
    report = Progress(progress, total)
    joined = LengthGuard(first.path, length, "the joined output, at this part,", writing=True)
    with (
        atomic_output(dst) as tmp,
        H264Writer(
            tmp,
            width=out_w,
            height=out_h,
            fps=out_rate,
            crf=crf,
            preset=preset,
            audio=queue,
            guard=joined,
        ) as writer,
    ):
        for part in survey:
            before = writer.frames
            joined.path = part.path
            with open_video(part.path, max_pixels=limit, length=length) as (container, stream):
                source = decode_source(
                    container,
                    stream,
                    part.path,
                    audio=queue if queue is not None else False,
                    limit=length,
                )
                turn = Upright(part.rotation)
                for frame in _fit(
                    turn.frames(resample(source.frames, part.rate, out_rate)), out_w, out_h
                ):
                    writer.write(frame)
                    report.step()
            if writer.frames == before:
                raise MediaError(part.path, "holds no decodable video frames")
            writer.end_part()
    report.finish()
    return dst
