"""Captures that fail, supervised: a camera that accepts the connection and never answers, a
local file that can never be played, a camera that stays down. Real sockets, real files, real
ffmpeg and gst-launch-1.0; the supervisor is the real one.

* An attempt that gets no first frame within ``start_timeout`` ends then: the stop
  interrupts PyAV's blocking open (and read), whose own timeouts are longer.
* A local file that cannot be opened or has no video stream fails its source once (state
  failed, the error naming the file and why), looped or not, whichever capture reads it; a
  network camera that is down is retried as before.
* A camera that stays down logs its first failure in full, then one line per attempt.

Bounds on time are generous (a multiple of the limit under test); the waits are for events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import wave
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from framepipe.backoff import Backoff
from framepipe.errors import CaptureExitedError, SourceError
from framepipe.health import Health, HealthState
from framepipe.sources import CommandSource, InvalidSourceError, Source, VideoSource
from framepipe.sources.capture import capture_source
from framepipe.supervise import Supervisor, SupervisorContext
from media import make_clip, need_tool
from waiting import free_port, wait_until, wait_until_async


def said(caplog: pytest.LogCaptureFixture, component: str) -> list[str]:
    """The messages logged for ``component`` at info level or above."""
    return [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "component", None) == component and r.levelno >= logging.INFO
    ]


@dataclass
class Supervised:
    """A source run by a real supervisor: its events and its sessions' spans."""

    source: Source
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    sessions: list[tuple[float, float]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        self.events.append((kind, data))
        self.changed.set()

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [data for k, data in self.events if k == kind]

    async def capture(self, ctx: SupervisorContext) -> None:
        """One session, as a pipeline's intake runs it."""
        began = time.monotonic()
        try:
            async with contextlib.aclosing(self.source.frames(ctx.started)) as frames:
                async for _frame in frames:
                    ctx.alive()
        finally:
            self.sessions.append((began, time.monotonic()))

    async def until(self, kind: str, count: int, within: float) -> None:
        deadline = time.monotonic() + within
        while len(self.of(kind)) < count:
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{count} {kind!r} events not seen: {self.events}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)


def supervise(source: Source, **options: Any) -> tuple[Supervised, Supervisor]:
    run = Supervised(source)
    sup = Supervisor(source.source_id, run.capture, on_event=run.on_event, **options)
    return run, sup


# -- a camera that accepts the connection and never answers --------------------------------------


@contextlib.contextmanager
def black_hole() -> Iterator[tuple[int, list[socket.socket]]]:
    """A TCP server on loopback that accepts every connection and never says a word."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(50)
    accepted: list[socket.socket] = []

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept()[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        server.close()
        for conn in accepted:
            conn.close()


def closed_by_peer(conn: socket.socket, within: float) -> bool:
    """True once the other end closed ``conn`` (what it sent first is read and dropped)."""
    conn.settimeout(within)
    try:
        while conn.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True  # reset by the peer: closed too
    return True


def decode_threads_of(source_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"framepipe-decode-{source_id}"]


@pytest.mark.parametrize("scheme", ["rtsp", "http", "tcp"])
def test_a_camera_that_never_answers_ends_each_attempt_at_start_timeout(
    scheme: str, logs: pytest.LogCaptureFixture
) -> None:
    """PyAV's open waits for its own timeout (10 s here): each attempt against a camera that
    accepted and stayed silent took that long instead of ``start_timeout``, with an "ignores
    its cancellation" warning every time. The stop now interrupts the open: each attempt
    ends soon after ``start_timeout``, without a warning, and leaves no thread nor socket."""
    start_timeout = 1.0
    with black_hole() as (port, accepted):
        url = {
            "rtsp": f"rtsp://127.0.0.1:{port}/live",
            "http": f"http://127.0.0.1:{port}/video.mjpg",
            "tcp": f"tcp://127.0.0.1:{port}",
        }[scheme]
        source = VideoSource(url, "silent", open_timeout=10, read_timeout=10)

        async def main() -> Supervised:
            run, sup = supervise(
                source,
                start_timeout=start_timeout,
                backoff=Backoff(0.05, 1, 0.05, 0),
                max_attempts=None,
            )
            await sup.start()
            try:
                await run.until("stalled", 3, within=60)
            finally:
                await sup.stop()
            return run

        run = asyncio.run(main())
        assert len(run.sessions) >= 3
        for began, ended in run.sessions[:3]:
            assert ended - began < 3 * start_timeout, run.sessions  # was 10 s (open_timeout)
        assert all("not started within" in e["error"] for e in run.of("stalled"))
        messages = said(logs, "silent")
        assert not [m for m in messages if "ignores its cancellation" in m], messages
        assert not [m for m in messages if "still blocked" in m], messages
        # nothing left behind: the decode threads ended, every connection was closed
        wait_until("the decode threads to end", lambda: not decode_threads_of("silent"), 5)
        assert len(accepted) >= 3
        assert all(closed_by_peer(conn, 5) for conn in list(accepted))


def mpegts_server(data: bytes, send: int) -> tuple[socket.socket, threading.Thread]:
    """A TCP server that sends the first ``send`` bytes of ``data`` to its one client, then
    keeps the connection open without a word (a camera whose encoder hung)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.sendall(data[:send])
            conn.recv(1)  # until the client closes
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_closing_a_session_blocked_in_a_read_is_prompt(tmp_path: Path) -> None:
    """A stream that sent some frames then hung: the decode thread blocks in PyAV's read
    (read_timeout 20 s). Closing the session interrupts that read: it ends at once, its thread
    gone, instead of waiting out the read timeout."""
    clip = make_clip(tmp_path / "camera.ts", frames=100, size=(160, 120))
    data = clip.read_bytes()
    server, thread = mpegts_server(data, len(data) // 2)
    url = f"tcp://127.0.0.1:{server.getsockname()[1]}"
    source = VideoSource(url, "hung", open_timeout=20, read_timeout=20)

    async def main() -> tuple[int, float]:
        frames: list[int] = []

        async def consume() -> None:
            async for frame in source.frames():
                frames.append(frame.seq)

        task = asyncio.create_task(consume())
        await wait_until_async("the first frames", lambda: len(frames) >= 5, 20)
        # the half stream is taken: no frame for a second means the thread waits for data
        seen = -1
        while seen != len(frames):
            seen = len(frames)
            await asyncio.sleep(1.0)
        assert not task.done()
        t0 = time.monotonic()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return len(frames), time.monotonic() - t0

    try:
        count, closing = asyncio.run(main())
    finally:
        server.close()
    assert 5 <= count < 100
    assert closing < 5.0  # was the read timeout, 20 s
    assert not decode_threads_of("hung")
    thread.join(5)
    assert not thread.is_alive()  # the client closed its connection


# -- a local file that can never be played -------------------------------------------------------


def without_index(clip: Path) -> bytes:
    """The head of an MP4 whose index (moov) is at its end: the file types and the start of
    the media data, no index. No player can open it."""
    data = clip.read_bytes()
    assert data.find(b"moov") > data.find(b"mdat") > 0  # the index last
    return data[: len(data) // 2]


def audio_only(tmp_path: Path) -> bytes:
    """A second of silence in a WAV file: a sound, no video."""
    path = tmp_path / "tone.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(np.zeros(8000, np.int16).tobytes())
    return path.read_bytes()


BAD_FILES = {
    "no_index": "not a readable video",
    "audio_only": "no video stream",
    "deleted": "",
}


def build_capture(capture: str, path: Path) -> Source:
    """The looped capture of ``path`` (``capture``: ``av``, ``ffmpeg`` or ``gst``)."""
    if capture != "av":
        need_tool("ffmpeg")
    if capture == "gst":
        need_tool("gst-launch-1.0")
    source = capture_source(
        str(path), "station", capture="auto" if capture == "gst" else capture, loop=True
    )
    if capture == "gst":
        assert isinstance(source, CommandSource) and source.argv[0] == "gst-launch-1.0"
        assert source.loops
    return source


@pytest.mark.parametrize("capture", ["av", "ffmpeg", "gst"])
@pytest.mark.parametrize("bad", list(BAD_FILES))
def test_a_looped_file_that_cannot_be_played_fails_once_naming_it(
    capture: str, bad: str, tmp_path: Path, logs: pytest.LogCaptureFixture
) -> None:
    """A looped recording that no capture can open (an MP4 without its index, a sound file,
    a file deleted) was retried for good, 41 times in 6 minutes, "retrying" at the cap. It
    now fails its source at once: state failed after one attempt, one ``failed`` event
    (``permanent``), the error naming the file and why; the same with PyAV, ffmpeg and
    gst-launch-1.0. The capture is built while the file is good, as one that changes later."""
    clip = make_clip(tmp_path / "station.mp4", frames=50, size=(160, 120))
    source = build_capture(capture, clip)
    if bad == "no_index":
        clip.write_bytes(without_index(clip))
    elif bad == "audio_only":
        clip.write_bytes(audio_only(tmp_path))
    else:
        clip.unlink()

    async def main() -> tuple[Supervised, Health]:
        run, sup = supervise(
            source,
            backoff=Backoff(0.05, 1, 0.05, 0),
            max_attempts=2,
            after_attempts="keep_trying",
            loop=source.loops,
            start_timeout=10,
        )
        await sup.start()
        try:
            health = await asyncio.wait_for(sup.wait(), 30)
        finally:
            await sup.stop()
        return run, health

    run, health = asyncio.run(main())
    assert health.state is HealthState.FAILED, (health, run.events)
    assert len(run.sessions) == 1 and health.restarts == 0
    assert [kind for kind, _ in run.events] == ["died", "failed"]
    failed = run.of("failed")[0]
    assert failed["permanent"] is True and failed["attempts"] == 1
    assert failed["error"].startswith("InvalidSourceError: [station] ")
    assert str(clip) in failed["error"]
    why = BAD_FILES[bad] or ("no such file" if capture == "av" else "does not exist")
    assert why in failed["error"].lower(), failed["error"]
    messages = said(logs, "station")
    assert f"Pipeline failed and is not restarted: {failed['error']}" in messages
    assert not [m for m in messages if m.startswith("Restarting")], messages


@pytest.mark.parametrize("capture", ["av", "ffmpeg"])
def test_a_file_played_once_that_cannot_be_opened_is_not_restarted(
    capture: str, tmp_path: Path
) -> None:
    """Not looped, the same: the file's failure is its source's end, failed, not five tries."""
    clip = make_clip(tmp_path / "clip.mp4", frames=25, size=(160, 120))
    source = capture_source(str(clip), "once", capture="ffmpeg" if capture == "ffmpeg" else "av")
    clip.write_bytes(without_index(clip))

    async def main() -> tuple[Supervised, Health]:
        run, sup = supervise(source, backoff=Backoff(0.05, 1, 0.05, 0), restart_on_end=False)
        await sup.start()
        health = await asyncio.wait_for(sup.wait(), 30)
        return run, health

    run, health = asyncio.run(main())
    assert health.state is HealthState.FAILED and health.restarts == 0
    assert run.of("failed")[0]["permanent"] is True


def test_a_video_source_tells_a_bad_file_from_a_stream_or_a_device(tmp_path: Path) -> None:
    """Only a local file is judged for good: the same unreadable bytes read as a stream (a
    local path taken as live, e.g. a FIFO being filled) fail as a plain SourceError."""
    clip = make_clip(tmp_path / "clip.mp4", frames=25, size=(160, 120))
    clip.write_bytes(without_index(clip))

    async def first_error(source: VideoSource) -> SourceError:
        with pytest.raises(SourceError) as caught:
            async for _frame in source.frames():
                pass
        return caught.value

    as_file = asyncio.run(first_error(VideoSource(clip, "file")))
    as_stream = asyncio.run(first_error(VideoSource(clip, "fifo", live=True)))
    assert isinstance(as_file, InvalidSourceError) and as_file.permanent
    assert not isinstance(as_stream, InvalidSourceError)
    assert "not a readable video" in str(as_stream)


# -- a camera that stays down ------------------------------------------------------------------


@pytest.mark.parametrize("capture", ["av", "ffmpeg", "gst"])
def test_a_camera_that_stays_down_is_retried_with_one_line_per_attempt(
    capture: str, logs: pytest.LogCaptureFixture
) -> None:
    """A camera that is down (nothing listens on its port) is retried for as long as it
    takes, never judged invalid. The log says its first failure in full (ffmpeg: the start,
    the exit, its stderr, the restart: seven lines), then one line per attempt, and one when
    retrying at the cap begins: it said about seven lines per attempt."""
    url = f"rtsp://127.0.0.1:{free_port()}/live"  # nothing listens there
    if capture == "av":
        source: Source = VideoSource(url, "cam")
    else:
        need_tool("ffmpeg" if capture == "ffmpeg" else "gst-launch-1.0")
        source = capture_source(url, "cam", capture="ffmpeg" if capture == "ffmpeg" else "gst")
    attempts = 10

    async def main() -> tuple[Supervised, Health]:
        run, sup = supervise(
            source,
            backoff=Backoff(0.02, 2, 0.1, 0),
            max_attempts=3,
            after_attempts="keep_trying",
            start_timeout=10,
        )
        await sup.start()
        try:
            await run.until("restarting", attempts, within=60)
        finally:
            health = sup.health
            await sup.stop()
        return run, health

    run, health = asyncio.run(main())
    assert health.state is not HealthState.FAILED and "failed" not in dict(run.events)
    assert len(run.of("retrying")) == 1
    errors = [e["error"] for e in run.of("died")]
    assert len(errors) >= attempts
    assert not [e for e in errors if e.startswith("InvalidSourceError")]
    kind = SourceError if capture == "av" else CaptureExitedError
    assert all(e.startswith(f"{kind.__name__}: [cam] ") for e in errors), errors
    messages = said(logs, "cam")
    first = messages.index("Restarting pipeline in 0.02s (attempt 1)")
    assert first < 5, messages  # the first failure, in full
    later = messages[first + 1 :]
    assert later[-1] == "Pipeline stopped"
    later = later[:-1]
    retrying = [m for m in later if "times in a row" in m]
    assert len(retrying) == 1
    restarts = [m for m in later if m.startswith("Restarting pipeline in ")]
    assert len(later) == len(restarts) + 1, later  # one line per attempt, and the retrying
    assert all(f"(attempt {n})" in m for n, m in enumerate(restarts, start=2)), restarts
    again = [m for m in restarts if ", failed again: " in m]
    assert len(again) == len(restarts) - 1  # the one after the retrying line says no more
