"""A capture that cannot start says why in the words that tell it: a URL scheme no capture
command reads is refused when the source is built (with the scheme it likely meant), and a
capture command that fails names the line of its stderr that says why, not the follow-up
line after it. Real gst-launch-1.0 and ffmpeg."""

from __future__ import annotations

import asyncio
import socket

import pytest

from framepipe.errors import CaptureExitedError, ConfigError
from framepipe.sources.capture import capture_source
from framepipe.sources.stderr_lines import telling_line
from media import need_tool


@pytest.mark.parametrize("capture", ["auto", "ffmpeg"])
def test_a_url_scheme_no_capture_reads_is_refused_at_the_start_with_the_one_meant(
    capture: str,
) -> None:
    """``rtps://`` (a typo of ``rtsp://``) would fail at every start, retried as a camera
    that is down; it is a setting that is wrong: refused naming the source, the scheme and
    the likely one, with the password masked."""
    need_tool("ffmpeg")
    need_tool("gst-launch-1.0")
    with pytest.raises(ConfigError) as refused:
        capture_source("rtps://admin:hunter2@10.0.0.12/stream1", "station_1", capture=capture)  # type: ignore[arg-type]
    message = str(refused.value)
    assert message.startswith("source station_1: ")
    assert "read rtps:// URLs" in message and "did you mean rtsp://" in message
    assert "hunter2" not in message


def test_the_schemes_cameras_use_are_not_refused() -> None:
    need_tool("ffmpeg")
    need_tool("gst-launch-1.0")
    for url in (
        "rtsp://10.0.0.12/s",
        "rtsps://10.0.0.12/s",
        "http://10.0.0.12/v.mjpg",
        "udp://@:5000",
        "srt://10.0.0.12:9000",
        "rtmp://10.0.0.12/live",
    ):
        capture_source(url, "cam")  # built; nothing runs until it starts


@pytest.mark.parametrize(
    ("url", "capture"),
    [
        ("rtspt://cam.local/stream", "gst"),  # rtspsrc's schemes, FFmpeg has none of them
        ("rtsph://cam.local/stream", "gst"),
        ("icy://radio.local/x", "gst"),  # souphttpsrc's
        ("satip://192.168.1.2/?src=1&freq=11494&pol=h&msys=dvbs2", "ffmpeg"),  # its RTSP demuxer
        ("satip://192.168.1.2/?src=1&freq=11494&pol=h&msys=dvbs2", "auto"),
        ("hls+http://cdn.local/live.m3u8", "ffmpeg"),  # a nested scheme: FFmpeg's hls protocol
        ("crypto+http://cdn.local/seg.ts", "auto"),
    ],
)
def test_a_scheme_the_capture_that_runs_reads_is_not_refused(url: str, capture: str) -> None:
    """Only a scheme that the command which will run cannot read is refused: GStreamer's own
    when gst-launch-1.0 is forced, FFmpeg's through a demuxer or a nested scheme."""
    need_tool("ffmpeg")
    need_tool("gst-launch-1.0")
    capture_source(url, "cam", capture=capture)  # type: ignore[arg-type]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_gst_capture_that_fails_names_the_element_error_not_the_preroll_line() -> None:
    """gst-launch-1.0 says why (``Could not open resource``) and then ``ERROR: pipeline
    doesn't want to preroll.``: the error names the first."""
    need_tool("gst-launch-1.0")
    source = capture_source(f"rtsp://127.0.0.1:{_closed_port()}/x", "cam", capture="gst")

    async def first_session() -> CaptureExitedError:
        with pytest.raises(CaptureExitedError) as failed:
            async for _frame in source.frames():
                pass
        return failed.value

    error = asyncio.run(asyncio.wait_for(first_session(), 60))
    assert "Could not open resource" in str(error), str(error)
    assert "preroll" not in str(error)
    assert "preroll" in error.stderr_tail  # the whole tail is kept


@pytest.mark.parametrize(
    ("tail", "told"),
    [
        (
            ["rtps://10.0.0.12/x: Protocol not found", "Did you mean file:rtps://10.0.0.12/x?"],
            "rtps://10.0.0.12/x: Protocol not found",
        ),
        (
            [
                "[tcp @ 0x1] Connection to tcp://127.0.0.1:9 failed: Connection refused",
                "rtsp://127.0.0.1:9/x: Connection refused",
            ],
            "rtsp://127.0.0.1:9/x: Connection refused",
        ),
        (["Setting pipeline to PAUSED ...", "Freeing pipeline ..."], "Freeing pipeline ..."),
        ([], None),
    ],
)
def test_the_telling_line_of_ffmpegs_stderr(tail: list[str], told: str | None) -> None:
    assert telling_line(tail) == told
