"""Sound kept through a re-encode: the AAC format that keeps a source's sound, and the queue
that carries converted samples onto an output's timeline."""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

import av
import av.audio.stream
import numpy as np

__all__ = ["AAC_RATES", "AudioFormat", "AudioQueue", "audio_format", "silence"]

AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000)
"""Sample rates the AAC encoder takes; another source rate is converted to 48 kHz."""


@dataclass(frozen=True)
class AudioFormat:
    """The audio of an output: AAC at ``rate`` Hz, ``layout`` ``mono`` or ``stereo``."""

    rate: int
    layout: str

    @property
    def channels(self) -> int:
        return 1 if self.layout == "mono" else 2


def audio_format(stream: av.audio.stream.AudioStream) -> AudioFormat:
    """The output format that keeps ``stream``'s sound: its rate (48 kHz if AAC lacks it),
    mono for one channel, else stereo (more channels are mixed down)."""
    ctx = stream.codec_context
    rate = int(ctx.sample_rate or stream.rate or 48000)
    channels = ctx.layout.nb_channels if ctx.layout is not None else 2
    return AudioFormat(rate if rate in AAC_RATES else 48000, "mono" if channels == 1 else "stereo")


def silence(fmt: AudioFormat, samples: int) -> Iterator[np.ndarray]:
    """``samples`` of silence in ``fmt`` (planar float), as blocks of at most one second that
    are views of one zeroed second: hours of silence (a long part without sound, a sound that
    starts late) take one second's memory, and no block makes an outsized audio frame."""
    second = np.zeros((fmt.channels, fmt.rate), np.float32)
    while samples > 0:
        n = min(samples, fmt.rate)
        yield second[:, :n]
        samples -= n


class AudioQueue:
    """Audio on its way into one output file, on the output's timeline.

    Source frames (any format, rate, layout) are converted to ``fmt`` (planar float) and
    queued; :class:`H264Writer` takes them out as its video reaches them, so the file is
    interleaved. A source is a *part* (:meth:`begin`): its audio is aligned with its video,
    source time ``t0`` (the video's start) landing at the part's start on the output timeline;
    audio that starts later is preceded by silence, audio that starts earlier is cut."""

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._pending: collections.deque[np.ndarray] = collections.deque()
        self.pending_samples = 0
        self._resampler: av.AudioResampler | None = None
        self._t0 = 0.0
        self._lead: int | None = None  # samples to pad (> 0) or cut (< 0) at the part's start
        self._first_time: float | None = None

    def begin(self, t0: float = 0.0) -> None:
        """Start a new part whose video starts at ``t0`` seconds of its source."""
        self._resampler = av.AudioResampler(
            format="fltp", layout=self.fmt.layout, rate=self.fmt.rate
        )
        self._t0 = t0
        self._lead = None
        self._first_time = None

    def push(self, frame: av.AudioFrame) -> None:
        """Queue one decoded source frame of the current part."""
        if self._resampler is None:
            self.begin()
        assert self._resampler is not None
        if self._first_time is None:
            self._first_time = float(frame.time) if frame.time is not None else self._t0
        for out in self._resampler.resample(frame):
            self._queue(out)

    def flush(self) -> None:
        """The current part's source has no more audio: drain the converter."""
        if self._resampler is not None:
            for out in self._resampler.resample(None):
                self._queue(out)
            self._resampler = None

    def _queue(self, frame: av.AudioFrame) -> None:
        samples = np.asarray(frame.to_ndarray(), dtype=np.float32)
        if self._lead is None:
            start = self._first_time if self._first_time is not None else self._t0
            self._lead = round((start - self._t0) * self.fmt.rate)
            if self._lead > 0:
                for block in silence(self.fmt, self._lead):
                    self._append(block)
                self._lead = 0
        if self._lead < 0:
            cut = min(-self._lead, samples.shape[1])
            samples = samples[:, cut:]
            self._lead += cut
        if samples.shape[1]:
            self._append(samples)

    def _append(self, samples: np.ndarray) -> None:
        self._pending.append(samples)
        self.pending_samples += samples.shape[1]

    def take(self, limit: int | None = None) -> list[np.ndarray]:
        """Remove and return up to ``limit`` queued samples (all if None), in order."""
        out: list[np.ndarray] = []
        want = self.pending_samples if limit is None else max(0, min(limit, self.pending_samples))
        while want > 0:
            head = self._pending[0]
            if head.shape[1] <= want:
                out.append(self._pending.popleft())
            else:
                out.append(head[:, :want])
                self._pending[0] = head[:, want:]
            taken = out[-1].shape[1]
            want -= taken
            self.pending_samples -= taken
        return out

    def clear(self) -> None:
        """Drop whatever is queued."""
        self._pending.clear()
        self.pending_samples = 0
