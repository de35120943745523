"""Video toolkit on PyAV (FFmpeg's libraries): probe, normalise, frames, thumbnails,
watermark, concatenation, QR decoding.

Every function is a plain function on paths. Long operations take
``progress: Callable[[float], None] | None`` and report 0-100 (frames done / total; a step
passes ``ctx.progress``). Every output is written to a temp file beside ``dst`` and renamed
when complete, so a failed or interrupted run leaves no partial file at ``dst``. Unreadable or
non-video inputs raise :class:`MediaError` naming the file. Sound is kept (re-encoded to
AAC) and rotated clips come out upright.

Each function is also a ready job step: :func:`media_step` adds one to a pipeline and
:func:`run_media` runs one inside a step of your own (:mod:`framepipe.media.steps`: temp folder
per step, inputs from the object store or local paths, outputs uploaded, real progress).
"""

from __future__ import annotations

from framepipe.errors import MediaError
from framepipe.media._io import ProgressCallback, atomic_output
from framepipe.media.concat import concat
from framepipe.media.frames import extract_frames, stitch
from framepipe.media.normalise import normalise
from framepipe.media.probe import MediaInfo, probe
from framepipe.media.qr import QrCode, QrResult, decode_qr
from framepipe.media.steps import Input, media_step, run_media
from framepipe.media.thumbnails import thumbnail, thumbnail_grid
from framepipe.media.watermark import watermark

__all__ = [
    "Input",
    "MediaError",
    "MediaInfo",
    "ProgressCallback",
    "QrCode",
    "QrResult",
    "atomic_output",
    "concat",
    "decode_qr",
    "extract_frames",
    "media_step",
    "normalise",
    "probe",
    "run_media",
    "stitch",
    "thumbnail",
    "thumbnail_grid",
    "watermark",
]
