"""``extract_frames`` (video -> images) and ``stitch`` (images -> H.264 MP4)."""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from framepipe.errors import MediaError
from framepipe.image_header import read_header
from framepipe.media.atomic import atomic_output
from framepipe.media.decoding import decode, open_video
from framepipe.media.limits import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    DEFAULT_MAX_PIXELS,
    LengthGuard,
    check_length,
    check_picture,
    length_limit,
    open_regular,
    pixel_limit,
)
from framepipe.media.progress import Progress, ProgressCallback
from framepipe.media.rotation import frame_rotation, upright_image
from framepipe.media.soundtrack import open_soundtrack
from framepipe.media.timing import estimate_frames, resample, stream_rate
from framepipe.media.writer import H264Writer, even

__all__ = [
    "IMAGE_SUFFIXES",
    "extract_frames",
    "frame_order",
    "read_image",
    "stitch",
    "write_image",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

_DIGITS = re.compile(r"(\d+)")


def frame_order(path: Path | str) -> tuple[tuple[str | int, ...], str]:
    """The sort key that puts a folder's frames in playing order: the file name's runs of
    digits compared by value, the rest as text (``frame_9999.png`` before ``frame_10000.png``,
    which follow one another once a model's zero padding runs out), then the whole name (so
    ``frame_01`` and ``frame_1`` keep one order)."""
    name = Path(path).name
    parts = _DIGITS.split(name)  # text at even places, digits at odd ones: never compared
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def write_image(dst: Path, image: np.ndarray, *, quality: int = 90) -> Path:
    """Write a BGR image atomically; the format follows ``dst``'s suffix. The image is encoded
    in memory and written by Python: OpenCV is never given a path (it crashes the process on
    one that is not valid UTF-8). Raises :class:`MediaError` naming ``dst`` when the suffix
    names no format OpenCV writes or the image cannot be encoded."""
    suffix = dst.suffix.lower()
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix in {".jpg", ".jpeg"} else []
    try:
        ok, encoded = cv2.imencode(suffix, image, params)
    except cv2.error as exc:
        raise MediaError(dst, f"OpenCV cannot write a {suffix or 'suffix-less'} image") from exc
    if not ok:
        raise MediaError(dst, "OpenCV could not encode the image")
    with atomic_output(dst) as tmp:
        tmp.write_bytes(encoded.tobytes())
    return dst


def extract_frames(
    src: Path | str,
    out_dir: Path | str,
    *,
    every: int = 1,
    fps: float | Fraction | None = None,
    max_frames: int | None = None,
    fmt: str = "jpg",
    quality: int = 90,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Save frames of ``src`` as images ``out_dir/frame_NNNNNN.<fmt>``.

    By index (default): every ``every``-th decoded frame; NNNNNN is the frame's index in the
    source (0-based). By time (``fps``): ``fps`` images a second of the clip, picked by the
    frames' timestamps as :func:`~framepipe.media.normalise` picks them (image ``n`` is the
    frame on screen at ``n / fps`` s from the first frame, rounded to the nearest ``1 / fps``),
    so a variable frame rate is sampled evenly in time; NNNNNN is ``n``, and a frame shown
    for several slots is saved once per slot. Stops after ``max_frames`` images (the images
    wanted; the length limit below is a refusal, not a stop).

    Images are upright: a clip with a display rotation is turned as players turn it. A video
    larger than ``max_pixels`` (default :data:`~framepipe.media.DEFAULT_MAX_PIXELS`,
    8192 x 8192; 0: no limit) is refused with a :class:`MediaError` before any frame is
    decoded.

    Length limit: a video whose header announces a longer media than ``max_duration`` seconds
    (default :data:`~framepipe.media.DEFAULT_MAX_DURATION`, 6 hours) or more frames than
    ``max_frame_count`` (default :data:`~framepipe.media.DEFAULT_MAX_FRAME_COUNT`; 0: no limit,
    each), or that would give more images at ``fps``, is refused with a :class:`MediaError`
    naming it, the length and the limit, before any frame is decoded; one whose header tells
    less (a raw ``.h264`` stream tells nothing) is stopped with a :class:`MediaError` at the
    frame (or image) that passes the limit.

    Returns the written paths in order; each file is written atomically, and a call that fails
    (or is stopped) removes the images it wrote, so ``out_dir`` never holds a partial set that
    looks complete."""
    if every < 1:
        raise ValueError(f"every must be >= 1, not {every}")
    if fps is not None and every != 1:
        raise ValueError("extract_frames takes every= (by index) or fps= (by time), not both")
    out_rate = None if fps is None else Fraction(fps).limit_denominator(1001)
    if out_rate is not None and out_rate <= 0:
        raise ValueError(f"fps must be positive, not {fps}")
    src, out = Path(src), Path(out_dir)
    fmt = fmt.lower().lstrip(".")
    out.mkdir(parents=True, exist_ok=True)
    length = length_limit(max_duration, max_frame_count)
    written: list[Path] = []
    with open_video(src, max_pixels=pixel_limit(max_pixels), length=length) as (container, stream):
        src_rate = stream_rate(stream)
        total = estimate_frames(stream, container)
        wanted = -(-total // every) if out_rate is None else round(total * out_rate / src_rate)
        if max_frames is not None:
            wanted = min(wanted, max_frames)
        if out_rate is not None:
            check_length(src, length, frames=wanted, what=f"at {float(out_rate):g} fps it gives")
        images = LengthGuard(src, length, "its output", writing=True)
        report = Progress(progress, wanted)
        rotation: int | None = None
        frames = decode(container, stream, src, limit=length)
        picked = (
            ((i, f) for i, f in enumerate(frames) if i % every == 0)
            if out_rate is None
            else enumerate(resample(frames, src_rate, out_rate))
        )
        try:
            for number, frame in picked if max_frames != 0 else ():
                if out_rate is not None:  # by index, each image is a frame held as decoded
                    images.frame(number / float(out_rate))
                if rotation is None:
                    rotation = frame_rotation(frame, stream)
                image = upright_image(frame.to_ndarray(format="bgr24"), rotation)
                dst = out / f"frame_{number:06d}.{fmt}"
                written.append(write_image(dst, image, quality=quality))
                report.step()
                if max_frames is not None and len(written) >= max_frames:
                    break
        except BaseException:
            for path in written:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
    report.finish()
    return written


def _frame_list(frames: Path | str | Sequence[Path | str]) -> list[Path]:
    if isinstance(frames, (str, Path)):
        folder = Path(frames)
        if not folder.is_dir():
            raise MediaError(folder, "is not a folder of frames")
        paths = sorted(
            (
                p
                for p in folder.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            ),
            key=frame_order,
        )
        if not paths:
            raise MediaError(folder, "holds no image files")
        return paths
    paths = [Path(p) for p in frames]
    if not paths:
        raise ValueError("stitch needs at least one frame")
    return paths


_HEAD_BYTES = 1 << 20
"""What :func:`read_image` reads before it judges an image by its header: the whole picture
is read only once its size is within the limit (a frame header past it is read with the rest)."""


def read_image(
    path: Path | str, limit: int, *, flags: int = cv2.IMREAD_COLOR, what: str = "the image"
) -> np.ndarray:
    """The image at ``path`` read by OpenCV with ``flags``: a :class:`MediaError` naming it
    when it cannot be read, or when it is larger than ``limit`` pixels (0: no limit), judged
    from its header before decoding (PNG, JPEG, BMP, WebP), else once decoded (other
    formats). ``what`` names the image in the message. The file is read by Python and decoded
    in memory: OpenCV is never given a path (it crashes the process on one that is not valid
    UTF-8)."""
    try:
        with open_regular(path) as file:  # one open: the header checked is the one decoded
            data = file.read(_HEAD_BYTES)
            header = read_header(data)
            if header is not None and header.size is None:  # its frame header may lie further
                data += file.read()
                header = read_header(data)
            if header is not None and header.size is None:  # never decoded to find its size
                raise MediaError(path, f"is a truncated or corrupt {header.kind} image")
            size = header.size if header is not None else None
            if size is not None:  # refused before the rest is read
                check_picture(path, *size, limit, what=what)
            data += file.read()
    except OSError as exc:
        raise MediaError(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from exc
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    if image is None:
        raise MediaError(path, "cannot be read as an image")
    if size is None:
        check_picture(path, image.shape[1], image.shape[0], limit, what=what)
    return np.asarray(image)


def _read_frame(path: Path, width: int, height: int, limit: int) -> av.VideoFrame:
    """One image as a frame for the writer (run on a reader thread): converted to yuv420p by
    OpenCV (BT.601, limited range, as libswscale's default) when it has the video's size,
    else left BGR for the writer to scale."""
    image = read_image(path, limit)
    if image.shape[:2] == (height, width):
        yuv = cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420)
        return av.VideoFrame.from_ndarray(np.asarray(yuv, dtype=np.uint8), format="yuv420p")
    return av.VideoFrame.from_ndarray(image, format="bgr24")


def stitch(
    frames: Path | str | Sequence[Path | str],
    dst: Path | str,
    *,
    fps: float | Fraction = 25,
    crf: int = 23,
    preset: str = "medium",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
    progress: ProgressCallback | None = None,
    audio: Path | str | None = None,
) -> Path:
    """Encode images into an H.264 MP4 at ``dst``.

    ``frames`` is a folder (its images in :func:`frame_order`: numbered names by number) or a
    list of image paths (in that order).
    The video takes the first image's size (made even); other sizes are scaled to it. Images
    are read and converted to yuv420p ahead on two threads (OpenCV releases the GIL), in
    order, at most ``_READ_AHEAD`` at a time, so reading overlaps encoding without holding the
    folder in memory.

    An image larger than ``max_pixels`` (default
    :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192; 0: no limit) is a
    :class:`MediaError` naming it, its size and the limit: PNG, JPEG, BMP and WebP images are
    refused from their headers, before decoding; other formats once read.

    Length limit: images that would make a longer video than ``max_duration`` seconds at
    ``fps`` (default :data:`~framepipe.media.DEFAULT_MAX_DURATION`, 6 hours), or more frames
    than ``max_frame_count`` (default :data:`~framepipe.media.DEFAULT_MAX_FRAME_COUNT`; 0: no
    limit, each), are a :class:`MediaError` naming the folder (or the first image), before
    any is read.

    ``audio``: a video file (the one the frames were made from) whose first sound track is laid
    under the frames, from its video's start, cut where the frames end or padded with silence
    to there (AAC, at its own rate as ``normalise`` keeps it); decoded as the video reaches
    it, never held whole. A file without sound gives a silent video; a missing or unreadable
    one, or one over the limits, is a :class:`MediaError` naming it, before anything is
    written (:func:`~framepipe.media.soundtrack.open_soundtrack`)."""
    paths = _frame_list(frames)
    dst = Path(dst)
    limit = pixel_limit(max_pixels)
    length = length_limit(max_duration, max_frame_count)
    rate = Fraction(fps).limit_denominator(1001)
    if rate <= 0:
        raise ValueError(f"fps must be positive, not {fps}")
    named = Path(frames) if isinstance(frames, (str, Path)) else paths[0]
    check_length(
        named,
        length,
        seconds=len(paths) / float(rate),
        frames=len(paths),
        what=f"its {len(paths):,} images at {float(rate):g} fps make",
    )
    first = read_image(paths[0], limit)
    height, width = first.shape[:2]
    out_w, out_h = even(width), even(height)
    report = Progress(progress, len(paths))
    with (
        open_soundtrack(audio, max_pixels=limit, length=length) as sound,
        ThreadPoolExecutor(2, thread_name_prefix="framepipe-imread") as pool,
        atomic_output(dst) as tmp,
        H264Writer(
            tmp, width=out_w, height=out_h, fps=rate, crf=crf, preset=preset, audio=sound.queue
        ) as writer,
    ):

        def write(frame: av.VideoFrame) -> None:
            sound.feed((writer.frames + 1) / float(rate))
            writer.write(frame)
            report.step()

        pending: collections.deque[Future[av.VideoFrame]] = collections.deque()
        upcoming = iter(paths[1:])
        for path in itertools.islice(upcoming, _READ_AHEAD):
            pending.append(pool.submit(_read_frame, path, out_w, out_h, limit))
        write(av.VideoFrame.from_ndarray(first, format="bgr24"))
        while pending:
            frame = pending.popleft().result()
            nxt = next(upcoming, None)
            if nxt is not None:
                pending.append(pool.submit(_read_frame, nxt, out_w, out_h, limit))
            write(frame)
        writer.end_part()  # the sound ends where the frames end
    report.finish()
    return dst


_READ_AHEAD = 4
