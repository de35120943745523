"""Models run as commands: :class:`SubprocessModel`, one process per call, talking through
``progress: N`` and ``frames_path: P`` lines on its stdout.

Guarantees: the process runs in its own session, and its whole process group is killed
(SIGKILL) on timeout, on cancellation and when it exits (children it left behind); it gets
SIGKILL when the process that started it dies, however that dies (SIGKILL included: Linux's
parent-death signal, set as :func:`~framepipe.sources.child.parent_death_command` sets it for
a capture), so a killed worker's model does not run on beside its retry; the call answers
when the process exits, even while a process it started outside its group (which cannot be
killed with it: it is logged as left running) still holds its output open; a non-zero exit is
a retryable :class:`~framepipe.errors.ModelError` carrying the exit code and the last lines of
stderr, its first line ending with stderr's last line (the cause, which an execution's
one-line error shows), except the ``sysexits.h`` codes by which a script refuses for good:
65 (``EX_DATAERR``) and 66 (``EX_NOINPUT``) refuse its input
(:class:`~framepipe.errors.ModelRefusedError`, an invalid input: neither the adapter nor a
step's retry runs it again), 64 (``EX_USAGE``) and 78 (``EX_CONFIG``) its command or setup
(:class:`~framepipe.errors.ModelSetupError`, a setting to fix, then resume); no
``frames_path`` line is a :class:`~framepipe.errors.ModelOutputError`.

Processes the model started itself are killed with it on timeout, cancellation and exit (its
process group), but not when the process that started the model dies: nothing is left to
kill them then, and they end as their own code decides.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from framepipe.errors import (
    ConfigError,
    ModelError,
    ModelOutputError,
    ModelRefusedError,
    ModelSetupError,
)
from framepipe.pipes import lines
from framepipe.processors.adapters.base import ModelAdapter, ModelResult, PathLike
from framepipe.sources.child import parent_death_command
from framepipe.urls import safe_text

__all__ = ["DEFAULT_ARGV", "REFUSALS", "SubprocessModel"]

REFUSALS: dict[int, tuple[type[ModelError], str, str]] = {
    65: (ModelRefusedError, "EX_DATAERR", "the model refused its input; not run again"),
    66: (ModelRefusedError, "EX_NOINPUT", "the model refused its input; not run again"),
    64: (ModelSetupError, "EX_USAGE", "the model's command or setup is wrong; not run again"),
    78: (ModelSetupError, "EX_CONFIG", "the model's command or setup is wrong; not run again"),
}
"""Exit codes (BSD ``sysexits.h``) by which a model script refuses for good: its input (a
:class:`~framepipe.errors.ModelRefusedError`, as an HTTP model's 400) or its command line or
setup (a :class:`~framepipe.errors.ModelSetupError`, as an HTTP model's 401 or 404); with
the name of the code and what the error adds."""

log = logging.getLogger("framepipe.models")

_PROGRESS = re.compile(r"^\s*progress:\s*([-+]?\d+(?:\.\d+)?)\s*%?\s*$", re.IGNORECASE)
_FRAMES = re.compile(r"^\s*frames_path:\s*(.+?)\s*$", re.IGNORECASE)

DEFAULT_ARGV = (
    "{python}",
    "{script}",
    "--input",
    "{input}",
    "--prompt",
    "{prompt}",
    "--style",
    "{style}",
    "--seed",
    "{seed}",
    "--output-dir",
    "{output_dir}",
)


_DRAIN_GRACE = 5.0
"""Seconds to read what is left in the pipes once the process exited and its group was
killed."""


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """The stream protocol of :func:`asyncio.create_subprocess_exec`, plus ``exited``: a future
    done when the process exits, even while processes it started hold its pipes open
    (``Process.wait()`` waits for the pipes too)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=2**16, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


_CAUSE_MAX = 300
"""Characters of stderr's last line an error's first line quotes."""


def _stderr_part(tail: deque[str]) -> str:
    """What an error adds for the model's stderr: ``: <its last line>`` on the error's first
    line (what a failing program says last is its error: a Python traceback ends with the
    exception), cut to :data:`_CAUSE_MAX` characters, since the first line is what an
    execution's error, ``jobs list`` and ``framepipe run`` show; then, from the next line on,
    the last lines."""
    if not tail:
        return ""
    cause = tail[-1].strip()
    if len(cause) > _CAUSE_MAX:
        cause = cause[: _CAUSE_MAX - 1] + "\u2026"
    return f": {cause}\nstderr (last {len(tail)} lines):\n" + "\n".join(tail)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class SubprocessModel(ModelAdapter):
    """A model run as a command, one process per call.

    By default the command is ``{python} {script} --input {input} --prompt {prompt} --style
    {style} --seed {seed} --output-dir {output_dir}``; pass ``argv`` (a list of templates with
    those fields) for another one. Extra ``infer`` options are appended as ``--key value``
    (underscores become dashes; ``True`` gives a bare ``--key``; ``False``/None are left out).

    Its stdout is read line by line: ``progress: N`` goes to the progress callback,
    ``frames_path: P`` is the result (the last such line wins; a relative path is relative to
    ``cwd``); other lines are logged at DEBUG. The process runs in a new session (its own
    process group): on timeout or cancellation the **whole group** is killed (SIGKILL), and
    so are children it left behind when it exits. It is killed (SIGKILL) when the process
    that started it dies, even by SIGKILL.

    Failures: a non-zero exit is a (retryable) :class:`ModelError` with ``exit_code`` and the
    last lines of stderr (``... exited with code 3: <stderr's last line>`` then the lines);
    no ``frames_path`` line, or a path that is not a directory, is a
    :class:`ModelOutputError`; a timeout a :class:`ModelTimeoutError`.
    """

    def __init__(
        self,
        script: PathLike | None = None,
        *,
        argv: Sequence[str] | None = None,
        python: str = sys.executable,
        cwd: PathLike | None = None,
        env: Mapping[str, str] | None = None,
        name: str | None = None,
        timeout: float | None = None,
        max_retries: int = 0,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
        stderr_lines: int = 20,
    ) -> None:
        if script is None and argv is None:
            raise ValueError("SubprocessModel needs a script or an argv template")
        super().__init__(
            name=name,
            timeout=timeout,
            max_retries=max_retries,
            retry_initial=retry_initial,
            retry_max=retry_max,
        )
        self.script = None if script is None else Path(script)
        self.argv = tuple(argv) if argv is not None else DEFAULT_ARGV
        self.python = python
        self.cwd = None if cwd is None else Path(cwd)
        self.env = None if env is None else dict(env)
        self.stderr_lines = stderr_lines

    @property
    def target(self) -> str:
        """The script, or the command template with any secret in a URL of it masked (it names
        the model in every error and log line)."""
        return str(self.script) if self.script is not None else safe_text(" ".join(self.argv))

    def command(
        self,
        input_path: PathLike,
        *,
        prompt: str = "",
        style: str = "default",
        seed: int = 0,
        output_dir: PathLike,
        **options: Any,
    ) -> list[str]:
        """The argv of one call."""
        values = {
            "python": self.python,
            "script": str(self.script or ""),
            "input": str(input_path),
            "prompt": prompt,
            "style": style,
            "seed": str(seed),
            "output_dir": str(output_dir),
        }
        try:
            argv = [part.format_map(values) for part in self.argv]
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(
                f"{self.describe()}: bad argv template {list(self.argv)}: {exc}"
            ) from exc
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        return argv

    async def _infer_once(
        self,
        input_path: Path,
        *,
        prompt: str,
        style: str,
        seed: int,
        output_dir: Path,
        progress: Callable[[float], None],
        options: Mapping[str, Any],
    ) -> ModelResult:
        argv = self.command(
            input_path, prompt=prompt, style=style, seed=seed, output_dir=output_dir, **options
        )
        env = None if self.env is None else {**os.environ, **self.env}
        loop = asyncio.get_running_loop()
        try:
            # the model dies with this process, even by SIGKILL (its retry must not run
            # beside it); asked in a thread: the first call runs ``setpriv --help``
            command = await asyncio.to_thread(parent_death_command, argv, env)
            transport, protocol = await loop.subprocess_exec(
                lambda: _Protocol(loop),
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise ModelError(
                f"{self.describe()}: cannot start {argv[0]!r}: {exc}", model=self.describe()
            ) from exc
        assert protocol.stdout is not None
        assert protocol.stderr is not None
        pid = transport.get_pid()
        frames: deque[str] = deque(maxlen=1)  # the last frames_path line is the answer
        other: list[str] = []
        tail: deque[str] = deque(maxlen=self.stderr_lines)
        reader = asyncio.create_task(self._read_stdout(protocol.stdout, progress, frames, other))
        errors = asyncio.create_task(self._read_stderr(protocol.stderr, tail))
        try:
            done, _ = await asyncio.wait(
                {reader, protocol.exited}, return_when=asyncio.FIRST_COMPLETED
            )
            if reader in done:
                reader.result()  # a progress callback that raised (e.g. the step is cancelled)
            await protocol.exited
            _kill_group(pid)  # children it left behind, which may hold the pipes open
            _, pending = await asyncio.wait({reader, errors}, timeout=_DRAIN_GRACE)
            if pending:
                log.warning(
                    "%s exited but a process it started outside its process group still holds "
                    "its output open; that process is left running",
                    self.describe(),
                )
            elif reader.exception() is not None:
                reader.result()
        finally:
            if not protocol.exited.done():
                _kill_group(pid)
                await asyncio.wait({protocol.exited}, timeout=10)
            _kill_group(pid)
            for task in (reader, errors):
                task.cancel()
            transport.close()
        code = transport.get_returncode()
        assert code is not None
        stderr_tail = "\n".join(tail)
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            said = f"{self.describe()} {how}" + (_stderr_part(tail) or " (no stderr)")
            if code in REFUSALS:
                error, name, meaning = REFUSALS[code]
                raise error(
                    f"{said}\n(exit code {code}, {name}: {meaning})",
                    model=self.describe(),
                    exit_code=code,
                    stderr_tail=stderr_tail,
                )
            raise ModelError(
                said,
                model=self.describe(),
                retryable=True,
                exit_code=code,
                stderr_tail=stderr_tail,
            )
        if not frames:
            raise ModelOutputError(
                f"{self.describe()} exited 0 without printing a 'frames_path: PATH' line"
                + _stderr_part(tail),
                model=self.describe(),
                exit_code=0,
                stderr_tail=stderr_tail,
            )
        path = Path(frames[-1])
        if not path.is_absolute():
            path = (self.cwd or Path.cwd()) / path
        return ModelResult(path, {"stdout": other} if other else {})

    async def _read_stdout(
        self,
        stream: asyncio.StreamReader,
        progress: Callable[[float], None],
        frames: deque[str],
        other: list[str],
    ) -> None:
        async for line in lines(stream):
            if match := _PROGRESS.match(line):
                progress(float(match.group(1)))
            elif match := _FRAMES.match(line):
                frames.append(match.group(1))
            elif line.strip():
                log.debug("%s: %s", self.describe(), line)
                if len(other) < 100:
                    other.append(line)

    @staticmethod
    async def _read_stderr(stream: asyncio.StreamReader, tail: deque[str]) -> None:
        async for line in lines(stream):
            if line.strip():
                tail.append(line)
