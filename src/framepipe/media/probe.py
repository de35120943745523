"""``probe``: what a video file holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av

from framepipe.errors import MediaError
from framepipe.media._io import estimate_frames, open_video

__all__ = ["MediaInfo", "probe"]


@dataclass(frozen=True)
class MediaInfo:
    """Facts about a video file.

    ``rotation`` is the display rotation in degrees counter-clockwise (0, 90, 180, 270), from
    the stream's display matrix or, failing that, the legacy ``rotate`` tag (which is clockwise).
    ``frames`` comes from the container header, else it is estimated from duration x fps.
    """

    path: Path
    duration: float
    fps: float
    frames: int
    width: int
    height: int
    video_codec: str
    pix_fmt: str | None
    audio_codec: str | None
    rotation: int
    size: int
    container: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (the path as a string)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _rotation_from_tag(tags: dict[str, str]) -> int | None:
    value = tags.get("rotate")
    if value is None:
        return None
    try:
        return (-int(float(value))) % 360
    except ValueError:
        return None


def probe(path: Path | str) -> MediaInfo:
    """Read a video file's duration, fps, frame count, size, codecs, rotation and byte size.

    Raises :class:`MediaError` naming the path for a missing, unreadable or non-video file."""
    path = Path(path)
    with open_video(path) as (container, stream):
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        rotation = None
        try:
            for frame in container.decode(stream):
                rotation = round(frame.rotation) % 360
                break
        except av.FFmpegError as exc:
            raise MediaError(path, f"the video stream cannot be decoded ({exc})") from exc
        if not rotation:
            rotation = _rotation_from_tag(dict(stream.metadata)) or rotation or 0
        audio = container.streams.audio
        return MediaInfo(
            path=path,
            duration=duration,
            fps=fps,
            frames=estimate_frames(stream, container),
            width=stream.width,
            height=stream.height,
            video_codec=stream.codec_context.name,
            pix_fmt=stream.pix_fmt,
            audio_codec=audio[0].codec_context.name if audio else None,
            rotation=rotation,
            size=path.stat().st_size,
            container=container.format.name,
        )
