"""``capture="auto"`` on a stream that GStreamer has no plug-in for: what a stream sends is
known only once gst-launch-1.0 tries it, so its first failure for want of a plug-in switches
the station to ffmpeg for good, said once. A real UDP MPEG-TS stream sent by a real ffmpeg,
read by the real gst-launch-1.0 and ffmpeg under the real supervisor."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from framepipe.backoff import Backoff
from framepipe.sources import CommandSource
from framepipe.sources.capture import _gst_has, capture_source
from framepipe.sources.stderr_lines import gst_cannot_play
from media import need_tool
from test_capture_failures import said, supervise
from waiting import free_port


def need_gst_without_tsdemux() -> None:
    need_tool("gst-launch-1.0")
    need_tool("ffmpeg")
    if _gst_has("tsdemux"):
        pytest.skip("this GStreamer plays MPEG-TS (tsdemux): no plug-in is missing")


@pytest.fixture
def udp_stream() -> Iterator[str]:
    """An MPEG-TS stream of H.264 on udp://127.0.0.1:<port>, sent for as long as the test runs."""
    port = free_port()
    url = f"udp://127.0.0.1:{port}"
    sender = subprocess.Popen(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x120:rate=10",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-tune",
            "zerolatency",
            "-g",
            "5",
            "-f",
            "mpegts",
            f"{url}?pkt_size=1316",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield url
    finally:
        sender.kill()
        sender.wait()


def test_a_stream_gstreamer_cannot_decode_is_captured_with_ffmpeg(
    udp_stream: str, caplog: pytest.LogCaptureFixture
) -> None:
    need_gst_without_tsdemux()
    source = capture_source(udp_stream, "cam")  # auto
    assert isinstance(source, CommandSource) and source.argv[0] == "gst-launch-1.0"

    async def main() -> None:
        run, sup = supervise(source, backoff=Backoff(0.05, 2, 0.2, 0), start_timeout=30)
        await sup.start()
        try:
            await run.until("started", 1, within=60)
        finally:
            await sup.stop()

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert source.argv[0] == "ffmpeg" and udp_stream in source.argv
    messages = said(caplog, "cam")
    switched = [m for m in messages if "capturing with FFmpeg from now on" in m]
    assert len(switched) == 1, messages
    assert "GStreamer cannot capture this source (Missing decoder: MPEG-2" in switched[0]


def test_gstreamer_that_lacks_a_plug_in_is_told_from_a_camera_that_is_away(
    tmp_path: Path,
) -> None:
    """The reason is read from what gst-launch-1.0 really says: for an MPEG-TS file it has
    no demuxer for, the missing decoder; for a camera that does not answer, nothing."""
    need_gst_without_tsdemux()
    clip = tmp_path / "clip.ts"
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=rate=5",
            "-t",
            "1",
            "-c:v",
            "libx264",
            "-f",
            "mpegts",
            str(clip),
        ],
        check=True,
    )
    done = subprocess.run(
        [
            "gst-launch-1.0",
            "-q",
            "filesrc",
            f"location={clip}",
            "!",
            "decodebin",
            "!",
            "videoconvert",
            "!",
            "jpegenc",
            "!",
            "fakesink",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    reason = gst_cannot_play(done.stderr.splitlines())
    assert reason is not None and reason.startswith("Missing decoder: MPEG-2 Transport Stream")
    away = subprocess.run(
        [
            "gst-launch-1.0",
            "-q",
            "rtspsrc",
            f"location=rtsp://127.0.0.1:{free_port()}/x",
            "!",
            "decodebin",
            "!",
            "fakesink",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert away.returncode != 0
    assert gst_cannot_play(away.stderr.splitlines()) is None
