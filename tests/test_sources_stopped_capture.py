"""A capture that stalls without closing (its process stopped, SIGSTOP: a camera driver
wedged): ending its session ends the process at once, with SIGTERM as for any capture, not
after the two seconds of grace that a process ignoring SIGTERM gets. A real ffmpeg capture."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import pytest

from framepipe.sources import CommandSource
from media import need_tool


def test_a_stopped_capture_is_ended_at_once_by_its_sigterm(
    caplog: pytest.LogCaptureFixture,
) -> None:
    need_tool("ffmpeg")
    argv = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-f", "lavfi"]
    argv += ["-i", "testsrc=size=64x48:rate=10", "-f", "mjpeg", "-"]
    source = CommandSource(argv, "station_1")

    async def main() -> tuple[int, float]:
        async with contextlib.aclosing(source.frames()) as frames:
            await anext(frames)
            pid = source.pid
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            began = time.monotonic()
        return pid, time.monotonic() - began

    with caplog.at_level(logging.WARNING):
        pid, took = asyncio.run(asyncio.wait_for(main(), 30))
    assert took < 1.5, took
    assert not [r for r in caplog.records if "ignored SIGTERM" in r.getMessage()]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped
