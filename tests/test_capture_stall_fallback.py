"""``capture="auto"`` on a stream that gst-launch-1.0 hangs on: an MJPEG camera over HTTP
(``multipart/x-mixed-replace``, as IP cameras serve it), which gst-launch-1.0 opens and then
holds in buffering without a frame or an exit, while ffmpeg plays it. After three sessions in
a row that stalled before their first frame, one ffmpeg session is tried: a source it delivers
frames for keeps ffmpeg (said once, in the log and as ``source.capture_changed``); one it
does not goes back to gst-launch-1.0. Real HTTP servers, real gst-launch-1.0 and ffmpeg, the
real supervisor and pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import logging
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from framepipe.backoff import Backoff
from framepipe.errors import SourceStalledError
from framepipe.sources import CommandSource
from framepipe.sources.capture import capture_source
from framepipe.sources.command import Fallback
from framepipe.stream import StreamPipeline
from framepipe.supervise import Supervisor, SupervisorContext
from media import need_tool
from test_capture_failures import black_hole, said
from waiting import wait_until_async


class _MjpegCamera(http.server.BaseHTTPRequestHandler):
    """An MJPEG camera: each client gets a live ``multipart/x-mixed-replace`` stream of JPEG
    pictures (a real ffmpeg's ``mpjpeg``, 320x240 at 10 fps) until it hangs up."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace;boundary=ffmpeg")
        self.end_headers()
        argv = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-f", "lavfi", "-i"]
        argv += ["testsrc=size=320x240:rate=10", "-c:v", "mjpeg", "-f", "mpjpeg", "-"]
        encoder = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert encoder.stdout is not None
        try:
            while chunk := encoder.stdout.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
        except OSError:  # the client hung up
            pass
        finally:
            encoder.kill()
            encoder.wait()

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def mjpeg_camera() -> Iterator[str]:
    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    server = _Server(("127.0.0.1", 0), _MjpegCamera)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/video.mjpg"
    finally:
        server.shutdown()
        server.server_close()


def test_gst_launch_hangs_on_an_mjpeg_camera_that_ffmpeg_plays(mjpeg_camera: str) -> None:
    """The input the rule is for: gst-launch-1.0 (as ``auto`` runs it) is still running
    after 8 s without a byte on its stdout; ffmpeg delivers pictures from it."""
    source = capture_source(mjpeg_camera, "cam")
    assert isinstance(source, CommandSource) and source.argv[0] == "gst-launch-1.0"
    gst = subprocess.Popen(source.argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            gst.communicate(timeout=8)
    finally:
        gst.kill()
        out, _ = gst.communicate()
    assert out == b""
    assert source.fallback is not None
    ffmpeg = subprocess.run(
        [*source.fallback.argv[:-1], "-frames:v", "3", "-"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert ffmpeg.stdout.count(b"\xff\xd8") >= 3


def test_after_three_stalls_the_source_keeps_ffmpeg_when_it_delivers_frames(
    mjpeg_camera: str, caplog: pytest.LogCaptureFixture
) -> None:
    source = capture_source(mjpeg_camera, "cam")
    assert isinstance(source, CommandSource) and source.argv[0] == "gst-launch-1.0"
    pipeline = StreamPipeline(
        "cam",
        source,
        start_timeout=3,  # ffmpeg's first frame comes well within it, gst-launch's never
        stall_timeout=10,
        backoff=Backoff(0.05, 2, 0.2, 0),
        max_restarts=None,
    )
    events: list[tuple[str, dict[str, Any]]] = []
    pipeline.on_event(lambda kind, data: events.append((kind, data)))

    def of(kind: str) -> list[dict[str, Any]]:
        return [data for k, data in events if k == kind]

    async def main() -> None:
        await pipeline.start()
        try:
            await wait_until_async(
                "frames captured with ffmpeg", lambda: pipeline.frames_out >= 5, 90
            )
        finally:
            await pipeline.stop(drain_timeout=0)

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert source.argv[0] == "ffmpeg" and mjpeg_camera in source.argv
    assert source.fallback is None
    assert len(of("source.stalled")) == 3
    assert [(d["previous"], d["capture"]) for d in of("source.capture_changed")] == [
        ("GStreamer", "FFmpeg")
    ]
    assert "3 times in a row" in of("source.capture_changed")[0]["reason"]
    messages = said(caplog, "cam")
    kept = [m for m in messages if "capturing with FFmpeg from now on" in m]
    assert len(kept) == 1, messages
    assert "GStreamer stalls on this source, FFmpeg delivers frames" in kept[0]


def test_a_trial_of_ffmpeg_without_a_frame_goes_back_to_gst_launch() -> None:
    """A server that accepts the connection and never answers: gst-launch-1.0 and ffmpeg both
    wait for it. The trial of ffmpeg after three stalls ends without a frame, and the next
    session is gst-launch-1.0's again, the count of stalls anew."""
    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    with black_hole() as (port, _accepted):
        url = f"http://127.0.0.1:{port}/video.mjpg"
        source = capture_source(url, "cam")
        assert isinstance(source, CommandSource) and source.argv[0] == "gst-launch-1.0"
        gst = list(source.argv)
        programs: list[str] = []  # the program of each session, as it started
        stalls = asyncio.Semaphore(0)

        async def capture(ctx: SupervisorContext) -> None:
            def started(pid: int | None) -> None:
                programs.append(source.argv[0])
                ctx.started(pid)

            async with contextlib.aclosing(source.frames(started)) as frames:
                async for _frame in frames:
                    ctx.alive()

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "stalled":
                stalls.release()

        async def main() -> None:
            sup = Supervisor(
                "cam",
                capture,
                on_event=on_event,
                backoff=Backoff(0.05, 2, 0.2, 0),
                start_timeout=1.5,
                max_attempts=None,
            )
            await sup.start()
            try:
                for _ in range(6):
                    await asyncio.wait_for(stalls.acquire(), 60)
            finally:
                await sup.stop()

        asyncio.run(main())
    assert programs[:6] == ["gst-launch-1.0"] * 3 + ["ffmpeg"] + ["gst-launch-1.0"] * 2
    assert source.argv == gst and source.fallback is not None


async def _stalled_session(source: CommandSource) -> None:
    """One session of ``source`` cancelled by a stall (as the watchdog does) once started."""
    started = asyncio.Event()
    session = source.frames(started=lambda _pid: started.set())
    first = asyncio.ensure_future(session.__anext__())
    await asyncio.wait_for(started.wait(), 10)
    first.cancel(SourceStalledError("no first frame within 1s", source_id="cam"))
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await session.aclose()


async def _session_stopped_while_starting(source: CommandSource) -> None:
    """One session of ``source`` cancelled (a stop) while its process is being started."""
    session = source.frames()
    first = asyncio.ensure_future(session.__anext__())
    await asyncio.sleep(0)  # the session runs up to its first await: the start
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
    await session.aclose()


def test_a_trial_stopped_while_it_starts_keeps_the_own_command() -> None:
    """A stop that lands while the fallback's trial session starts gives the source its own
    command back: the next trial (after 3 more stalls) is the fallback's again, and its own
    command is never replaced by the fallback's for good."""
    own, fallback = ["sleep", "1000"], ["sleep", "999"]

    async def main() -> None:
        source = CommandSource(own, "cam", fallback=Fallback(fallback, lambda _lines: None))
        for _ in range(3):
            await _stalled_session(source)
        await _session_stopped_while_starting(source)  # the trial, stopped as it starts
        assert source.argv == own
        for _ in range(3):
            await _stalled_session(source)
        await _stalled_session(source)  # a trial of the fallback again, stalled too
        assert source.argv == own  # back to the own command after the trial

    asyncio.run(main())
