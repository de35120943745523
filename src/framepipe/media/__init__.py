"""The video toolkit on PyAV: probe, normalise, frames, thumbnails, watermark, concat, QR codes.

Every function is a plain function on paths (FFmpeg's libraries through PyAV). Long operations take
``progress: Callable[[float], None] | None`` and report 0-100 (frames done / total; a step
passes ``ctx.progress``). Every output is written to a temp file beside ``dst``, flushed to
the disk and renamed when complete, so a failed or interrupted run, or a power cut, leaves no
partial file at ``dst``; a killed run's temp file is reused or removed by the next write of
``dst``. Unreadable or non-video inputs raise :class:`MediaError` naming the file, and so does
a truncated one (its header announces more than can be decoded) given to an operation that
re-encodes it whole (``normalise``, ``watermark``, ``concat``). Sound is kept (re-encoded to
AAC) and rotated clips come out upright. Only the file named is read: a playlist (HLS,
ffconcat) or stream description naming other files or addresses is a :class:`MediaError`.

Picture-size limit: every function that reads a video (``probe`` included) or images
(``stitch``, ``watermark``'s ``image``) takes ``max_pixels`` (default
:data:`DEFAULT_MAX_PIXELS` = 8192 x 8192; 0: no limit; the functions read no setting, and
the job steps pass in the setting ``media_max_pixels``, i.e. ``FRAMEPIPE_MEDIA_MAX_PIXELS``)
and refuses a larger picture with a :class:`MediaError` naming the file, its size and the
limit, judged from the headers before any frame is decoded; a requested output larger than
the limit is a :class:`ValueError`. Frames are decoded one at a time, so a large picture
within the limit (a 4K clip normalised to 720p) costs a few frames' memory, not the clip's.

Length limit: every function that decodes a video's frames (all but ``probe``, which decodes
one) takes ``max_duration`` (seconds of media time, default :data:`DEFAULT_MAX_DURATION` = 6
hours) and ``max_frame_count`` (default :data:`DEFAULT_MAX_FRAME_COUNT`, six hours at 60 fps;
0: no limit, each; the job steps pass in the settings ``media_max_duration`` and
``media_max_frame_count``). A file whose header announces a longer media or more frames is a
:class:`MediaError` naming it, the length and the limit, before any frame is decoded; one whose
header tells less or nothing (a raw ``.h264`` stream) is stopped with a :class:`MediaError`
naming it at the video frame or sound that passes the limit, and what a function writes (an
output at a raised frame rate, joined parts, stitched images, extracted images) is held to it
too, so a small hostile file cannot decode to an output that fills the disk. A stopped
function leaves no output, as any failed one.

Variable frame rates: :class:`MediaInfo` gives the average ``fps`` and a
``variable_frame_rate`` hint; operations that write video at a constant rate (``normalise``,
``watermark``, ``concat``), sample it (``extract_frames(fps=...)``) and pick a frame at a time
(``thumbnail``, ``thumbnail_grid``) go by the frames' timestamps, not their count.

Each function is also a ready job step: :func:`media_step` adds one to a pipeline and
:func:`run_media` runs one inside a step of your own (:mod:`framepipe.media.steps`: temp folder
per step, inputs from the object store or local paths, outputs uploaded, real progress).
Importing :mod:`framepipe.media` loads neither the job engine nor the state store; the steps
load them when first used.

The building blocks, one concept a module: :mod:`~framepipe.media.limits` (the picture-size
and length limits), :mod:`~framepipe.media.decoding` (opening and decoding a source, sound
included), :mod:`~framepipe.media.timing` (rates, timestamps, resampling),
:mod:`~framepipe.media.rotation`, :mod:`~framepipe.media.audio`, :mod:`~framepipe.media.writer`
(the H.264 writer), :mod:`~framepipe.media.atomic` (atomic outputs) and
:mod:`~framepipe.media.progress`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from framepipe.errors import MediaError
from framepipe.media.atomic import atomic_output
from framepipe.media.concat import concat
from framepipe.media.frames import extract_frames, frame_order, stitch
from framepipe.media.limits import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    DEFAULT_MAX_PIXELS,
    limits_from,
)
from framepipe.media.normalise import normalise
from framepipe.media.probe import MediaInfo, probe
from framepipe.media.progress import ProgressCallback
from framepipe.media.qr import QrCode, QrResult, decode_qr
from framepipe.media.thumbnails import thumbnail, thumbnail_grid
from framepipe.media.watermark import watermark

if TYPE_CHECKING:
    from framepipe.media.steps import Input, ObjectKey, media_step, run_media

_STEPS = frozenset({"Input", "ObjectKey", "media_step", "run_media"})


def __getattr__(name: str) -> Any:
    # The job steps load the job machinery (and SQLAlchemy); the media functions need neither.
    if name in _STEPS:
        from framepipe.media import steps

        return getattr(steps, name)
    raise AttributeError(f"module 'framepipe.media' has no attribute {name!r}")


__all__ = [
    "DEFAULT_MAX_DURATION",
    "DEFAULT_MAX_FRAME_COUNT",
    "DEFAULT_MAX_PIXELS",
    "Input",
    "MediaError",
    "MediaInfo",
    "ObjectKey",
    "ProgressCallback",
    "QrCode",
    "QrResult",
    "atomic_output",
    "concat",
    "decode_qr",
    "extract_frames",
    "frame_order",
    "limits_from",
    "media_step",
    "normalise",
    "probe",
    "run_media",
    "stitch",
    "thumbnail",
    "thumbnail_grid",
    "watermark",
]
