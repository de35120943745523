"""``probe``: what a video file holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av

from framepipe.errors import MediaError
from framepipe.media._io import estimate_frames, frame_rotation, open_video

__all__ = ["MediaInfo", "probe"]


@dataclass(frozen=True)
class MediaInfo:
    """Facts about a video file.

    ``rotation`` is the display rotation in degrees counter-clockwise (0, 90, 180, 270), from
    the stream's display matrix or, failing that, the legacy ``rotate`` tag (which is
    clockwise): how far players turn the stored picture to show it upright. ``width`` and
    ``height`` are of the stored picture; :attr:`display_size` is the upright one. The media
    functions that write images or video turn it upright themselves.
    ``frames`` comes from the container header, else it is estimated from duration x fps.
    ``audio_duration`` is the first audio stream's length in seconds (None without audio).
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
    audio_duration: float | None = None

    @property
    def display_size(self) -> tuple[int, int]:
        """(width, height) as shown: the stored size, swapped by a quarter-turn rotation."""
        if self.rotation in (90, 270):
            return self.height, self.width
        return self.width, self.height

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready values (the path as a string)."""
        data = asdict(self)
        data["path"] = str(self.path)
        return data


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
        first = None
        try:
            for frame in container.decode(stream):
                first = frame
                break
        except av.FFmpegError as exc:
            raise MediaError(path, f"the video stream cannot be decoded ({exc})") from exc
        rotation = frame_rotation(first, stream)
        audio = container.streams.audio
        audio_duration = None
        if audio:
            sound = audio[0]
            if sound.duration is not None and sound.time_base is not None:
                audio_duration = float(sound.duration * sound.time_base)
            else:
                audio_duration = duration
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
            audio_duration=audio_duration,
        )
