"""``watermark``: text (OpenCV ``putText``) or an image blended into every frame."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np

from framepipe.media.atomic import atomic_output
from framepipe.media.decoding import decode_source, open_video
from framepipe.media.frames import read_image
from framepipe.media.limits import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    DEFAULT_MAX_PIXELS,
    LengthGuard,
    length_limit,
    pixel_limit,
)
from framepipe.media.progress import Progress, ProgressCallback
from framepipe.media.rotation import frame_rotation, upright_image
from framepipe.media.timing import estimate_frames, resample, stream_rate
from framepipe.media.writer import H264Writer

__all__ = ["POSITIONS", "overlay_position", "render_text", "watermark"]

POSITIONS = ("top-left", "top-right", "bottom-left", "bottom-right", "center")


def render_text(
    text: str,
    *,
    font_scale: float = 1.0,
    thickness: int = 2,
    color: tuple[int, int, int] = (255, 255, 255),
) -> tuple[np.ndarray, np.ndarray]:
    """``text`` drawn with ``cv2.putText`` (with a dark outline): (BGR patch, alpha 0-1)."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    outline = thickness + 2
    (tw, th), baseline = cv2.getTextSize(text, font, font_scale, outline)
    pad = outline
    h, w = th + baseline + 2 * pad, tw + 2 * pad
    origin = (pad, pad + th)
    patch = np.zeros((h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=np.uint8)
    cv2.putText(mask, text, origin, font, font_scale, 255, outline, cv2.LINE_AA)
    cv2.putText(patch, text, origin, font, font_scale, color, thickness, cv2.LINE_AA)
    return patch, mask.astype(np.float32) / 255.0


def _load_image(image: Path | str | np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(image, np.ndarray):
        data: np.ndarray = np.asarray(image, dtype=np.uint8)
    else:
        loaded = read_image(image, limit, flags=cv2.IMREAD_UNCHANGED, what="the watermark image")
        data = np.asarray(loaded, dtype=np.uint8)
    if data.ndim == 2:
        data = cv2.cvtColor(data, cv2.COLOR_GRAY2BGR)
    if data.shape[2] == 4:
        return np.ascontiguousarray(data[:, :, :3]), data[:, :, 3].astype(np.float32) / 255.0
    return np.ascontiguousarray(data[:, :, :3]), np.ones(data.shape[:2], dtype=np.float32)


def overlay_position(
    position: str, frame_size: tuple[int, int], patch_size: tuple[int, int], margin: int
) -> tuple[int, int]:
    """Top-left corner (x, y) of a ``patch_size`` (w, h) overlay in a ``frame_size`` frame."""
    fw, fh = frame_size
    pw, ph = patch_size
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, not {position!r}")
    if position == "center":
        return (fw - pw) // 2, (fh - ph) // 2
    vertical, horizontal = position.split("-")
    x = margin if horizontal == "left" else fw - pw - margin
    y = margin if vertical == "top" else fh - ph - margin
    return max(0, x), max(0, y)


def watermark(
    src: Path | str,
    dst: Path | str,
    *,
    text: str | None = None,
    image: Path | str | np.ndarray | None = None,
    position: str = "bottom-right",
    opacity: float = 0.8,
    margin: int = 16,
    font_scale: float | None = None,
    crf: int = 23,
    preset: str = "medium",
    audio: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
    progress: ProgressCallback | None = None,
) -> Path:
    """Blend ``text`` or ``image`` (PNG alpha respected) into every frame; H.264 MP4 at ``dst``.

    The overlay sits at ``position`` (``top-left``, ``top-right``, ``bottom-left``,
    ``bottom-right``, ``center``) ``margin`` pixels from the edges of the upright picture (a
    clip with a display rotation is turned upright first; the output has no rotation); only
    that region of each frame changes. Text scales with the frame height unless ``font_scale``
    is given. Frame size is kept, and the source's average frame rate: frames are placed by
    their timestamps (:func:`~framepipe.media.timing.resample`, as
    :func:`~framepipe.media.normalise` does), so a variable frame rate (gaps, bursts) comes out
    constant, in order and in time with the sound, lasting as long as the source's video within
    half a frame. The first audio stream is kept, re-encoded to AAC as
    :func:`~framepipe.media.normalise` does (``audio=False`` drops it). A video larger than
    ``max_pixels`` (default :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192;
    0: no limit) is refused with a :class:`MediaError` naming it, its size and the limit, before any
    frame is decoded; so is an ``image`` file larger than the limit (as :func:`~framepipe.media.
    stitch` refuses its images: from a PNG, JPEG, BMP or WebP header, before it is decoded).
    A truncated file (its header announces more than can be decoded) is a
    :class:`MediaError`, as for :func:`~framepipe.media.normalise`, and so is a video longer
    than ``max_duration`` seconds or with more frames than ``max_frame_count`` (defaults
    :data:`~framepipe.media.DEFAULT_MAX_DURATION`, 6 hours, and
    :data:`~framepipe.media.DEFAULT_MAX_FRAME_COUNT`; 0: no limit, each): refused from its
    header before any frame is decoded when the header tells, else stopped at the frame that
    passes the limit, as :func:`~framepipe.media.normalise` does. Atomic write."""
    if (text is None) == (image is None):
        raise ValueError("watermark needs exactly one of text= or image=")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0-1, not {opacity}")
    src, dst = Path(src), Path(dst)
    limit = pixel_limit(max_pixels)
    length = length_limit(max_duration, max_frame_count)
    with open_video(src, max_pixels=limit, length=length) as (container, stream):
        source = decode_source(container, stream, src, audio=audio, limit=length)
        rotation = frame_rotation(source.first, stream)
        fw, fh = (
            (stream.height, stream.width)
            if rotation in (90, 270)
            else (stream.width, stream.height)
        )
        if text is not None:
            scale = font_scale if font_scale is not None else max(0.4, fh / 720)
            patch, alpha = render_text(text, font_scale=scale, thickness=max(1, round(2 * scale)))
        else:
            assert image is not None
            patch, alpha = _load_image(image, limit)
        ph, pw = patch.shape[:2]
        if pw > fw or ph > fh:  # shrink an overlay larger than the frame
            factor = min(fw / pw, fh / ph)
            size = (max(1, int(pw * factor)), max(1, int(ph * factor)))
            patch = cv2.resize(patch, size, interpolation=cv2.INTER_AREA)
            alpha = cv2.resize(alpha, size, interpolation=cv2.INTER_AREA)
            ph, pw = patch.shape[:2]
        x, y = overlay_position(position, (fw, fh), (pw, ph), margin)
        a = (alpha * opacity)[:, :, np.newaxis]
        fg = patch.astype(np.float32) * a
        keep = 1.0 - a
        rate = stream_rate(stream)
        report = Progress(progress, estimate_frames(stream, container))
        with (
            atomic_output(dst) as tmp,
            H264Writer(
                tmp,
                width=fw - fw % 2,
                height=fh - fh % 2,
                fps=rate,
                crf=crf,
                preset=preset,
                audio=source.audio,
                guard=LengthGuard(src, length, "its output", writing=True),
            ) as writer,
        ):
            shown: av.VideoFrame | None = None  # the source frame ``out`` was made from
            for frame in resample(source.frames, rate, rate):
                if frame is not shown:  # a frame repeated to fill a gap is blended once
                    bgr = np.ascontiguousarray(
                        upright_image(frame.to_ndarray(format="bgr24"), rotation)
                    )
                    region = bgr[y : y + ph, x : x + pw]
                    region[:] = (region.astype(np.float32) * keep + fg).astype(np.uint8)
                    out = av.VideoFrame.from_ndarray(bgr, format="bgr24")
                    shown = frame
                writer.write(out)
                report.step()
    report.finish()
    return dst
