"""The media toolkit given hostile files: a playlist dressed as a video reads no other file (not
one outside the roots a step was confined to), and a watermark image is held to the picture-size
limit before it is decoded. Real FFmpeg (PyAV) and OpenCV, and the real job engine."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from framepipe import ExecutionStatus, JobEngine, Pipeline, Settings, open_object_store
from framepipe.errors import MediaError
from framepipe.media import extract_frames, normalise, probe, thumbnail, watermark
from framepipe.media.steps import media_step
from media import make_clip

FAST = "ultrafast"


def hls_playlist(path: Path, segment: Path) -> Path:
    """An HLS playlist (what FFmpeg's ``hls`` demuxer reads) whose one segment is ``segment``."""
    path.write_text(
        "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n"
        f"#EXTINF:2.0,\n{segment}\n#EXT-X-ENDLIST\n"
    )
    return path


@pytest.fixture
def private_clip(tmp_path: Path) -> Path:
    """A clip in a folder no execution is allowed to read (MPEG-TS: an HLS segment's format)."""
    folder = tmp_path / "private"
    folder.mkdir()
    return make_clip(folder / "secret.ts", frames=50, size=(96, 64))


@pytest.mark.parametrize("name", ["evil.m3u8", "evil.m3u"])
def test_a_playlist_is_refused_naming_it_and_reads_no_other_file(
    tmp_path: Path, private_clip: Path, name: str
) -> None:
    """FFmpeg's hls demuxer read the clip the playlist named, anywhere on the disk: probe
    said 96x64 and normalise wrote the private clip into its output."""
    playlist = hls_playlist(tmp_path / name, private_clip)
    dst = tmp_path / "out" / "out.mp4"
    runs: dict[str, Callable[[], object]] = {
        "probe": lambda: probe(playlist),
        "normalise": lambda: normalise(playlist, dst, preset=FAST),
        "extract_frames": lambda: extract_frames(playlist, tmp_path / "frames"),
        "thumbnail": lambda: thumbnail(playlist, tmp_path / "t.jpg"),
    }
    for operation, call in runs.items():
        with pytest.raises(MediaError, match="is an HLS playlist, which names other files") as e:
            call()
        assert e.value.path == playlist, operation
    assert not dst.exists()
    assert not (tmp_path / "frames").exists() or list((tmp_path / "frames").iterdir()) == []


def test_an_ffconcat_list_is_refused_naming_it(tmp_path: Path) -> None:
    make_clip(tmp_path / "part.mp4", frames=10, size=(64, 48))
    listing = tmp_path / "list.mp4"
    listing.write_text("ffconcat version 1.0\nfile part.mp4\n")
    with pytest.raises(MediaError, match="is an ffconcat list, which names other files"):
        probe(listing)


def test_a_step_confined_to_its_roots_cannot_read_a_file_outside_them_through_a_playlist(
    settings: Settings, tmp_path: Path, private_clip: Path
) -> None:
    """A client, confined to ``uploads`` (as over HTTP), uploads an object ``up/evil.m3u8``
    naming a video outside the roots and has it normalised: the step published the private
    video for the client to fetch."""
    objects = open_object_store(settings.resolved_objects_url)
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    objects.put_file("up/evil.m3u8", hls_playlist(tmp_path / "evil.m3u8", private_clip))
    p = Pipeline("playlist")
    media_step(p, "normalise", source="video", preset=FAST)

    async def main() -> Any:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(p, {"video": "up/evil.m3u8"}, input_roots=[uploads])
            return await engine.wait(execution_id, raise_on_failure=False)

    info = asyncio.run(asyncio.wait_for(main(), 120))
    assert info.status is ExecutionStatus.FAILED
    message = info.errors["normalise"].splitlines()[0]
    assert message.startswith("MediaError: up/evil.m3u8: is an HLS playlist"), message
    assert list(objects.list("media/")) == []


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` and whose pixels are one zlib stream of
    zero rows cut short: what a decompression bomb's first bytes look like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)  # 8-bit RGBA
    pixels = zlib.compress(b"\x00" * (1 + 4 * width) * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


def test_a_watermark_image_larger_than_the_limit_is_refused_before_it_is_decoded(
    tmp_path: Path,
) -> None:
    """The video was held to ``max_pixels``, its watermark image was not: OpenCV decoded any
    image it allows (up to 2**30 pixels, 4 GB as RGBA) and the watermark was written."""
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(64, 48))
    logo = tmp_path / "logo.png"
    cv2.imwrite(str(logo), np.full((200, 200, 4), 255, np.uint8))
    dst = tmp_path / "out" / "marked.mp4"
    with pytest.raises(MediaError, match=r"the watermark image is 200x200 \(40,000 pixels\)") as e:
        watermark(clip, dst, image=logo, max_pixels=100 * 100, preset=FAST)
    assert e.value.path == logo and not dst.exists()

    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(MediaError, match="the watermark image is 30000x30000") as e:
        watermark(clip, dst, image=bomb, preset=FAST)  # the default limit, 8192 x 8192
    assert e.value.path == bomb and not dst.exists()

    # within the limit, it is blended in
    watermark(clip, dst, image=logo, max_pixels=200 * 200, preset=FAST, margin=0)
    assert probe(dst).width == 64


def test_a_fifo_named_like_an_image_is_refused_at_once(tmp_path: Path) -> None:
    """A FIFO planted where a frame or a watermark image is expected (a shared folder): it is
    refused naming it, and no one waits for a writer that never comes."""
    import contextlib
    import os
    import threading

    from framepipe.media import stitch
    from waiting import wait_until

    frames = tmp_path / "frames"
    frames.mkdir()
    cv2.imwrite(str(frames / "f_0001.png"), np.zeros((48, 64, 3), np.uint8))
    os.mkfifo(frames / "f_0002.png")
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(64, 48))
    outcomes: list[BaseException | None] = []

    def attempt(call: Callable[[], Any]) -> None:
        try:
            call()
        except BaseException as exc:
            outcomes.append(exc)
        else:
            outcomes.append(None)

    calls: list[Callable[[], Any]] = [
        lambda: stitch(sorted(frames.iterdir()), tmp_path / "s.mp4", fps=5, preset=FAST),
        lambda: watermark(clip, tmp_path / "w.mp4", image=frames / "f_0002.png", preset=FAST),
    ]
    for call in calls:
        threading.Thread(target=attempt, args=(call,), daemon=True).start()
    try:
        wait_until("both refused", lambda: len(outcomes) == 2, 30)
    finally:  # a reader still blocked on it (the old code) is let go; none: ENXIO
        with contextlib.suppress(OSError):
            os.close(os.open(frames / "f_0002.png", os.O_WRONLY | os.O_NONBLOCK))
    for outcome in outcomes:
        assert isinstance(outcome, MediaError), outcome
        assert "is not a regular file" in str(outcome) and "f_0002.png" in str(outcome)


def test_a_jpeg_hiding_its_size_behind_a_stray_byte_or_cut_short_is_refused_undecoded(
    tmp_path: Path,
) -> None:
    """A stray byte between two segments (decoders skip it) must not hide a frame header
    that claims 10000 x 10000 from the picture limit; a JPEG cut before its frame header is
    refused as corrupt rather than decoded to learn its size."""
    clip = make_clip(tmp_path / "clip.mp4", frames=5, size=(64, 48))
    data = cv2.imencode(".jpg", np.zeros((48, 64, 3), np.uint8))[1].tobytes()
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    sof = data.index(b"\xff\xc0")
    big = bytearray(data)
    big[sof + 5 : sof + 9] = (10000).to_bytes(2, "big") + (10000).to_bytes(2, "big")
    hidden = tmp_path / "hidden.jpg"
    hidden.write_bytes(bytes(big[:app0_end]) + b"\x00" + bytes(big[app0_end:]))
    with pytest.raises(MediaError, match=r"the watermark image is 10000x10000") as e:
        watermark(clip, tmp_path / "w.mp4", image=hidden, max_pixels=100 * 100, preset=FAST)
    assert e.value.path == hidden

    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: sof - 1])
    with pytest.raises(MediaError, match="is a truncated or corrupt JPEG image"):
        watermark(clip, tmp_path / "w.mp4", image=cut, preset=FAST)


def test_an_image_over_the_limit_is_refused_before_the_rest_of_its_file_is_read(
    tmp_path: Path,
) -> None:
    """A PNG header claiming 30000 x 30000, followed by 64 MB: refused by its header, having
    read only the first of it (not the whole file into memory)."""
    import tracemalloc

    from framepipe.media.frames import read_image

    bomb = png_header_only(tmp_path / "bomb.png", 30000, 30000)
    with bomb.open("ab") as out:
        out.write(b"\0" * (64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(MediaError, match="30000x30000"):
            read_image(bomb, 100 * 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak
