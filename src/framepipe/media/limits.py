"""The toolkit's limits: how large a picture it decodes or writes, judged from headers before
any frame is decoded, and how long a media it decodes or writes, judged from the header when it
tells and held to while decoding and writing when it does not, or lies.

Every function that reads a video or images takes ``max_pixels`` (default
:data:`DEFAULT_MAX_PIXELS`; 0: no limit), and every one that decodes a video's frames (all but
``probe``) or writes one takes ``max_duration`` (seconds, default :data:`DEFAULT_MAX_DURATION`)
and ``max_frame_count`` (default :data:`DEFAULT_MAX_FRAME_COUNT`; 0: no limit, each). The
toolkit reads no setting: the job steps (:mod:`framepipe.media.steps`) pass the settings
``media_max_pixels``, ``media_max_duration`` and ``media_max_frame_count`` in."""

from __future__ import annotations

import datetime
import errno
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from framepipe.confined import open_for_reading
from framepipe.errors import MediaError
from framepipe.image_header import read_header

__all__ = [
    "BACKSTOP",
    "DEFAULT_MAX_DURATION",
    "DEFAULT_MAX_FRAME_COUNT",
    "DEFAULT_MAX_PIXELS",
    "LIMIT_SETTINGS",
    "LengthGuard",
    "LengthLimit",
    "check_length",
    "check_output_size",
    "check_picture",
    "image_size",
    "length_limit",
    "limits_from",
    "open_regular",
    "pixel_limit",
]

DEFAULT_MAX_PIXELS = 8192 * 8192
"""The picture-size limit every function's ``max_pixels`` defaults to (and the default of the
setting ``media_max_pixels``, which the job steps pass in): 8192 x 8192, room for 8K UHD
(7680 x 4320) and the largest H.264/HEVC level, while one decoded frame stays near 100 MB
(yuv420p) and its BGR copy near 200 MB."""

BACKSTOP = 4
"""FFmpeg's own ``max_pixels`` is this many times the limit (see
:func:`~framepipe.media.decoding.open_video`)."""

_RAISE_IT = (
    "raise the limit with max_pixels= or the setting FRAMEPIPE_MEDIA_MAX_PIXELS (0: no limit)"
)


def pixel_limit(max_pixels: int) -> int:
    """``max_pixels`` checked as a picture-size limit (pixels; 0: no limit). Anything but a
    whole number >= 0 raises :class:`ValueError`. Reads no setting: a caller that has
    settings (a job step) passes ``media_max_pixels`` in."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise ValueError(
            f"max_pixels must be a whole number >= 0 (0: no limit), not {max_pixels!r}"
        )
    return max_pixels


def _limit_text(limit: int) -> str:
    side = math.isqrt(limit)
    return f"{limit:,} pixels" + (f" ({side}x{side})" if side * side == limit else "")


def check_picture(
    path: Path | str, width: int, height: int, limit: int, what: str = "its picture"
) -> None:
    """Raise :class:`MediaError` naming ``path``, its size and the limit (and how to raise it)
    when a ``width`` x ``height`` picture is larger than ``limit`` pixels (0: no limit)."""
    if limit and width * height > limit:
        raise MediaError(
            path,
            f"{what} is {width}x{height} ({width * height:,} pixels), "
            f"larger than the limit of {_limit_text(limit)}: refused "
            f"before decoding; {_RAISE_IT}",
        )


def check_output_size(width: int, height: int, limit: int) -> None:
    """Raise :class:`ValueError` when a requested output of ``width`` x ``height`` is larger
    than ``limit`` pixels (0: no limit), before anything is decoded or written."""
    if limit and width * height > limit:
        raise ValueError(
            f"the requested output size {width}x{height} "
            f"({width * height:,} pixels) is larger than the limit of "
            f"{_limit_text(limit)}; {_RAISE_IT}"
        )


DEFAULT_MAX_DURATION = 6 * 3600
"""The length limit every function's ``max_duration`` defaults to, in seconds of media time (and
the default of the setting ``media_max_duration``): 6 hours, room for a film or a day's
recording, while a small file whose header announces (or whose frames run to) days of video is
refused."""

DEFAULT_MAX_FRAME_COUNT = 60 * DEFAULT_MAX_DURATION
"""The frame-count limit every function's ``max_frame_count`` defaults to (and the default of the
setting ``media_max_frame_count``): 1,296,000, six hours at 60 frames a second. A limit of its
own because a file sets its own timestamps: frames a microsecond apart are hours of frames in a
second of media time (and ``extract_frames`` writes an image per frame)."""

_RAISE_DURATION = (
    "raise the limit with max_duration= or the setting FRAMEPIPE_MEDIA_MAX_DURATION (0: no limit)"
)
_RAISE_FRAMES = (
    "raise the limit with max_frame_count= or the setting FRAMEPIPE_MEDIA_MAX_FRAME_COUNT "
    "(0: no limit)"
)


@dataclass(frozen=True)
class LengthLimit:
    """How much media an operation decodes or writes: ``seconds`` of media time (a frame that
    starts at or after it is past it) and ``frames`` video frames; 0: no limit, each. Made from
    a function's ``max_duration`` and ``max_frame_count`` by :func:`length_limit`."""

    seconds: float
    frames: int


def length_limit(max_duration: float, max_frame_count: int) -> LengthLimit:
    """``max_duration`` (seconds) and ``max_frame_count`` checked as a :class:`LengthLimit` (0:
    no limit, each). A duration that is not a finite number >= 0, or a count that is not a
    whole number >= 0, raises :class:`ValueError`. Reads no setting: a caller that has
    settings (a job step) passes ``media_max_duration`` and ``media_max_frame_count`` in."""
    if (
        isinstance(max_duration, bool)
        or not isinstance(max_duration, (int, float))
        or not math.isfinite(max_duration)
        or max_duration < 0
    ):
        raise ValueError(
            f"max_duration must be a number of seconds >= 0 (0: no limit), not {max_duration!r}"
        )
    if (
        isinstance(max_frame_count, bool)
        or not isinstance(max_frame_count, int)
        or max_frame_count < 0
    ):
        raise ValueError(
            f"max_frame_count must be a whole number >= 0 (0: no limit), not {max_frame_count!r}"
        )
    return LengthLimit(float(max_duration), max_frame_count)


def _seconds_text(seconds: float) -> str:
    text = f"{seconds:,.0f} s" if seconds == int(seconds) else f"{seconds:,.2f} s"
    if seconds >= 60:
        text += f" ({datetime.timedelta(seconds=round(seconds))})"
    return text


def check_length(
    path: Path | str,
    limit: LengthLimit,
    *,
    seconds: float | None = None,
    frames: int = 0,
    what: str = "its header announces",
) -> None:
    """Raise :class:`MediaError` naming ``path``, the length and the limit (and how to raise it)
    when ``seconds`` of media is longer than ``limit`` allows or ``frames`` are more, before
    anything is decoded. ``what`` says where the length comes from (a header, a request)."""
    if limit.seconds and seconds is not None and seconds > limit.seconds:
        raise MediaError(
            path,
            f"{what} {_seconds_text(seconds)} of media, longer than the limit of "
            f"{_seconds_text(limit.seconds)}: refused before decoding; {_RAISE_DURATION}",
        )
    if limit.frames and frames > limit.frames:
        raise MediaError(
            path,
            f"{what} {frames:,} frames, more than the limit of {limit.frames:,} frames: "
            f"refused before decoding; {_RAISE_FRAMES}",
        )


class LengthGuard:
    """Holds one pass over a file's video (or sound), or the frames of an output, to a
    :class:`LengthLimit` frame by frame, as they are decoded or written: the limit for a file
    whose header tells no length (a raw ``.h264`` stream) or less than it holds, and for an
    output longer than its sources (a frame rate raised, parts joined). The frame that passes
    the limit raises :class:`MediaError` naming :attr:`path`, before it is used.

    ``what`` names what is held (``its video``, ``its output``) in the message; ``announced``
    (when decoding) is the length the header announced, or None, told there too."""

    def __init__(
        self,
        path: Path | str,
        limit: LengthLimit,
        what: str,
        *,
        writing: bool = False,
        announced: float | None = None,
    ) -> None:
        self.path = path
        self.limit = limit
        self.what = what
        self.frames = 0
        self._doing = "writing" if writing else "decoding"
        if writing:
            self._header = ""
        elif announced is None:
            self._header = " (its header announces no length)"
        else:
            self._header = f" (its header announces {_seconds_text(announced)})"

    def frame(self, start: float) -> None:
        """Count one video frame, starting ``start`` seconds from the media's start."""
        self.frames += 1
        if self.limit.frames and self.frames > self.limit.frames:
            raise self._past(
                f"{self.limit.frames:,} frames", f"frame {self.frames:,}", _RAISE_FRAMES
            )
        self.reach(start)

    def reach(self, start: float) -> None:
        """A frame (of video or sound) starts ``start`` seconds from the media's start."""
        if self.limit.seconds and start >= self.limit.seconds:
            raise self._past(
                f"{_seconds_text(self.limit.seconds)} of media", f"{start:,.2f} s", _RAISE_DURATION
            )

    def _past(self, limit: str, where: str, raise_it: str) -> MediaError:
        return MediaError(
            self.path,
            f"{self.what} runs past the limit of {limit}{self._header}: stopped while "
            f"{self._doing}, at {where}; {raise_it}",
        )


def open_regular(path: Path | str) -> Any:
    """``path`` opened for reading (binary) if it is a regular file; :class:`MediaError`
    naming it otherwise. A FIFO or a device planted where an image is expected is refused at
    once (it is opened without blocking, then checked), never waited on."""
    try:
        fd = open_for_reading(path)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise MediaError(path, "is not a regular file (a FIFO, a device or a folder)") from None
        raise MediaError(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from exc
    return os.fdopen(fd, "rb")


def image_size(path: Path | str) -> tuple[int, int] | None:
    """(width, height) of a JPEG, PNG, WebP or BMP image read from its header alone
    (:func:`framepipe.image_header.read_header`; no pixel is decoded); None for another
    format or a header that cannot be parsed. :class:`MediaError` when ``path`` cannot be read
    or is no regular file (:func:`open_regular`)."""
    with open_regular(path) as file:
        header = read_header(file.read())
    return header.size if header is not None else None


LIMIT_SETTINGS = {
    "max_pixels": "media_max_pixels",
    "max_duration": "media_max_duration",
    "max_frame_count": "media_max_frame_count",
}
"""The toolkit's limit options and the settings that set them (``FRAMEPIPE_MEDIA_MAX_*``)."""


def limits_from(settings: Any, *, length: bool = True) -> dict[str, Any]:
    """The limit options (``max_pixels``, and unless not ``length`` ``max_duration`` and
    ``max_frame_count``) as ``settings`` (a :class:`~framepipe.config.Settings` or
    ``MediaSettings``) set them: what code that calls the toolkit from a step passes in, so
    the operator's limits hold there as in the built-in media steps."""
    return {
        option: getattr(settings, name)
        for option, name in LIMIT_SETTINGS.items()
        if length or option == "max_pixels"
    }
