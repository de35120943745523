"""``CommandSource``: one persistent capture subprocess writing frames to its stdout.

Typical commands: ``gst-launch-1.0 -q ... ! jpegenc ! fdsink fd=1`` or
``ffmpeg -i URL -f mjpeg -`` (``format="mjpeg"``: a concatenated JPEG stream) and
``ffmpeg -i URL -f rawvideo -pix_fmt bgr24 -`` (``format="rawvideo"``: fixed-size frames).

Guarantees of one :meth:`CommandSource.frames` session:

* Exactly one subprocess, in a new session (its own process group); ``started(pid)`` is called
  right after it starts (its process is up: a :class:`~framepipe.supervise.Supervisor`
  counts the session as running from its first frame).
* Its stderr is drained concurrently (the child never blocks on a full pipe); the last
  ``stderr_lines`` lines are kept and attached to errors.
* A URL's secrets (a camera's password, a ``?token=``) are shown nowhere: :meth:`describe`,
  the logs, the errors and the stderr lines kept and logged show every URL in them by
  :func:`framepipe.urls.safe_url` (ffmpeg and GStreamer print the input's URL in their
  errors). The process itself is given the real command.
* The death of the capture is noticed at once, without polling: the end of stdout is awaited,
  then the exit code, and :class:`~framepipe.errors.CaptureExitedError` is raised with
  ``exit_code`` (negative: killed by that signal) and ``stderr_tail``. Exit code 0 raises too
  for a ``live`` capture (a camera is not supposed to end); for a recording (``live=False``)
  or one pass of a looped one (``loop=True``) exit 0 is the normal end: the session returns.
  On Linux a pidfd also watches the child itself, so a
  child that dies while a grandchild keeps the pipes open is noticed too (its process group is
  killed half a second after its death, which ends stdout), also when it died so soon that
  asyncio's child watcher had reaped it before the pidfd was opened.
* A command that fails (a non-zero exit) before its first frame, when ``invalid_input`` says
  why its input can never be captured (a recording's file that is not a video), fails the
  session with :class:`~framepipe.errors.InvalidSourceError` naming the input and
  why, which a supervisor does not restart; else with ``CaptureExitedError``.
* With a ``fallback`` (:class:`Fallback`), a session that fails before its first frame with
  stderr its ``reason`` recognises (gst-launch-1.0 missing a plug-in for what the camera
  sends) switches the source to the fallback's command for good: a warning names the
  reason and the new command once, the session fails as any other (the supervisor restarts
  it, now with the fallback). A command that hangs instead (``fallback.stalls`` sessions in
  a row that the supervisor cancelled for a stall before their first frame, their process
  still running: gst-launch-1.0 buffering an MJPEG camera over HTTP for good) is followed by
  one session of the fallback's command: a frame from it keeps the fallback for good (a
  warning and a ``capture_changed`` event by :attr:`~framepipe.sources.Source.emit`, once);
  its end without a frame goes back to the source's own command, the stalls counted anew.
* A session that follows one without a frame (a camera that is down, tried again) logs its
  start at debug level, not info: the supervisor's line per attempt says enough.
* Bytes on stdout that are not frames raise :class:`~framepipe.errors.FrameError` naming the
  stdout offset: more than ``max_garbage_bytes`` without a JPEG frame, a frame larger than
  ``max_frame_bytes``, or a JPEG frame that fails to decode.
* The capture does not outlive this process: on Linux it is started with a parent-death
  signal (SIGKILL when the thread that started it, the event loop's, ends: this process
  killed, by SIGKILL too, or its loop's thread gone), see :func:`parent_death_command`.
* Closing or cancelling the iterator, or any error, terminates the whole process group
  (SIGTERM, with SIGCONT for a stopped one, then SIGKILL after 2 s) and reaps the child: no
  zombie, no orphan. Stdout is drained meanwhile, so a consumer that fell behind (a full pipe)
  does not hold it up: a child that exits on SIGTERM is reaped as soon as it has exited, and
  its pipes are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from framepipe.errors import CaptureExitedError, SourceError, SourceStalledError
from framepipe.frames import Frame, JpegPicture, now_ms
from framepipe.logs import get_logger
from framepipe.pipes import lines
from framepipe.sources.base import InvalidSourceError, Source, StartedCallback
from framepipe.sources.child import (
    check_command,
    kill_group,
    parent_death_command,
    program_name,
    watch_exit,
)
from framepipe.sources.stderr_lines import telling_line
from framepipe.sources.stdout_frames import BYTES_PER_PIXEL, Image, MjpegReader, RawReader
from framepipe.urls import safe_text

__all__ = ["CommandSource", "Fallback", "parent_death_command"]

_TERM_GRACE = 2.0  # seconds between SIGTERM and SIGKILL


@dataclass(frozen=True)
class Fallback:
    """Another command for a source whose own command turns out unable to capture it:
    ``reason(stderr_lines)`` says why (None: another failure, the command is kept).

    A command may also hang on an input without failing: after ``stalls`` sessions in a row
    of the source's own command that stalled before their first frame (cancelled by the
    supervisor for a stall, :class:`~framepipe.errors.SourceStalledError`, their process
    still running), the next session tries ``argv`` once; None: never."""

    argv: Sequence[str]
    reason: Callable[[Sequence[str]], str | None]
    stalls: int | None = 3


class CommandSource(Source):
    """Frames that one persistent subprocess writes to its stdout.

    ``argv`` is the command (no shell). ``format="mjpeg"`` reads concatenated JPEG images;
    ``format="rawvideo"`` reads frames of ``width * height`` pixels in ``pix_fmt``
    (``bgr24``, ``rgb24`` or ``gray``; converted to BGR). ``env`` adds variables to the
    inherited environment. ``stderr_lines`` lines of stderr are kept for errors. Frames have
    ``ts_ms`` = the wall clock when they were read and ``pts=None``, or, with ``timestamps``
    (a recording that writes every frame at a known ``fps``), ``pts = (seq - 1) / fps``: the
    frame's place in the recording, counted on across passes and restarts, so a recording
    read faster than real time keeps its own time (``Segmenter(clock="stream")``). ``fps``
    states the nominal rate, if known. MJPEG frames keep the captured JPEG bytes (their header
    checked): they are decoded only when a stage asks for pixels, and stored as they were
    captured. ``invalid_input`` checks the input after a session whose command failed before
    its first frame (run in a thread): a text it returns (why the input can never be
    captured, e.g. :func:`~framepipe.sources.files.unreadable_video` of a recording's file)
    fails the session with :class:`~framepipe.errors.InvalidSourceError`.

    What the end of a session means:

    * ``live=True`` (the default: a camera, a stream): every end is a death, exit code 0
      included, and the supervisor restarts it;
    * ``live=False``: the command plays a recording once; exit code 0 at the end of its stdout
      ends the stream (a pipeline then ends), any other exit is a death;
    * ``loop=True``: the command plays a recording once per session and the recording is
      looped by starting it again: exit code 0 ends one pass and the next starts at once
      (:attr:`~framepipe.sources.Source.loops`).

    See the module docstring for what a session guarantees.
    """

    def __init__(
        self,
        argv: Sequence[str],
        source_id: str,
        *,
        format: Literal["mjpeg", "rawvideo"] = "mjpeg",
        width: int | None = None,
        height: int | None = None,
        pix_fmt: str = "bgr24",
        env: Mapping[str, str] | None = None,
        stderr_lines: int = 50,
        max_frame_bytes: int = 50_000_000,
        max_garbage_bytes: int = 5_000_000,
        fps: float | None = None,
        live: bool = True,
        loop: bool = False,
        timestamps: bool = False,
        invalid_input: Callable[[], str | None] | None = None,
        fallback: Fallback | None = None,
    ) -> None:
        super().__init__(source_id)
        if timestamps and not fps:
            raise ValueError("timestamps=True needs the recording's fps")
        self.timestamps = timestamps
        self.fps = fps  # nominal rate when the caller knows it (health compares against it)
        self.live = live or loop
        self.loops = loop
        self.argv = [os.fspath(arg) for arg in argv]
        if not self.argv:
            raise ValueError("CommandSource needs a command")
        check_command(self.argv, env, f"source {source_id}")
        if format not in ("mjpeg", "rawvideo"):
            raise ValueError(f"format must be 'mjpeg' or 'rawvideo', not {format!r}")
        if format == "rawvideo":
            if not width or not height or width < 1 or height < 1:
                raise ValueError("format='rawvideo' needs width and height")
            if pix_fmt not in BYTES_PER_PIXEL:
                raise ValueError(
                    f"pix_fmt must be one of {sorted(BYTES_PER_PIXEL)}, not {pix_fmt!r}"
                )
        self.format = format
        self._shape = (height or 0, width or 0, BYTES_PER_PIXEL.get(pix_fmt, 3))
        self.width = width
        self.height = height
        self.pix_fmt = pix_fmt
        self.env = dict(env) if env is not None else None
        self.stderr_lines = stderr_lines
        self.max_frame_bytes = max_frame_bytes
        self.max_garbage_bytes = max_garbage_bytes
        self.invalid_input = invalid_input
        if fallback is not None:
            check_command(list(fallback.argv), env, f"source {source_id}")
        self.fallback = fallback
        self._stalls = 0  # sessions of the own command in a row that stalled before a frame
        self._trying: list[str] | None = None  # the own command, while the fallback is tried
        self._proc: asyncio.subprocess.Process | None = None
        self._log = get_logger(source_id)
        self._quiet = False  # no frame since the latest session began: a start then says less

    @property
    def pid(self) -> int | None:
        """The pid of the running capture subprocess, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    def describe(self) -> str:
        """The command line with the secrets of every URL in it masked
        (:func:`framepipe.urls.safe_url`), shortened to 120 characters."""
        line = shlex.join(safe_text(arg) for arg in self.argv)
        return line if len(line) <= 120 else line[:117] + "..."

    async def frames(self, started: StartedCallback | None = None) -> AsyncGenerator[Frame, None]:
        """One capture session; see the module docstring for its guarantees."""
        env = None if self.env is None else {**os.environ, **self.env}
        frame_bytes = (
            self._shape[0] * self._shape[1] * self._shape[2] if self.format == "rawvideo" else 0
        )
        self._try_fallback()
        say = self._log.debug if self._quiet else self._log.info
        self._quiet = True  # until this session delivers a frame
        framed = False
        hung = False  # this session stalled before its first frame, its process running
        say("Starting persistent %s pipeline...", program_name(self.argv[0]))
        try:
            command = parent_death_command(self.argv, env)
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                env=env,
                limit=max(1 << 20, frame_bytes),
            )
        except (OSError, ValueError) as exc:  # ValueError: argv or env changed since checked
            self._unframed()
            raise SourceError(
                f"cannot start capture command {self.describe()}: {safe_text(str(exc))}",
                source_id=self.source_id,
            ) from exc
        except BaseException:  # a stop during the start: a fallback on trial gives way again
            self._unframed()
            raise
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._proc = proc
        tail: deque[str] = deque(maxlen=max(1, self.stderr_lines))
        stderr_task = asyncio.create_task(self._drain_stderr(proc.stderr, tail))
        # done once it exited and closed its pipes (or, when asyncio saw the exit before this
        # task began, once it exited: the watch below then kills what holds the pipes)
        exited = asyncio.create_task(proc.wait())
        unwatch = watch_exit(proc.pid)
        say("capture started (PID: %d): %s", proc.pid, self.describe())
        try:
            if started is not None:
                started(proc.pid)
            read: Callable[[], Awaitable[Image | JpegPicture | None]]
            if self.format == "mjpeg":
                read = MjpegReader(
                    proc.stdout,
                    self.source_id,
                    self._log,
                    max_frame_bytes=self.max_frame_bytes,
                    max_garbage_bytes=self.max_garbage_bytes,
                ).read
            else:
                read = RawReader(proc.stdout, self._log, self._shape, self.pix_fmt).read
            while (picture := await read()) is not None:
                if not framed:
                    framed = True
                    self._framed()
                self._quiet = False
                seq = self.next_seq()
                yield Frame(
                    image=None if isinstance(picture, JpegPicture) else picture,
                    picture=picture if isinstance(picture, JpegPicture) else None,
                    source_id=self.source_id,
                    seq=seq,
                    ts_ms=now_ms(),
                    pts=(seq - 1) / self.fps if self.timestamps and self.fps else None,
                )
            code = await self._exit_code(proc, exited)
            if code == 0 and (self.loops or not self.live):
                self._log.info("capture ended (exit code: 0) at the end of its input")
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(stderr_task), 1.0)
            stderr_tail = "\n".join(tail)
            told = telling_line(tail)
            last = f"; stderr: {told}" if told is not None else ""
            exited_error = CaptureExitedError(
                f"capture subprocess exited (exit code: {code}){last}",
                source_id=self.source_id,
                exit_code=code,
                stderr_tail=stderr_tail,
            )
            if not framed and code != 0 and self.invalid_input is not None:
                problem = await asyncio.to_thread(self.invalid_input)
                if problem is not None:
                    raise InvalidSourceError(
                        f"{problem}; capture subprocess exited (exit code: {code}){last}",
                        source_id=self.source_id,
                    ) from exited_error
            if not framed and code != 0 and self._trying is None:
                self._switch(tail)
            raise exited_error
        except asyncio.CancelledError as exc:
            stalled = any(isinstance(arg, SourceStalledError) for arg in exc.args)
            if stalled and not framed and proc.returncode is None and self._trying is None:
                self._stalls += 1
                hung = True
            raise
        finally:
            if not framed and not hung:
                self._stalls = 0  # the row of stalls is broken by any other end
            if not framed:
                self._unframed()
            unwatch()
            try:
                await self._terminate(proc, exited)
            finally:
                stderr_task.cancel()
                exited.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stderr_task
                self._proc = None

    def _try_fallback(self) -> None:
        """Run the fallback's command in this session when the own command stalled before
        its first frame ``fallback.stalls`` sessions in a row."""
        fallback = self.fallback
        if self._trying is not None:  # on trial already: the own command is kept in _trying
            return
        if fallback is None or fallback.stalls is None or self._stalls < fallback.stalls:
            return
        self._trying, self.argv = self.argv, [os.fspath(arg) for arg in fallback.argv]
        self._quiet = False  # a new command: its start is said at info level
        self._log.info(
            "%s stalled before its first frame %d times in a row: trying %s once",
            program_name(self._trying[0]),
            self._stalls,
            program_name(self.argv[0]),
        )

    def _framed(self) -> None:
        """The session's first frame: a fallback on trial is kept for good."""
        stalls, self._stalls = self._stalls, 0
        own = self._trying
        if own is None:
            return
        self._trying = None
        self.fallback = None
        self._log.warning(
            "%s stalls on this source, %s delivers frames: capturing with %s from now on: %s",
            program_name(own[0]),
            program_name(self.argv[0]),
            program_name(self.argv[0]),
            self.describe(),
        )
        if self.emit is not None:
            self.emit(
                "capture_changed",
                previous=program_name(own[0]),
                capture=program_name(self.argv[0]),
                reason=f"{program_name(own[0])} stalled before its first frame {stalls} times "
                "in a row",
                command=self.describe(),
            )

    def _unframed(self) -> None:
        """The session ended without a frame: a fallback on trial gives way to the own
        command again (its stalls counted anew)."""
        own = self._trying
        if own is None:
            return
        self._trying = None
        self._stalls = 0
        self._log.info(
            "%s delivered no frame either: back to %s",
            program_name(self.argv[0]),
            program_name(own[0]),
        )
        self.argv = own
        self._quiet = False

    def _switch(self, stderr: Sequence[str]) -> None:
        """Take the fallback's command for good when its ``reason`` recognises ``stderr``."""
        fallback = self.fallback
        why = None if fallback is None else fallback.reason(list(stderr))
        if fallback is None or why is None:
            return
        old = program_name(self.argv[0])
        self.argv = [os.fspath(arg) for arg in fallback.argv]
        self.fallback = None
        self._quiet = False  # the next start is a new command: said at info level
        self._log.warning(
            "%s cannot capture this source (%s): capturing with %s from now on: %s",
            old,
            safe_text(why),
            program_name(self.argv[0]),
            self.describe(),
        )

    async def _exit_code(
        self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]
    ) -> int | None:
        """The exit code once stdout ended; a child that stays alive is stopped first."""
        with contextlib.suppress(TimeoutError):
            return await asyncio.wait_for(asyncio.shield(exited), 2.0)
        if proc.returncode is not None:  # exited; leftovers hold a pipe (killed in finally)
            return proc.returncode
        self._log.warning("capture closed its stdout but is still running: stopping it")
        await self._terminate(proc, exited)
        return proc.returncode

    async def _terminate(self, proc: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> None:
        """SIGTERM the process group (and SIGCONT: a stopped capture, a camera that stalls
        without closing, then takes its SIGTERM at once), SIGKILL it after 2 s, reap the child.

        Stdout is read and dropped meanwhile: a consumer that fell behind leaves the pipe full
        and its reading paused, and then neither could the child finish a write and see the
        signal, nor would asyncio see the pipe's end, which ``exited`` waits for."""
        assert proc.stdout is not None
        drain = asyncio.create_task(_discard(proc.stdout))
        try:
            if proc.returncode is None:
                kill_group(proc.pid, signal.SIGTERM)
                kill_group(proc.pid, signal.SIGCONT)  # a stopped capture (SIGSTOP) gets it too
                try:
                    await asyncio.wait_for(asyncio.shield(exited), _TERM_GRACE)
                except TimeoutError:
                    self._log.warning(
                        "capture (PID: %d) ignored SIGTERM for %gs: killing it",
                        proc.pid,
                        _TERM_GRACE,
                    )
                except asyncio.CancelledError:
                    kill_group(proc.pid, signal.SIGKILL)
                    raise
            kill_group(proc.pid, signal.SIGKILL)  # the child if still alive, and any leftovers
            try:
                await asyncio.wait_for(asyncio.shield(exited), 5.0)
            except TimeoutError:
                self._log.warning("capture (PID: %d) still not reaped after SIGKILL", proc.pid)
        finally:
            drain.cancel()
            await asyncio.wait([drain])  # a cancellation of this task still goes through

    async def _drain_stderr(self, stream: asyncio.StreamReader, tail: deque[str]) -> None:
        async for text in lines(stream):
            if line := safe_text(text.rstrip()):
                tail.append(line)
                self._log.debug("stderr: %s", line)


async def _discard(stream: asyncio.StreamReader) -> None:
    """Read ``stream`` to its end, dropping what comes (a stream that failed ends it too)."""
    with contextlib.suppress(Exception):
        while await stream.read(1 << 20):
            pass
