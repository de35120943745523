"""The H.264 writer: frames (and an :class:`~framepipe.media.audio.AudioQueue`'s sound) into an
MP4 at a constant frame rate, and the even output sizes H.264 4:2:0 needs."""

from __future__ import annotations

import contextlib
from fractions import Fraction
from pathlib import Path

import av
import av.audio.stream
import numpy as np
from av.video.reformatter import VideoReformatter

from framepipe.media.audio import AudioQueue, silence
from framepipe.media.limits import LengthGuard

__all__ = ["H264Writer", "even", "fit_size"]


def even(n: float) -> int:
    """``n`` rounded to the nearest even integer, at least 2 (H.264 4:2:0 needs even sides)."""
    return max(2, int(n / 2 + 0.5) * 2)


def fit_size(src_w: int, src_h: int, width: int | None, height: int | None) -> tuple[int, int]:
    """Output size: both given -> as given; one -> the other keeps the aspect; none -> source.

    Always even."""
    if width is not None and height is not None:
        return even(width), even(height)
    if width is not None:
        return even(width), even(src_h * width / src_w)
    if height is not None:
        return even(src_w * height / src_h), even(height)
    return even(src_w), even(src_h)


class H264Writer:
    """Encodes frames into an H.264 MP4 (libx264) at a constant frame rate, with an AAC track
    when given an :class:`AudioQueue`.

    Frames of another size or pixel format are converted (libswscale) on the way in, by one
    scaler kept for the whole file (building one per frame costs ~5x more). The encoder uses
    frame threads, as the ffmpeg command line does, so encoding overlaps the caller's work.

    Length: given a ``guard`` (:class:`~framepipe.media.limits.LengthGuard`), each frame is
    told to it (frame ``n`` starts at ``n / fps``) before it is encoded, and the frame that
    passes its limit raises :class:`~framepipe.errors.MediaError` instead: a frame rate raised
    or parts joined cannot make an output longer than the limit its sources are held to.

    Audio: after each video frame the queued audio up to that frame's end is encoded, so the
    tracks interleave. :meth:`end_part` makes the audio exactly as long as the video so far
    (cut, or padded with silence); :meth:`close` writes the rest of the queue (audio may run
    past the last frame, as the ffmpeg command line keeps it)."""

    def __init__(
        self,
        path: Path,
        *,
        width: int,
        height: int,
        fps: Fraction,
        crf: int = 23,
        preset: str = "medium",
        pix_fmt: str = "yuv420p",
        audio: AudioQueue | None = None,
        audio_bitrate: int = 128_000,
        guard: LengthGuard | None = None,
    ) -> None:
        self.path = path
        self.guard = guard
        self.width, self.height = width, height
        self.pix_fmt = pix_fmt
        self.fps = fps
        self.frames = 0
        self.audio = audio
        self.audio_samples = 0
        self._container = av.open(str(path), "w", format="mp4")
        try:
            stream = self._container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
            stream.options = {"crf": str(crf), "preset": preset}
            stream.codec_context.thread_type = "FRAME"
            self._stream = stream
            self._scaler = VideoReformatter()
            self._time_base = Fraction(1) / fps
            self._audio_stream: av.audio.stream.AudioStream | None = None
            if audio is not None:
                astream = self._container.add_stream("aac", rate=audio.fmt.rate)
                astream.layout = audio.fmt.layout
                astream.bit_rate = audio_bitrate
                self._audio_stream = astream
                self._audio_time_base = Fraction(1, audio.fmt.rate)
        except BaseException:
            self._container.close()
            raise

    def write(self, frame: av.VideoFrame) -> None:
        if self.guard is not None:
            self.guard.frame(self.frames / float(self.fps))
        if (frame.width, frame.height, frame.format.name) != (
            self.width,
            self.height,
            self.pix_fmt,
        ):
            frame = self._scaler.reformat(
                frame,
                width=self.width,
                height=self.height,
                format=self.pix_fmt,
                interpolation="BICUBIC",
            )
        frame.pts = self.frames
        frame.time_base = self._time_base
        self._container.mux(self._stream.encode(frame))
        self.frames += 1
        if self.audio is not None and self.audio.pending_samples:
            self._release(self._video_samples())

    def _video_samples(self) -> int:
        """The video's length so far, in audio samples."""
        assert self.audio is not None
        return round(self.frames * self.audio.fmt.rate / self.fps)

    def _release(self, until: int | None) -> None:
        """Encode queued audio up to output sample ``until`` (all of it if None)."""
        assert self.audio is not None
        limit = None if until is None else until - self.audio_samples
        for chunk in self.audio.take(limit):
            self._encode_audio(chunk)

    def _encode_audio(self, samples: np.ndarray | None) -> None:
        assert self._audio_stream is not None
        assert self.audio is not None
        if samples is None:
            self._container.mux(self._audio_stream.encode(None))
            return
        frame = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(samples), format="fltp", layout=self.audio.fmt.layout
        )
        frame.sample_rate = self.audio.fmt.rate
        frame.pts = self.audio_samples
        frame.time_base = self._audio_time_base
        self._container.mux(self._audio_stream.encode(frame))
        self.audio_samples += samples.shape[1]

    def end_part(self) -> None:
        """The current part's video and audio are all in: make the audio end where the video
        ends (cut the rest, or pad with silence)."""
        if self.audio is None:
            return
        self.audio.flush()
        end = self._video_samples()
        self._release(end)
        self.audio.clear()
        gap = end - self.audio_samples
        for block in silence(self.audio.fmt, gap):
            self._encode_audio(block)

    def close(self) -> None:
        try:
            if self.audio is not None:
                self.audio.flush()
                self._release(None)
                self._encode_audio(None)
            self._container.mux(self._stream.encode(None))
        finally:
            self._container.close()

    def abort(self) -> None:
        self._container.close()

    def __enter__(self) -> H264Writer:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            with contextlib.suppress(Exception):
                self.abort()
