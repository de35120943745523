"""A video file's sound laid under other frames (``stitch(audio=...)``): decoded as the output's
video reaches it, never held whole."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import av
import av.audio.stream
import av.container

from framepipe.errors import MediaError
from framepipe.media.audio import AudioQueue, audio_format
from framepipe.media.decoding import open_video
from framepipe.media.limits import LengthLimit
from framepipe.media.progress import check_stop
from framepipe.video_length import stream_start

__all__ = ["Soundtrack", "open_soundtrack"]


class Soundtrack:
    """The first sound track of a video file, fed into :attr:`queue` (None: no sound) as an
    output's video reaches it (:meth:`feed`), aligned with the file's video start as
    ``normalise`` aligns them. How far it has fed is judged by the decoded frames' timestamps
    or, when those stand still or are missing, by the samples decoded, so the decoding stays
    at most a sound frame ahead of the video, whatever the file's timestamps. A sound packet
    that cannot be decoded is skipped (the sound has a gap there), as players do; a file that
    cannot be read further is a :class:`MediaError` naming it."""

    def __init__(self, container: av.container.InputContainer | None, path: Path) -> None:
        self.path = path
        self.queue: AudioQueue | None = None
        self._frames: Iterator[av.AudioFrame] = iter(())
        self._start = 0.0
        self._fed = 0.0
        self._from: float | None = None
        self._samples = 0
        if container is None or not container.streams.audio or not container.streams.video:
            return
        sound = container.streams.audio[0]
        self._start = self._fed = stream_start(container.streams.video[0])
        self.queue = AudioQueue(audio_format(sound))
        self.queue.begin(self._start)
        self._frames = self._decode(container, sound)

    def _decode(
        self, container: av.container.InputContainer, sound: av.audio.stream.AudioStream
    ) -> Iterator[av.AudioFrame]:
        try:
            for packet in container.demux(sound):
                check_stop()
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    continue
                for frame in frames:
                    assert isinstance(frame, av.AudioFrame)
                    yield frame
        except av.FFmpegError as exc:
            raise MediaError(self.path, f"its sound cannot be read ({exc})") from exc

    def feed(self, seconds: float) -> None:
        """Queue the sound up to ``seconds`` of the output (from its start)."""
        if self.queue is None:
            return
        while self._fed < self._start + seconds:
            frame = next(self._frames, None)
            if frame is None:
                self._fed = math.inf
                return
            self.queue.push(frame)
            rate = frame.sample_rate or 1
            timed = None if frame.time is None else float(frame.time)
            if self._from is None:
                self._from = self._start if timed is None else timed
            self._samples += frame.samples
            by_count = self._from + self._samples / rate
            by_time = -math.inf if timed is None else timed + frame.samples / rate
            self._fed = max(by_count, by_time)


@contextlib.contextmanager
def open_soundtrack(
    path: Path | str | None, *, max_pixels: int, length: LengthLimit
) -> Iterator[Soundtrack]:
    """The :class:`Soundtrack` of the video file at ``path`` (opened with
    :func:`~framepipe.media.decoding.open_video`: a missing or non-video file, or one over the
    limits, is a :class:`MediaError` naming it, before anything is written), or a silent one
    when ``path`` is None."""
    if path is None:
        yield Soundtrack(None, Path())
        return
    path = Path(path)
    with open_video(path, max_pixels=max_pixels, length=length) as (container, _video):
        yield Soundtrack(container, path)
