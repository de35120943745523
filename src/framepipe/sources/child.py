"""A capture's child process: its command checked before it starts, started so that it dies
with the process reading it (:func:`parent_death_command`), its process group killed, and its
exit watched so that leftovers holding its pipes are killed (:func:`watch_exit`)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

from framepipe.errors import ConfigError
from framepipe.urls import safe_text

__all__ = ["check_command", "kill_group", "parent_death_command", "program_name", "watch_exit"]

_ORPHAN_GRACE = 0.5  # seconds a dead child's pipes may stay open before its group is killed


def check_command(argv: Sequence[str], env: Mapping[str, str] | None, where: str) -> None:
    """A :class:`ConfigError` naming ``where`` and the argument (or environment variable) that
    no process can be given: not text, with a NUL, or malformed Unicode (a lone surrogate
    that is not an undecodable byte of a file name), which would fail at every start as
    ``embedded null byte`` or ``UnicodeEncodeError``. A URL in it is shown by ``safe_url``."""
    for index, arg in enumerate(argv):
        problem = _text_problem(arg)
        if problem:
            shown = safe_text(arg) if isinstance(arg, str) else arg
            raise ConfigError(
                f"{where}: argument {index} of the capture command {shown!r} {problem}"
            )
    for name, value in (env or {}).items():
        problem = _text_problem(name) or _text_problem(value)
        if not problem and (not name or "=" in name):
            problem = "is not a variable name"
        if problem:
            raise ConfigError(f"{where}: environment variable {name!r} {problem}")


def _text_problem(text: object) -> str:
    """Why ``text`` cannot be an argument or an environment entry of a process ("": it can)."""
    if not isinstance(text, str):
        return f"is not text but {type(text).__name__}"
    if "\0" in text:
        return "has a NUL byte"
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return "has malformed Unicode (a lone surrogate)"
    return ""


_PDEATHSIG_LAUNCHER = """\
import ctypes, os, sys
if ctypes.CDLL(None, use_errno=True).prctl(1, 9, 0, 0, 0):  # PR_SET_PDEATHSIG, SIGKILL
    sys.exit("prctl(PR_SET_PDEATHSIG): " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):  # the parent died before prctl: nobody to capture for
    os._exit(1)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as exc:
    print(f"cannot run {sys.argv[2]}: {exc}", file=sys.stderr)
    os._exit(127)
"""


def parent_death_command(argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str]:
    """``argv`` started so that it gets SIGKILL when the thread that starts it ends (Linux's
    ``PR_SET_PDEATHSIG``): a capture does not outlive the process that reads it, however that
    process ends (SIGKILL included).

    The signal is set by a wrapper that then executes ``argv`` in its place (same pid, same
    process group): ``setpriv --pdeathsig KILL --`` (util-linux) when installed, else this
    Python with ``-I -S -c`` and ``prctl`` through ctypes, which also closes the window in
    which the parent dies before the signal is set (it checks its parent pid after
    ``prctl``; ``setpriv`` does not). A ``preexec_fn`` would do it without a wrapper but is
    not safe in a process with threads. Start-up cost measured here (median of 40 runs of
    ``true``): 1.4 ms direct, 2.1 ms through setpriv, 19 ms through Python; a capture starts
    once per session, and ffmpeg or gst-launch-1.0 take tens of milliseconds to open their
    input. Elsewhere than Linux, or without either wrapper (a frozen application), ``argv``
    is returned as it is.

    The signal is tied to the *thread* that forks: asyncio starts a subprocess from its
    event loop's thread, which runs as long as the loop, and a session cannot outlive its
    loop (a loop run from one thread, then from another, would see a capture started from
    the first killed when that thread ends). Only the capture process gets it: processes it
    started itself stay in its process group (ffmpeg and gst-launch-1.0 start none).

    Raises :class:`FileNotFoundError` (or :class:`PermissionError`) when ``argv[0]`` cannot
    be run, as starting it directly would, rather than a wrapper failing to run it.
    """
    program = argv[0]
    if shutil.which(program, path=os.pathsep.join(os.get_exec_path(env))) is None:
        code = errno.EACCES if os.sep in program and os.path.exists(program) else errno.ENOENT
        raise OSError(code, os.strerror(code), program)
    kind, wrapper = _pdeathsig_wrapper()
    if kind == "setpriv":
        return [wrapper, "--pdeathsig", "KILL", "--", *argv]
    if kind == "python":  # the parent's pid: asked at each start (a forked process has its own)
        return [wrapper, "-I", "-S", "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *argv]
    return list(argv)


@functools.cache
def _pdeathsig_wrapper() -> tuple[Literal["setpriv", "python", ""], str]:
    """How :func:`parent_death_command` sets the signal here, and the wrapper's path (asked
    once per process)."""
    if not sys.platform.startswith("linux"):
        return "", ""
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            usage = subprocess.run(
                [setpriv, "--help"], capture_output=True, text=True, check=False, timeout=5
            ).stdout
            if "--pdeathsig" in usage:
                return "setpriv", setpriv
    if sys.executable and not getattr(sys, "frozen", False):
        return "python", sys.executable
    return "", ""


def program_name(command: str) -> str:
    """``GStreamer`` for gst-launch-1.0, ``FFmpeg`` for ffmpeg, else the command's name."""
    name = os.path.basename(command)
    if name.startswith("gst-launch"):
        return "GStreamer"
    return "FFmpeg" if name == "ffmpeg" else name


def kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def watch_exit(pid: int) -> Callable[[], None]:
    """Kill the process group of ``pid`` half a second after ``pid`` died (Linux pidfd), so
    leftovers holding its pipes cannot keep the session waiting for their end.

    Returns the function that stops watching (the session calls it as it ends, so the group
    is killed only when the session outlived the child's death by the grace). Event-driven:
    the pidfd becomes readable when the child exits; nothing polls.

    A child with no pidfd to open was reaped already: asyncio's child watcher (a thread, or
    its own pidfd) reaps a child that dies at once while the session's pipes are being
    connected. It is dead, so its grace starts now. Whether the session is done with its pipes
    is not asked of ``Process.wait()``: it waits for the pipes to close only when it begins
    before asyncio saw the exit, and here asyncio may have seen it first.
    """
    loop = asyncio.get_running_loop()
    timer: list[asyncio.TimerHandle] = []

    def kill_leftovers() -> None:
        kill_group(pid, signal.SIGKILL)

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # reaped already: dead
        timer.append(loop.call_later(_ORPHAN_GRACE, kill_leftovers))
        return timer[0].cancel
    except (AttributeError, OSError):  # not Linux >= 5.3
        return lambda: None

    def on_exit() -> None:
        loop.remove_reader(fd)
        timer.append(loop.call_later(_ORPHAN_GRACE, kill_leftovers))

    loop.add_reader(fd, on_exit)

    def unwatch() -> None:
        loop.remove_reader(fd)
        os.close(fd)
        for handle in timer:
            handle.cancel()

    return unwatch
