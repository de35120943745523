"""``concat``: intro + main + splash screen into one H.264 MP4."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from framepipe.errors import MediaError
from framepipe.media._io import (
    H264Writer,
    Progress,
    ProgressCallback,
    atomic_output,
    decode,
    estimate_frames,
    even,
    open_video,
    resample,
    stream_rate,
)

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
        small = frame.reformat(width=w, height=h, format="bgr24",
                               interpolation="BICUBIC").to_ndarray()
        top, left = (height - h) // 2, (width - w) // 2
        padded = cv2.copyMakeBorder(small, top, height - h - top, left, width - w - left,
                                    cv2.BORDER_CONSTANT, value=(0, 0, 0))
        yield av.VideoFrame.from_ndarray(np.asarray(padded, dtype=np.uint8), format="bgr24")


def concat(parts: Sequence[Path | str], dst: Path | str, *, width: int | None = None,
           height: int | None = None, fps: float | Fraction | None = None, crf: int = 23,
           preset: str = "medium", progress: ProgressCallback | None = None) -> Path:
    """Join ``parts`` (e.g. intro, main clip, splash screen) into one H.264 MP4 at ``dst``.

    Every part is re-encoded to one size and frame rate: ``width``/``height``/``fps`` when
    given, else the first part's. A part of another aspect ratio is letterboxed (scaled to fit,
    padded black); another frame rate is converted (frames dropped or repeated). Video only.
    Atomic write."""
    paths = [Path(p) for p in parts]
    if not paths:
        raise ValueError("concat needs at least one part")
    with open_video(paths[0]) as (_, first):
        out_w = even(width if width is not None else first.width)
        out_h = even(height if height is not None else first.height)
        out_rate = Fraction(fps).limit_denominator(1001) if fps else stream_rate(first)
    total = 0
    for path in paths:
        with open_video(path) as (container, stream):
            total += round(estimate_frames(stream, container) * out_rate / stream_rate(stream))
    dst = Path(dst)
    report = Progress(progress, total)
    with atomic_output(dst) as tmp, H264Writer(tmp, width=out_w, height=out_h, fps=out_rate,
                                                crf=crf, preset=preset) as writer:
        for path in paths:
            before = writer.frames
            with open_video(path) as (container, stream):
                frames = resample(decode(container, stream, path), stream_rate(stream),
                                  out_rate)
                for frame in _fit(frames, out_w, out_h):
                    writer.write(frame)
                    report.step()
            if writer.frames == before:
                raise MediaError(path, "holds no decodable video frames")
    report.finish()
    return dst
