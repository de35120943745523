"""The media toolkit's length limit: a file whose header announces more media than
``max_duration`` seconds (or more frames than ``max_frame_count``) is refused before a frame is
decoded; one whose header says nothing (a raw ``.h264`` stream) or less (a live Matroska's
sound) is stopped at the frame that passes the limit, leaving no output; what a function
writes (a raised frame rate, joined parts, stitched or extracted images) is held to it too; and
the job steps pass in ``FRAMEPIPE_MEDIA_MAX_DURATION`` and ``FRAMEPIPE_MEDIA_MAX_FRAME_COUNT``.
Real clips made with PyAV, real FFmpeg, the real job engine."""

from __future__ import annotations

import inspect
import io
import shutil
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest

from framepipe import ExecutionStatus, Pipeline, Settings
from framepipe.backends.objects import ObjectStore
from framepipe.errors import MediaError
from framepipe.media import (
    DEFAULT_MAX_DURATION,
    DEFAULT_MAX_FRAME_COUNT,
    concat,
    decode_qr,
    extract_frames,
    normalise,
    probe,
    stitch,
    thumbnail,
    thumbnail_grid,
    watermark,
)
from framepipe.media.progress import stop_when
from framepipe.media.steps import Input, media_step
from media import corrupt_first_frame, make_clip
from test_media_steps import run

FAST = "ultrafast"
SIZE = (64, 48)

Run = Callable[..., object]

DECODING: dict[str, Callable[[Path, Path], Run]] = {
    "normalise": lambda src, out: (
        lambda **limits: normalise(src, out / "n.mp4", preset=FAST, **limits)
    ),
    "extract_frames": lambda src, out: (
        lambda **limits: extract_frames(src, out / "frames", **limits)
    ),
    "thumbnail": lambda src, out: lambda **limits: thumbnail(src, out / "t.jpg", at=9, **limits),
    "thumbnail_grid": lambda src, out: (
        lambda **limits: thumbnail_grid(src, out / "g.jpg", width=64, **limits)
    ),
    "watermark": lambda src, out: (
        lambda **limits: watermark(src, out / "w.mp4", text="x", preset=FAST, **limits)
    ),
    "concat": lambda src, out: lambda **limits: concat([src], out / "c.mp4", preset=FAST, **limits),
    "decode_qr": lambda src, out: lambda **limits: decode_qr(src, **limits),
}
"""Every function that decodes a video's frames, writing under ``out``."""


def files(folder: Path) -> list[str]:
    """Every file under ``folder`` (temp files of an atomic write included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def checked(call: Run) -> tuple[MediaError, int]:
    """The MediaError ``call`` raises, and how many frames or packets it handled before
    (:func:`stop_when`'s check runs before each frame or packet decoded and each unit of
    work counted)."""
    calls = 0

    def count() -> None:
        nonlocal calls
        calls += 1

    with pytest.raises(MediaError) as info, stop_when(count):
        call()
    return info.value, calls


class _Pipe(io.RawIOBase):
    """A file that cannot be sought, as a pipe: the muxer writes no duration into the header."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: Any) -> int:
        return self.file.write(data)


def live_mkv(path: Path, *, video_seconds: int, audio_seconds: int, fps: int = 25) -> Path:
    """A Matroska file written as a live recording (to a pipe: no duration, no cues), its sound
    (silence, 8 kHz) lasting ``audio_seconds``, its video ``video_seconds``."""
    rate = 8000
    with open(path, "wb") as out, av.open(_Pipe(out), "w", format="matroska") as container:
        video = container.add_stream("libx264", rate=fps)
        assert isinstance(video, av.VideoStream)
        video.width, video.height, video.pix_fmt = *SIZE, "yuv420p"
        video.options = {"preset": FAST}
        sound = container.add_stream("aac", rate=rate)
        assert isinstance(sound, av.AudioStream)
        sound.layout = "mono"
        for i in range(video_seconds * fps):
            frame = av.VideoFrame.from_ndarray(
                np.full((SIZE[1], SIZE[0], 3), i % 256, np.uint8), format="bgr24"
            )
            frame.pts, frame.time_base = i, Fraction(1, fps)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        total = audio_seconds * rate
        for at in range(0, total, 1024):
            samples = np.zeros((1, min(1024, total - at)), np.float32)
            chunk = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = rate, at, Fraction(1, rate)
            container.mux(sound.encode(chunk))
        container.mux(sound.encode(None))
    return path


# -- from the header ------------------------------------------------------------------------


@pytest.mark.parametrize("operation", list(DECODING))
def test_a_clip_longer_than_the_limit_is_refused_from_its_header_before_decoding(
    tmp_path: Path, operation: str
) -> None:
    """A 4 s clip (100 frames) whose header says so, its first frame made undecodable: over
    the limit it is refused by its length, with nothing decoded; within it, it decodes."""
    clip = make_clip(
        tmp_path / "clip.mp4", frames=100, size=SIZE, options={"movflags": "faststart"}
    )
    broken = corrupt_first_frame(clip, tmp_path / "broken.mp4")
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(MediaError, match="decod"):  # decoding it fails: a real decode
        DECODING[operation](broken, out)(max_duration=0, max_frame_count=0)
    for path in list(out.iterdir()):  # what a decode failure of extract_frames left, if any
        assert path.is_dir() and files(path) == []

    err, calls = checked(lambda: DECODING[operation](broken, out)(max_duration=2))
    assert (err.path, calls) == (broken, 0)
    assert err.reason == (
        "its header announces 4 s of media, longer than the limit of 2 s: refused before "
        "decoding; raise the limit with max_duration= or the setting "
        "FRAMEPIPE_MEDIA_MAX_DURATION (0: no limit)"
    )
    err, calls = checked(lambda: DECODING[operation](broken, out)(max_frame_count=99))
    assert (err.path, calls) == (broken, 0)
    assert err.reason == (
        "its header announces 100 frames, more than the limit of 99 frames: refused before "
        "decoding; raise the limit with max_frame_count= or the setting "
        "FRAMEPIPE_MEDIA_MAX_FRAME_COUNT (0: no limit)"
    )
    assert files(out) == []

    DECODING[operation](clip, out)(max_duration=4, max_frame_count=100)  # at the limits: fine


def test_a_sound_track_longer_than_the_limit_is_refused_from_the_header(tmp_path: Path) -> None:
    """The sound is decoded and written too (normalise keeps it whole): the file's length is
    its longest stream's."""
    clip = make_clip(tmp_path / "clip.mp4", frames=25, size=SIZE, tone_hz=440, audio_seconds=5)
    with pytest.raises(MediaError, match=r"its header announces 5(\.\d\d)? s of media, longer"):
        normalise(clip, tmp_path / "n.mp4", preset=FAST, max_duration=2)
    assert files(tmp_path) == ["clip.mp4"]
    assert probe(clip).duration == 1.0  # probe tells the length: it takes no length limit


# -- while decoding -------------------------------------------------------------------------


@pytest.mark.parametrize("operation", [op for op in DECODING if op != "thumbnail_grid"])
def test_a_raw_stream_past_the_limit_is_stopped_while_decoding_leaving_no_output(
    tmp_path: Path, operation: str
) -> None:
    """A raw .h264 stream's header announces no length: 10 s (250 frames) of it under a 2 s
    limit decoded to its end, writing its whole output; it is stopped at 2 s (frame 51), named,
    and leaves nothing. (thumbnail_grid is not here: without a length it takes every tile from
    the first frame, decoding no further.)"""
    raw = make_clip(tmp_path / "clip.h264", frames=250, size=SIZE)
    out = tmp_path / "out"
    out.mkdir()
    run = DECODING[operation](raw, out)

    err, calls = checked(lambda: run(max_duration=2))
    assert err.path == raw
    assert err.reason == (
        "its video runs past the limit of 2 s of media (its header announces no length): "
        "stopped while decoding, at 2.00 s; raise the limit with max_duration= or the "
        "setting FRAMEPIPE_MEDIA_MAX_DURATION (0: no limit)"
    )
    assert calls < 250  # stopped long before the end (a check per frame, and per image)
    assert files(out) == []

    err, calls = checked(lambda: run(max_frame_count=30))
    assert err.path == raw
    assert err.reason == (
        "its video runs past the limit of 30 frames (its header announces no length): "
        "stopped while decoding, at frame 31; raise the limit with max_frame_count= or the "
        "setting FRAMEPIPE_MEDIA_MAX_FRAME_COUNT (0: no limit)"
    )
    assert calls < 250
    assert files(out) == []

    run(max_duration=10, max_frame_count=250)  # its last frame starts at 9.96 s: within


def test_a_raw_stream_within_the_limit_is_decoded_whole(tmp_path: Path) -> None:
    raw = make_clip(tmp_path / "clip.h264", frames=50, size=SIZE)
    out = normalise(raw, tmp_path / "n.mp4", preset=FAST, max_duration=2, max_frame_count=50)
    assert probe(out).frames == 50
    assert len(extract_frames(raw, tmp_path / "frames", max_duration=2, max_frame_count=50)) == 50
    # a scan that max_frames ends at the limit decodes no frame past it
    assert decode_qr(raw, max_frames=30, max_frame_count=30) is None


def test_a_sound_past_the_limit_in_a_file_whose_header_tells_no_length_is_stopped(
    tmp_path: Path,
) -> None:
    """A live Matroska recording (no duration in its header): 1 s of video, 5 s of sound.
    normalise keeps the sound whole, so it is held to the limit as the video is."""
    live = live_mkv(tmp_path / "live.mkv", video_seconds=1, audio_seconds=5)
    dst = tmp_path / "out" / "n.mp4"
    with pytest.raises(MediaError) as info:
        normalise(live, dst, preset=FAST, max_duration=2)
    assert info.value.path == live
    assert info.value.reason.startswith(
        "its sound runs past the limit of 2 s of media (its header announces no length): "
        "stopped while decoding, at 2."
    ), info.value.reason
    assert files(tmp_path / "out") == []
    normalise(live, dst, preset=FAST, max_duration=2, audio=False)  # the video alone: 1 s
    assert probe(dst).audio_codec is None


# -- what is written ------------------------------------------------------------------------


def test_an_output_longer_than_its_source_is_held_to_the_limit(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=100, size=SIZE)  # 4 s
    raw = make_clip(tmp_path / "clip.h264", frames=50, size=SIZE)  # 2 s, its length unknown
    out = tmp_path / "out"
    out.mkdir()

    # a raised frame rate: refused from the header, else stopped as it is written
    with pytest.raises(MediaError) as info:
        normalise(clip, out / "n.mp4", fps=100, preset=FAST, max_frame_count=300)
    assert info.value.reason.startswith(
        "at 100 fps its output holds 400 frames, more than the limit of 300 frames: refused "
        "before decoding; raise the limit with max_frame_count="
    ), info.value.reason
    with pytest.raises(MediaError) as info:
        normalise(raw, out / "n.mp4", fps=100, preset=FAST, max_frame_count=150)
    assert info.value.path == raw
    assert info.value.reason.startswith(
        "its output runs past the limit of 150 frames: stopped while writing, at frame 151; "
        "raise the limit with max_frame_count="
    ), info.value.reason
    # extract_frames had written 150 images when it was stopped: it removes them
    with pytest.raises(MediaError, match="its output runs past the limit of 150 frames"):
        extract_frames(raw, out / "frames", fps=100, max_frame_count=150)
    assert files(out) == []

    # parts joined: each within the limit, together past it
    main = Path(shutil.copy(clip, tmp_path / "main.mp4"))
    with pytest.raises(MediaError) as info:
        concat([clip, main], out / "c.mp4", max_duration=6)
    assert info.value.path == main
    assert info.value.reason.startswith(
        "joined at 25 fps, the parts up to this one make 8 s of media, longer than the limit "
        "of 6 s: refused before decoding"
    ), info.value.reason
    second = make_clip(tmp_path / "second.h264", frames=50, size=SIZE)
    parts = [raw, make_clip(tmp_path / "middle.h264", frames=50, size=SIZE), second]
    with pytest.raises(MediaError) as info:
        concat(parts, out / "c.mp4", preset=FAST, max_duration=5)
    assert info.value.path == second
    assert info.value.reason.startswith(
        "the joined output, at this part, runs past the limit of 5 s of media: stopped while "
        "writing, at 5.00 s; raise the limit with max_duration="
    ), info.value.reason
    assert files(out) == []

    # images stitched: their count at the frame rate is the video's length
    images = tmp_path / "images"
    extract_frames(clip, images, every=10)
    with pytest.raises(MediaError) as info:
        stitch(images, out / "s.mp4", fps=5, max_duration=1)
    assert info.value.path == images
    assert info.value.reason.startswith(
        "its 10 images at 5 fps make 2 s of media, longer than the limit of 1 s: refused "
        "before decoding"
    ), info.value.reason
    assert files(out) == []
    assert probe(stitch(images, out / "s.mp4", fps=5, max_duration=2)).frames == 10


# -- parameters and settings ----------------------------------------------------------------


def test_the_limits_are_parameters_with_defaults_and_no_setting_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DEFAULT_MAX_DURATION == 6 * 3600 and DEFAULT_MAX_FRAME_COUNT == 60 * 6 * 3600
    settings = Settings()
    assert settings.media_max_duration == DEFAULT_MAX_DURATION
    assert settings.media_max_frame_count == DEFAULT_MAX_FRAME_COUNT
    for fn in (normalise, extract_frames, stitch, thumbnail, thumbnail_grid, watermark, concat):
        params = inspect.signature(fn).parameters
        assert params["max_duration"].default == DEFAULT_MAX_DURATION, fn
        assert params["max_frame_count"].default == DEFAULT_MAX_FRAME_COUNT, fn
    assert "max_duration" not in inspect.signature(probe).parameters
    raw = make_clip(tmp_path / "clip.h264", frames=50, size=SIZE)
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_DURATION", "1")  # not read here
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_FRAME_COUNT", "lots")  # not read: no ConfigError
    assert len(extract_frames(raw, tmp_path / "frames")) == 50
    for bad in (-1, None, True, float("nan"), float("inf"), "10"):
        with pytest.raises(ValueError, match="max_duration must be a number of seconds >= 0"):
            extract_frames(raw, tmp_path / "f", max_duration=bad)  # type: ignore[arg-type]
    for bad in (-1, None, True, 1.5, "10"):
        with pytest.raises(ValueError, match="max_frame_count must be a whole number >= 0"):
            extract_frames(raw, tmp_path / "f", max_frame_count=bad)  # type: ignore[arg-type]


def test_the_steps_pass_the_settings_in(
    settings: Settings,
    tmp_path: Path,
    objects: ObjectStore,
    scratch: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FRAMEPIPE_MEDIA_MAX_DURATION and FRAMEPIPE_MEDIA_MAX_FRAME_COUNT, read when the step
    runs, reach the function: a client's raw stream past the duration is stopped, naming its
    key and the setting, uploading nothing and leaving no temp folder; a bad value fails the
    step naming the variable; 0 is no limit."""
    objects.put_file("uploads/clip.h264", make_clip(tmp_path / "clip.h264", frames=100, size=SIZE))
    p = Pipeline("long")
    media_step(p, "normalise", source="clip", preset=FAST)
    inputs = {"clip": "uploads/clip.h264"}

    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_DURATION", "2")
    failed = run(settings, p, inputs)
    assert failed.status is ExecutionStatus.FAILED
    message = failed.errors["normalise"].splitlines()[0]
    assert message.startswith(
        "MediaError: uploads/clip.h264: its video runs past the limit of 2 s of media (its "
        "header announces no length): stopped while decoding, at 2.00 s"
    ), message
    assert "FRAMEPIPE_MEDIA_MAX_DURATION" in message and str(scratch) not in message
    assert list(scratch.iterdir()) == []
    assert list(objects.list("media/")) == []

    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_DURATION", "0")
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_FRAME_COUNT", "99")
    failed = run(settings, p, inputs)
    assert "past the limit of 99 frames" in failed.errors["normalise"]
    assert "FRAMEPIPE_MEDIA_MAX_FRAME_COUNT" in failed.errors["normalise"]

    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_FRAME_COUNT", "many")
    failed = run(settings, p, inputs)
    assert failed.errors["normalise"].startswith("ConfigError:"), failed.errors["normalise"]
    assert "FRAMEPIPE_MEDIA_MAX_FRAME_COUNT" in failed.errors["normalise"]

    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_FRAME_COUNT", "0")
    done = run(settings, p, inputs)
    assert done.status is ExecutionStatus.COMPLETED, done.errors
    assert done.data["normalise"]["info"]["frames"] == 100
    assert list(scratch.iterdir()) == []


def test_the_length_limit_is_a_step_option_too(settings: Settings, tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=100, size=SIZE)  # 4 s
    p = Pipeline("option")
    media_step(p, "extract_frames", source="clip", every=25, max_duration=Input("longest", None))
    refused = run(settings, p, {"clip": str(clip), "longest": 3})
    assert f"{clip}: its header announces 4 s of media" in refused.errors["extract_frames"]
    allowed = run(settings, p, {"clip": str(clip)})  # no input: the setting (6 hours)
    assert allowed.status is ExecutionStatus.COMPLETED, allowed.errors
    assert allowed.data["extract_frames"]["count"] == 4


def test_steps_that_call_the_toolkit_pass_the_operators_limits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The ML video pipeline's and the SD import's own steps call the toolkit themselves: they
    give it the same limits as the built-in media steps, read from the settings when they run
    (probe takes no length limit)."""
    import sys

    from framepipe.pipelines import ml_video

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "1000000")
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_DURATION", "7.5")
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_FRAME_COUNT", "90")
    expected = {"max_pixels": 1_000_000, "max_duration": 7.5, "max_frame_count": 90}
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples" / "sd_import"))
    sys.modules.pop("sd_pipeline", None)
    import sd_pipeline

    for limits in (ml_video._limits, sd_pipeline.limits):
        assert limits() == expected
        assert limits(length=False) == {"max_pixels": 1_000_000}


def test_a_video_shorter_than_half_a_frame_at_the_fps_asked_is_refused_leaving_no_output(
    tmp_path: Path,
) -> None:
    """One frame at 25 fps lasts 40 ms; at 10 fps half a frame is 50 ms, so the output would
    hold no frame: refused naming the file and the rate, not written as an empty MP4."""
    src = make_clip(tmp_path / "one.mp4", frames=1, size=SIZE)
    dst = tmp_path / "out.mp4"
    with pytest.raises(MediaError, match=r"less than half a frame at 10 fps") as refused:
        normalise(src, dst, fps=10, preset=FAST)
    assert refused.value.path == src
    assert not dst.exists() and list(tmp_path.iterdir()) == [src]
    normalise(src, dst, fps=12.5, preset=FAST)  # 40 ms is half a frame at 12.5 fps: one frame
    assert probe(dst).frames == 1
