"""``normalise``: any video into an H.264 MP4 of a chosen size, frame rate and pixel format."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from framepipe.errors import MediaError
from framepipe.media.atomic import atomic_output
from framepipe.media.decoding import decode_source, open_video
from framepipe.media.limits import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    DEFAULT_MAX_PIXELS,
    LengthGuard,
    check_length,
    check_output_size,
    length_limit,
    pixel_limit,
)
from framepipe.media.progress import Progress, ProgressCallback
from framepipe.media.rotation import Upright, frame_rotation
from framepipe.media.timing import estimate_frames, resample, stream_rate
from framepipe.media.writer import H264Writer, fit_size

__all__ = ["normalise"]


def normalise(
    src: Path | str,
    dst: Path | str,
    *,
    width: int | None = None,
    height: int | None = None,
    fps: float | Fraction | None = None,
    pix_fmt: str = "yuv420p",
    crf: int = 23,
    preset: str = "medium",
    audio: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
    progress: ProgressCallback | None = None,
) -> Path:
    """Re-encode ``src`` into an H.264 MP4 at ``dst`` (libx264; sound as AAC).

    Rotation: a clip with a display rotation (a phone's portrait video) comes out upright,
    turned as players turn it, and the output carries no rotation; ``width``/``height`` are
    of the upright picture. Given only ``width`` or ``height``, the other side keeps the
    aspect ratio; sides are made even. ``fps`` converts to a constant frame rate: frames are
    dropped or repeated by their timestamps (see :func:`~framepipe.media.timing.resample`), so a
    variable frame rate (gaps, bursts) comes out constant, in order, lasting as long as the
    source's video within half an output frame. By default the source's average rate is kept.

    Size limit: a source whose picture is larger than ``max_pixels`` (default
    :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192; 0: no limit) is refused with a
    :class:`MediaError` naming it, its size and the limit, before any frame is decoded; a
    requested output larger than the limit is a :class:`ValueError`. A large source within the
    limit (4K to 720p) is decoded frame by frame, never held whole.

    Length limit: a source whose header announces a longer media than ``max_duration``
    seconds (default :data:`~framepipe.media.DEFAULT_MAX_DURATION`, 6 hours) or more frames
    than ``max_frame_count`` (default :data:`~framepipe.media.DEFAULT_MAX_FRAME_COUNT`; 0: no
    limit, each), or an output at ``fps`` that would hold more frames, is refused with a
    :class:`MediaError` naming it, the length and the limit, before any frame is decoded. A
    source whose header tells less (a raw ``.h264`` stream tells nothing) is stopped with a
    :class:`MediaError` at the frame (or sound) that passes the limit, and so is the output at
    the frame that passes it; nothing is left at ``dst``.

    Audio: the first audio stream is kept (``audio=False`` drops it), re-encoded to AAC at its
    own rate (48 kHz if AAC lacks that rate), mono or stereo, aligned with the video's start;
    it is not cut at the video's end. A source without audio gives an output without audio.

    ``progress`` gets 0-100 (output frames done / expected). The write is atomic. A file whose
    header announces more frames, or a longer video, than can be decoded (a truncated upload)
    is a :class:`MediaError`, not a short output (see
    :func:`~framepipe.media.decoding.decode_source`); so is a video shorter than half a frame
    at ``fps``, whose output would hold no frame."""
    src, dst = Path(src), Path(dst)
    limit = pixel_limit(max_pixels)
    length = length_limit(max_duration, max_frame_count)
    with open_video(src, max_pixels=limit, length=length) as (container, stream):
        src_rate = stream_rate(stream)
        out_rate = Fraction(fps).limit_denominator(1001) if fps else src_rate
        if out_rate <= 0:
            raise ValueError(f"fps must be positive, not {fps}")
        total = round(estimate_frames(stream, container) * out_rate / src_rate)
        check_length(src, length, frames=total, what=f"at {float(out_rate):g} fps its output holds")
        source = decode_source(container, stream, src, audio=audio, limit=length)
        turn = Upright(frame_rotation(source.first, stream))
        out_w, out_h = fit_size(*turn.size(stream.width, stream.height), width, height)
        check_output_size(out_w, out_h, limit)
        report = Progress(progress, total)
        with (
            atomic_output(dst) as tmp,
            H264Writer(
                tmp,
                width=out_w,
                height=out_h,
                fps=out_rate,
                crf=crf,
                preset=preset,
                pix_fmt=pix_fmt,
                audio=source.audio,
                guard=LengthGuard(src, length, "its output", writing=True),
            ) as writer,
        ):
            for frame in turn.frames(resample(source.frames, src_rate, out_rate)):
                writer.write(frame)
                report.step()
            if report.done == 0:  # nothing is left at dst: an empty MP4 is no video
                raise MediaError(
                    src,
                    f"its video lasts less than half a frame at {float(out_rate):g} fps "
                    f"({0.5 / float(out_rate):.3g} s), so the output would hold no frame: "
                    "ask for a higher fps, or none to keep its own rate",
                )
    report.finish()
    return dst
