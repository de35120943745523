"""``thumbnail`` (one frame as an image) and ``thumbnail_grid`` (a contact sheet)."""

from __future__ import annotations

from pathlib import Path

import av
import av.container
import av.video.stream
import cv2
import numpy as np

from framepipe.errors import MediaError
from framepipe.media.decoding import decode, decode_failed, open_video
from framepipe.media.frames import write_image
from framepipe.media.limits import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    DEFAULT_MAX_PIXELS,
    LengthLimit,
    check_output_size,
    length_limit,
    pixel_limit,
)
from framepipe.media.progress import Progress, ProgressCallback
from framepipe.media.rotation import frame_rotation, upright_image
from framepipe.media.timing import (
    estimate_frames,
    frame_seconds,
    stream_rate,
    stream_start,
    video_duration,
)
from framepipe.media.writer import even

__all__ = ["thumbnail", "thumbnail_grid"]

SEQUENTIAL_FRAMES_PER_TILE = 300  # up to this many frames per tile, decode once, don't seek
_EPSILON = 1e-6  # seconds: float noise in a timestamp, not a frame
_NO_TIMESTAMPS = 0x0080  # FFmpeg's AVFMT_NOTIMESTAMPS: a raw stream (.h264, .hevc ...)


def _seekable(container: av.container.InputContainer) -> bool:
    """Whether the file can be sought by time: not a raw stream, which has no timestamps (a
    seek there reads the whole file, then fails, leaving nothing to decode)."""
    return not container.format.flags & _NO_TIMESTAMPS


def _frame_at(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    at: float,
    length: LengthLimit,
) -> av.VideoFrame:
    """The frame on screen at ``at`` seconds: the last one whose timestamp is at or before it
    (the first frame if ``at`` comes before it, the last decodable one if ``at`` is past the
    end), by timestamp, so a variable frame rate's gaps and bursts are honoured. Seeks to the
    keyframe before ``at``, then decodes forward.

    A truncated file's index still lists the frames that were cut off, so the seek can land
    past the last decodable frame: then the seek goes back 1, 2, 4 ... seconds before ``at``
    (and last to the start) until something decodes, and the last frame decoded is the
    answer. Decoding stops at the first packet that cannot be decoded once a frame was found
    (the cut of a truncated file)."""
    back = 1.0
    seek_to = at
    while True:
        frame = _last_frame_until(container, stream, path, seek_to, at, length)
        if frame is not None:
            return frame
        if seek_to <= 0:
            raise MediaError(path, "holds no decodable video frames")
        seek_to = max(0.0, at - back)
        back *= 2


def _last_frame_until(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    seek_to: float,
    at: float,
    length: LengthLimit,
) -> av.VideoFrame | None:
    """Seek to the keyframe before ``seek_to``, decode forward: the last frame at or before
    ``at`` (None if nothing decodes from there)."""
    start = stream_start(stream)
    try:
        if stream.time_base is not None and seek_to > 0:
            try:
                target = int((start + seek_to) / stream.time_base)
                container.seek(target, stream=stream, backward=True)
            except av.FFmpegError:
                container.seek(0, stream=stream)
        else:
            container.seek(0, stream=stream)
    except av.FFmpegError as exc:
        raise MediaError(path, f"cannot be sought to a frame ({exc})") from exc
    shown = None
    rate = stream_rate(stream)
    try:
        for index, frame in enumerate(decode(container, stream, path, limit=length)):
            if shown is not None and frame_seconds(frame, index, rate) - start > at + _EPSILON:
                return shown
            shown = frame
    except MediaError as exc:
        if not decode_failed(exc) or (shown is None and seek_to <= 0):
            raise  # past the length limit, or not even the first frame decodes: say why
    return shown


def _frames_in_one_pass(
    container: av.container.InputContainer,
    stream: av.video.stream.VideoStream,
    path: Path,
    times: list[float],
    total: int,
    progress: ProgressCallback | None,
    length: LengthLimit,
) -> list[av.VideoFrame]:
    """The frame on screen at each of ``times`` (sorted; as :func:`_frame_at` picks it),
    decoding the clip once (up to the first packet that cannot be decoded, as there)."""
    start = stream_start(stream)
    rate = stream_rate(stream)
    report = Progress(progress, total)
    picked: list[av.VideoFrame] = []
    shown = None
    try:
        for index, frame in enumerate(decode(container, stream, path, limit=length)):
            t = frame_seconds(frame, index, rate) - start
            while len(picked) < len(times) and t > times[len(picked)] + _EPSILON:
                picked.append(shown if shown is not None else frame)
            if len(picked) == len(times):
                break
            shown = frame
            report.step()
    except MediaError as exc:
        if not decode_failed(exc) or shown is None:
            raise
    if shown is None:
        raise MediaError(path, "holds no decodable video frames")
    picked += [shown] * (len(times) - len(picked))
    return picked


def _scaled(frame: av.VideoFrame, width: int | None, rotation: int) -> np.ndarray:
    """The frame as an upright BGR image, ``width`` wide (keeping the aspect) if given."""
    image = upright_image(frame.to_ndarray(format="bgr24"), rotation)
    if width is None:
        return image
    h, w = image.shape[:2]
    return np.asarray(cv2.resize(image, (width, even(h * width / w)), interpolation=cv2.INTER_AREA))


def thumbnail(
    src: Path | str,
    dst: Path | str,
    *,
    at: float | None = None,
    width: int | None = None,
    quality: int = 90,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
) -> Path:
    """Save the frame on screen at ``at`` seconds from the video's start (default: the middle
    of the video, its length read from the header as
    :func:`~framepipe.video_length.video_duration` tells it: the video stream's own, not a
    longer sound track's, and the container's only when the header gives the video none) as
    an image (format from ``dst``'s suffix): the last frame whose timestamp is at or before
    ``at``, so on a variable frame rate it is the frame a player shows then. Past the end, it
    is the last frame that decodes; that includes a truncated file whose header announces
    frames that were cut off (``at`` beyond where its frames end gives its last decodable
    frame, not an error). A raw stream (``.h264``: no timestamps, no seeking) is decoded
    from its start. Scaled to ``width`` keeping the aspect if given, upright (a clip
    with a display rotation is turned as players turn it). A video larger than
    ``max_pixels`` (default :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192; 0: no
    limit) is refused with a :class:`MediaError` before any frame is decoded, as is
    (:class:`ValueError`) a ``width`` giving a larger image. So is a video whose header
    announces a longer media than ``max_duration`` seconds or more frames than
    ``max_frame_count`` (defaults :data:`~framepipe.media.DEFAULT_MAX_DURATION`, 6 hours, and
    :data:`~framepipe.media.DEFAULT_MAX_FRAME_COUNT`; 0: no limit, each), and decoding a raw
    stream to ``at`` stops with a :class:`MediaError` at the frame that passes the limit.
    Atomic write."""
    src, dst = Path(src), Path(dst)
    limit = pixel_limit(max_pixels)
    length = length_limit(max_duration, max_frame_count)
    with open_video(src, max_pixels=limit, length=length) as (container, stream):
        middle = (video_duration(stream, container) or 0.0) / 2
        when = middle if at is None else max(0.0, at)
        if _seekable(container):
            frame = _frame_at(container, stream, src, when, length)
        else:
            frame = _frames_in_one_pass(container, stream, src, [when], 0, None, length)[0]
        rotation = frame_rotation(frame, stream)
        if width is not None:
            shown_w, shown_h = (
                (frame.height, frame.width)
                if rotation in (90, 270)
                else (frame.width, frame.height)
            )
            check_output_size(width, even(shown_h * width / shown_w), limit)
        image = _scaled(frame, width, rotation)
    return write_image(dst, image, quality=quality)


def thumbnail_grid(
    src: Path | str,
    dst: Path | str,
    *,
    cols: int = 3,
    rows: int = 3,
    width: int = 960,
    quality: int = 90,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration: float = DEFAULT_MAX_DURATION,
    max_frame_count: int = DEFAULT_MAX_FRAME_COUNT,
    progress: ProgressCallback | None = None,
) -> Path:
    """A ``cols`` x ``rows`` contact sheet of frames spread evenly over the clip.

    Tiles are ``width // cols`` wide (even) and keep the video's aspect; the sheet is
    ``cols * tile_width`` by ``rows * tile_height``. Frame ``i`` is taken at
    ``(i + 0.5) / (cols * rows)`` of the video's length (as :func:`thumbnail`'s middle
    reads it from the header): the frame on screen then (as
    :func:`thumbnail` picks it), seeking to each in a long clip, decoding the clip once in a
    short one or a raw stream (``.h264``, which cannot be sought). Tiles are upright (a clip
    with a display rotation is turned as players turn it). A video larger than
    ``max_pixels`` (default :data:`~framepipe.media.DEFAULT_MAX_PIXELS`, 8192 x 8192; 0: no
    limit) is refused with a :class:`MediaError` before any frame is decoded, as is
    (:class:`ValueError`) a sheet that would be larger, and a video longer than
    ``max_duration`` or with more frames than ``max_frame_count``, as :func:`thumbnail` refuses
    it. Atomic write."""
    if cols < 1 or rows < 1:
        raise ValueError(f"cols and rows must be >= 1, not {cols}x{rows}")
    src, dst = Path(src), Path(dst)
    count = cols * rows
    limit = pixel_limit(max_pixels)
    length = length_limit(max_duration, max_frame_count)
    with open_video(src, max_pixels=limit, length=length) as (container, stream):
        duration = video_duration(stream, container) or 0.0
        total = estimate_frames(stream, container)
        times = [duration * (i + 0.5) / count for i in range(count)]
        if 0 < total <= SEQUENTIAL_FRAMES_PER_TILE * count or not _seekable(container):
            frames = _frames_in_one_pass(container, stream, src, times, total, progress, length)
        else:  # a long clip: seek to each time rather than decode all of it
            report = Progress(progress, count)
            frames = []
            for when in times:
                frames.append(_frame_at(container, stream, src, when, length))
                report.step()
        rotation = frame_rotation(frames[0], stream)
        sideways = rotation in (90, 270)
        shown_w, shown_h = (
            (stream.height, stream.width) if sideways else (stream.width, stream.height)
        )
        tile_w = even(width // cols)
        tile_h = even(shown_h * tile_w / shown_w)
        check_output_size(tile_w * cols, tile_h * rows, limit)
        sheet = np.zeros((tile_h * rows, tile_w * cols, 3), dtype=np.uint8)
        for i, frame in enumerate(frames):
            raw_w, raw_h = (tile_h, tile_w) if sideways else (tile_w, tile_h)
            tile = upright_image(
                frame.reformat(
                    width=raw_w, height=raw_h, format="bgr24", interpolation="AREA"
                ).to_ndarray(),
                rotation,
            )
            r, c = divmod(i, cols)
            sheet[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w] = tile
    write_image(dst, sheet, quality=quality)
    if progress is not None:
        progress(100.0)
    return dst
