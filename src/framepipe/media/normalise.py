"""``normalise``: any video into an H.264 MP4 of a chosen size, frame rate and pixel format."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from framepipe.errors import MediaError
from framepipe.media._io import (
    H264Writer,
    Progress,
    ProgressCallback,
    atomic_output,
    decode,
    estimate_frames,
    fit_size,
    open_video,
    resample,
    stream_rate,
)

__all__ = ["normalise"]


def normalise(src: Path | str, dst: Path | str, *, width: int | None = None,
              height: int | None = None, fps: float | Fraction | None = None,
              pix_fmt: str = "yuv420p", crf: int = 23, preset: str = "medium",
              progress: ProgressCallback | None = None) -> Path:
    """Re-encode ``src`` into an H.264 MP4 at ``dst`` (libx264, video only).

    Given only ``width`` or ``height``, the other side keeps the aspect ratio; sides are made
    even. ``fps`` converts to a constant frame rate (frames dropped or repeated); by default the
    source's average rate is kept (a variable frame rate becomes constant). ``progress`` gets
    0-100 (output frames done / expected). The write is atomic. A file whose header announces
    more frames than can be decoded (a truncated upload) is a :class:`MediaError`, not a short
    output."""
    src, dst = Path(src), Path(dst)
    with open_video(src) as (container, stream):
        src_rate = stream_rate(stream)
        out_rate = Fraction(fps).limit_denominator(1001) if fps else src_rate
        if out_rate <= 0:
            raise ValueError(f"fps must be positive, not {fps}")
        out_w, out_h = fit_size(stream.width, stream.height, width, height)
        total = round(estimate_frames(stream, container) * out_rate / src_rate)
        report = Progress(progress, total)
        with atomic_output(dst) as tmp, H264Writer(tmp, width=out_w, height=out_h,
                                                    fps=out_rate, crf=crf, preset=preset,
                                                    pix_fmt=pix_fmt) as writer:
            for frame in resample(decode(container, stream, src), src_rate, out_rate):
                writer.write(frame)
                report.step()
            if writer.frames == 0:
                raise MediaError(src, "holds no decodable video frames")
            declared = stream.frames or 0
            expected = declared * out_rate / src_rate
            if declared and writer.frames < 0.95 * expected - 2:
                raise MediaError(src, f"truncated: its header announces {declared} frames but "
                                      f"only about {round(writer.frames * src_rate / out_rate)} "
                                      "could be decoded")
    report.finish()
    return dst
