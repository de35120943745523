"""Model adapters: one async contract for calling a model, wherever the model runs.

Every adapter has the same call::

    result = await adapter.infer(input_path, prompt="turn into anime", style="studio", seed=42,
                                 output_dir=workdir, progress=callback)
    result.frames_path  # a directory of frames written by the model

The base class :class:`ModelAdapter` owns the policy: ``setup()`` once before the first call,
a ``timeout`` per attempt, retries with exponential backoff (:class:`~framepipe.backoff.Backoff`)
on retryable failures (``ModelError.retryable``), cancellation (cancelling the awaiting task
stops the work: a subprocess model's whole process group is killed), and the ``progress``
callback ``progress(pct)`` with ``pct`` in 0-100 of the model's own work (restarting at 0 on a
retry). Inside a job step, :func:`as_step_progress` maps it into a part of the step's progress::

    @pipeline.step()
    async def inference(ctx: StepContext) -> dict[str, Any]:
        result = await model.infer(ctx.inputs["video"], output_dir=ctx.tempdir(),
                                   progress=as_step_progress(ctx, 15, 65))
        return {"frames_path": str(result.frames_path)}

Adapters:

- :class:`PythonModel`: an in-process callable or class, loaded once, run in a thread.
- :class:`SubprocessModel`: runs ``python model.py --input X --prompt P --style S --seed N
  --output-dir D`` and reads ``progress: N`` and ``frames_path: P`` lines from its stdout.
- :class:`HttpModel`: ``POST {url}/infer`` multipart (``input_file``, ``prompt``, ``style``,
  ``seed``), answer ``{"success": true, "frames_path": ...}``.
- :class:`MockModel`: writes generated frames, with progress; for tests and demos.

An adapter is not a :class:`~framepipe.processors.Processor`: most models work on files (a
video in, a directory of frames out), not on live frames. An in-process model also runs on live
frames through :class:`ModelProcessor`, a processor made for that::

    Stage(ModelProcessor(PythonModel(Detector)), workers=2)

Which adapter the ready ML video pipeline builds, and with which retries, is that pipeline's
setting (:class:`framepipe.pipelines.ml_settings.MlVideoSettings`); the adapters read no
settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from framepipe.backoff import Backoff
from framepipe.errors import ConfigError, ModelError, ModelOutputError, ModelTimeoutError
from framepipe.frames import Frame, Image
from framepipe.processors.base import Processor

if TYPE_CHECKING:
    from framepipe.jobs.context import StepContext

__all__ = [
    "HttpModel",
    "MockModel",
    "ModelAdapter",
    "ModelProcessor",
    "ModelResult",
    "ProgressCallback",
    "PythonModel",
    "SubprocessModel",
    "as_step_progress",
]

log = logging.getLogger("framepipe.models")

PathLike = str | os.PathLike[str]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ProgressCallback(Protocol):
    """``progress(pct)``: ``pct`` is 0-100 of the model's own work."""

    def __call__(self, pct: float, /) -> None: ...


@dataclass(frozen=True)
class ModelResult:
    """What a model produced: ``frames_path``, a directory of frames, and anything else it
    reported (``extra``: the rest of an HTTP answer, the script's other stdout lines...)."""

    frames_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def frame_files(self) -> list[Path]:
        """The image files in :attr:`frames_path`, sorted by name."""
        return sorted(p for p in self.frames_path.iterdir()
                      if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def as_step_progress(ctx: StepContext, lo: float = 0.0, hi: float = 100.0,
                     message: str | None = None) -> ProgressCallback:
    """A progress callback reporting the model's 0-100 % as ``lo``-``hi`` % of the step ``ctx``
    (say 15-65 %, when the step does more than call the model). Each report also checks for
    cancellation: once the execution is cancelled it raises
    :class:`~framepipe.errors.StepCancelledError`, which stops the model call."""
    if not 0 <= lo <= hi <= 100:
        raise ValueError(f"progress range must satisfy 0 <= lo <= hi <= 100, not {lo}-{hi}")

    def report(pct: float, /) -> None:
        share = min(100.0, max(0.0, float(pct))) / 100.0
        ctx.progress(lo + (hi - lo) * share, message)

    return report


def _clamped(progress: ProgressCallback | None) -> Callable[[float], None]:
    def report(pct: float) -> None:
        if progress is not None:
            progress(min(100.0, max(0.0, float(pct))))

    return report


class ModelAdapter:
    """Base class of model adapters: subclasses implement :meth:`_infer_once` (one attempt);
    :meth:`infer` adds setup, the per-attempt ``timeout`` (seconds, None for none), retries
    (``max_retries`` after the first attempt, delays from ``retry_initial`` doubling up to
    ``retry_max``) and the check that ``frames_path`` exists (``check_frames_path``).

    Usable as ``async with adapter:`` (``setup`` on enter, ``teardown`` on exit); ``infer``
    also calls ``setup`` once by itself. ``setup`` must be idempotent; subclasses that load
    something override :meth:`setup` and :meth:`teardown`.
    """

    name: str = ""
    check_frames_path: bool = True

    def __init__(self, *, name: str | None = None, timeout: float | None = None,
                 max_retries: int = 2, retry_initial: float = 1.0,
                 retry_max: float = 30.0) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries}")
        if name:
            self.name = name
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = Backoff(initial=retry_initial, factor=2.0,
                               maximum=max(retry_max, retry_initial))
        self._ready = False

    # -- description ----------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The adapter's name, defaulting to its class name."""
        return self.name or type(self).__name__

    @property
    def target(self) -> str:
        """What the adapter calls (script, URL, callable), for messages."""
        return ""

    def describe(self) -> str:
        """``Label(target)``, the name used in every error message."""
        return f"{self.label}({self.target})" if self.target else self.label

    def __repr__(self) -> str:
        return f"<{self.describe()}>"

    # -- lifecycle ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Load what the model needs; called once before the first call (idempotent)."""

    def teardown(self) -> None:
        """Release what :meth:`setup` loaded; the next call sets up again."""

    async def __aenter__(self) -> ModelAdapter:
        await asyncio.to_thread(self.setup)
        self._ready = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.teardown)
        self._ready = False

    # -- the contract ---------------------------------------------------------------------------

    async def infer(self, input_path: PathLike, *, prompt: str = "", style: str = "default",
                    seed: int = 0, output_dir: PathLike, progress: ProgressCallback | None = None,
                    **options: Any) -> ModelResult:
        """Run the model on ``input_path``; its frames go under ``output_dir`` (created).

        Raises :class:`ModelError` (``ModelTimeoutError``, ``ModelOutputError``) once the
        retries are spent or for a failure that retrying cannot fix."""
        if not self._ready:
            await asyncio.to_thread(self.setup)
            self._ready = True
        out = Path(output_dir)
        await asyncio.to_thread(out.mkdir, parents=True, exist_ok=True)
        report = _clamped(progress)
        attempts = self.max_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                try:
                    async with asyncio.timeout(self.timeout):
                        result = await self._infer_once(
                            Path(input_path), prompt=prompt, style=style, seed=seed,
                            output_dir=out, progress=report, options=options)
                except TimeoutError as exc:
                    if isinstance(exc, ModelError):
                        raise
                    raise ModelTimeoutError(
                        f"{self.describe()}: no result within {self.timeout:g}s",
                        model=self.describe(), retryable=True) from exc
                return self._checked(result)
            except ModelError as exc:
                if not exc.retryable or attempt == attempts:
                    if attempt > 1:
                        raise _after_retries(exc, attempt) from exc
                    raise
                delay = self.backoff.delay(attempt)
                log.warning("%s: attempt %d of %d failed (%s); retrying in %.2fs",
                            self.describe(), attempt, attempts, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _infer_once(self, input_path: Path, *, prompt: str, style: str, seed: int,
                          output_dir: Path, progress: Callable[[float], None],
                          options: Mapping[str, Any]) -> ModelResult:
        """One attempt. Raise :class:`ModelError` with ``retryable`` set as appropriate."""
        raise NotImplementedError

    def _checked(self, result: ModelResult) -> ModelResult:
        if self.check_frames_path and not result.frames_path.is_dir():
            what = "is not a directory" if result.frames_path.exists() else "does not exist"
            raise ModelOutputError(f"{self.describe()}: frames_path {result.frames_path} {what}",
                                   model=self.describe())
        return result


def _after_retries(exc: ModelError, attempts: int) -> ModelError:
    """``exc`` restated as the final failure after ``attempts`` attempts (same class)."""
    return type(exc)(f"failed after {attempts} attempts; last error: {exc}", model=exc.model,
                     retryable=exc.retryable, exit_code=exc.exit_code,
                     stderr_tail=exc.stderr_tail, status_code=exc.status_code)


def _as_result(value: Any, who: str) -> ModelResult:
    """A model's return value as a :class:`ModelResult` (a result, a path, or a dict)."""
    if isinstance(value, ModelResult):
        return value
    if isinstance(value, str | os.PathLike):
        return ModelResult(Path(value))
    if isinstance(value, Mapping) and isinstance(value.get("frames_path"), str | os.PathLike):
        extra = {k: v for k, v in value.items() if k != "frames_path"}
        return ModelResult(Path(value["frames_path"]), extra)
    raise ModelOutputError(f"{who} returned {type(value).__name__}, not a frames path, a dict "
                           "with 'frames_path' or a ModelResult", model=who)


# -- in-process ---------------------------------------------------------------------------------


class PythonModel(ModelAdapter):
    """An in-process model: a callable, or a class instantiated once by :meth:`setup` (which
    then calls the instance's ``load()`` or ``setup()`` if it has one, and :meth:`teardown`
    its ``unload()``, ``teardown()`` or ``close()``).

    - ``infer`` calls ``model.infer(input_path, prompt=, style=, seed=, output_dir=, progress=,
      **options)`` (or the callable itself) in a thread; it returns a frames directory (``str``
      or ``Path``), a dict with ``frames_path``, or a :class:`ModelResult`.
    - :meth:`on_image` calls ``model.process_frame(image)`` (or the callable itself) with a
      BGR image; :class:`ModelProcessor` runs it on a live stage's frames.

    A thread cannot be killed: on timeout or cancellation the awaiting task returns at once, and
    the model's next ``progress`` call raises :class:`asyncio.CancelledError` to stop it.
    Exceptions of the model are wrapped in a retryable :class:`ModelError`, except those the
    progress callback raised (``StepCancelledError`` from :func:`as_step_progress`), which pass
    through unchanged and are not retried.
    """

    def __init__(self, model: Any, *, name: str | None = None, timeout: float | None = None,
                 max_retries: int = 0, retry_initial: float = 1.0,
                 retry_max: float = 30.0) -> None:
        if not callable(model) and not hasattr(model, "infer"):
            raise TypeError(f"{model!r} is neither callable nor has an infer() method")
        super().__init__(name=name, timeout=timeout, max_retries=max_retries,
                         retry_initial=retry_initial, retry_max=retry_max)
        self.factory = model
        self.model: Any = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        return str(getattr(self.factory, "__qualname__", type(self.factory).__name__))

    def setup(self) -> None:
        with self._lock:
            if self.model is not None:
                return
            model = self.factory() if isinstance(self.factory, type) else self.factory
            if isinstance(self.factory, type):
                for hook in ("load", "setup"):
                    method = getattr(model, hook, None)
                    if callable(method):
                        method()
                        break
            self.model = model

    def teardown(self) -> None:
        with self._lock:
            model, self.model = self.model, None
            self._ready = False
        if model is not None and isinstance(self.factory, type):
            for hook in ("unload", "teardown", "close"):
                method = getattr(model, hook, None)
                if callable(method):
                    method()
                    break

    def on_image(self, image: Image) -> Any:
        """The model's answer for one BGR image: ``model.process_frame(image)``, or the
        callable itself; sets the model up first if needed. Called from any thread."""
        if self.model is None:
            self.setup()
        fn = getattr(self.model, "process_frame", None) or self.model
        return fn(image)

    async def _infer_once(self, input_path: Path, *, prompt: str, style: str, seed: int,
                          output_dir: Path, progress: Callable[[float], None],
                          options: Mapping[str, Any]) -> ModelResult:
        if self.model is None:
            await asyncio.to_thread(self.setup)
        fn = getattr(self.model, "infer", None) or self.model
        stop = threading.Event()
        raised: list[BaseException] = []  # by the progress callback: passed on unwrapped

        def report(pct: float, /) -> None:
            if stop.is_set():
                raise asyncio.CancelledError(f"{self.describe()} was cancelled")
            try:
                progress(pct)
            except BaseException as exc:
                raised.append(exc)
                raise

        def call() -> Any:
            return fn(input_path, prompt=prompt, style=style, seed=seed, output_dir=output_dir,
                      progress=report, **options)

        try:
            value = await asyncio.to_thread(call)
        except asyncio.CancelledError:
            stop.set()
            raise
        except ModelError:
            raise
        except Exception as exc:
            if any(exc is r for r in raised):  # e.g. the step is cancelled: do not retry
                raise
            raise ModelError(f"{self.describe()} raised {type(exc).__name__}: {exc}",
                             model=self.describe(), retryable=True) from exc
        if inspect.isawaitable(value):
            value = await value
        return _as_result(value, self.describe())


class ModelProcessor(Processor):
    """A live-stage processor that runs an in-process model (:class:`PythonModel`) on each
    frame's BGR image. What the model answers decides the frame's fate: an array replaces the
    image, a :class:`Frame` replaces the frame, None drops it, anything else is stored in
    ``frame.meta[name]`` (``name`` defaults to the model's label).

    ``setup`` and ``teardown`` load and release the model, once per pipeline run; the stage's
    worker threads share the loaded model. Only an in-process model takes frames: the other
    adapters work on files, and giving one is a :class:`TypeError`.
    """

    capabilities = ("model",)

    def __init__(self, model: PythonModel, *, name: str | None = None) -> None:
        if not isinstance(model, PythonModel):
            what = model.describe() if isinstance(model, ModelAdapter) else repr(model)
            raise TypeError(
                f"{what} works on files (a video in, a directory of frames out), not on live "
                "frames: call 'await adapter.infer(...)' in a job step; ModelProcessor runs "
                "a PythonModel")
        self.model = model
        self.name = name or model.label

    def setup(self) -> None:
        self.model.setup()

    def teardown(self) -> None:
        self.model.teardown()

    def process(self, item: Any) -> Any:
        frame: Frame = item
        out = self.model.on_image(frame.image)
        if out is None or isinstance(out, Frame):
            return out
        if isinstance(out, np.ndarray):
            return replace(frame, image=out)
        frame.meta[self.label] = out
        return frame


# -- subprocess ---------------------------------------------------------------------------------

_PROGRESS = re.compile(r"^\s*progress:\s*([-+]?\d+(?:\.\d+)?)\s*%?\s*$", re.IGNORECASE)
_FRAMES = re.compile(r"^\s*frames_path:\s*(.+?)\s*$", re.IGNORECASE)

DEFAULT_ARGV = ("{python}", "{script}", "--input", "{input}", "--prompt", "{prompt}",
                "--style", "{style}", "--seed", "{seed}", "--output-dir", "{output_dir}")


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
    so are children it left behind when it exits.

    Failures: a non-zero exit is a (retryable) :class:`ModelError` with ``exit_code`` and the
    last lines of stderr; no ``frames_path`` line, or a path that is not a directory, is a
    :class:`ModelOutputError`; a timeout a :class:`ModelTimeoutError`.
    """

    def __init__(self, script: PathLike | None = None, *, argv: Sequence[str] | None = None,
                 python: str = sys.executable, cwd: PathLike | None = None,
                 env: Mapping[str, str] | None = None, name: str | None = None,
                 timeout: float | None = None, max_retries: int = 0,
                 retry_initial: float = 1.0, retry_max: float = 30.0,
                 stderr_lines: int = 20) -> None:
        if script is None and argv is None:
            raise ValueError("SubprocessModel needs a script or an argv template")
        super().__init__(name=name, timeout=timeout, max_retries=max_retries,
                         retry_initial=retry_initial, retry_max=retry_max)
        self.script = None if script is None else Path(script)
        self.argv = tuple(argv) if argv is not None else DEFAULT_ARGV
        self.python = python
        self.cwd = None if cwd is None else Path(cwd)
        self.env = None if env is None else dict(env)
        self.stderr_lines = stderr_lines

    @property
    def target(self) -> str:
        return str(self.script) if self.script is not None else " ".join(self.argv)

    def command(self, input_path: PathLike, *, prompt: str = "", style: str = "default",
                seed: int = 0, output_dir: PathLike, **options: Any) -> list[str]:
        """The argv of one call."""
        values = {"python": self.python, "script": str(self.script or ""),
                  "input": str(input_path), "prompt": prompt, "style": style, "seed": str(seed),
                  "output_dir": str(output_dir)}
        try:
            argv = [part.format_map(values) for part in self.argv]
        except (KeyError, ValueError, IndexError) as exc:
            raise ConfigError(f"{self.describe()}: bad argv template {list(self.argv)}: {exc}"
                              ) from exc
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is not None and value is not False:
                argv += [flag, str(value)]
        return argv

    async def _infer_once(self, input_path: Path, *, prompt: str, style: str, seed: int,
                          output_dir: Path, progress: Callable[[float], None],
                          options: Mapping[str, Any]) -> ModelResult:
        argv = self.command(input_path, prompt=prompt, style=style, seed=seed,
                            output_dir=output_dir, **options)
        env = None if self.env is None else {**os.environ, **self.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, cwd=self.cwd, env=env, start_new_session=True)
        except OSError as exc:
            raise ModelError(f"{self.describe()}: cannot start {argv[0]!r}: {exc}",
                             model=self.describe()) from exc
        assert proc.stdout is not None
        assert proc.stderr is not None
        frames: list[str] = []
        other: list[str] = []
        tail: deque[str] = deque(maxlen=self.stderr_lines)
        reader = asyncio.create_task(self._read_stdout(proc.stdout, progress, frames, other))
        errors = asyncio.create_task(self._read_stderr(proc.stderr, tail))
        waiter = asyncio.create_task(proc.wait())
        try:
            done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                reader.result()  # a progress callback that raised (e.g. the step is cancelled)
            code = await waiter
            _kill_group(proc.pid)  # children it left behind, which may hold the pipes open
            await asyncio.wait_for(asyncio.gather(reader, errors), 10)
        finally:
            if proc.returncode is None:
                _kill_group(proc.pid)
                await asyncio.wait({waiter}, timeout=10)
            _kill_group(proc.pid)
            for task in (reader, errors, waiter):
                task.cancel()
        stderr_tail = "\n".join(tail)
        if code != 0:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            raise ModelError(f"{self.describe()} {how}" +
                             (f"; stderr:\n{stderr_tail}" if stderr_tail else " (no stderr)"),
                             model=self.describe(), retryable=True, exit_code=code,
                             stderr_tail=stderr_tail)
        if not frames:
            raise ModelOutputError(
                f"{self.describe()} exited 0 without printing a 'frames_path: PATH' line" +
                (f"; stderr:\n{stderr_tail}" if stderr_tail else ""),
                model=self.describe(), exit_code=0, stderr_tail=stderr_tail)
        path = Path(frames[-1])
        if not path.is_absolute():
            path = (self.cwd or Path.cwd()) / path
        return ModelResult(path, {"stdout": other} if other else {})

    async def _read_stdout(self, stream: asyncio.StreamReader,
                           progress: Callable[[float], None], frames: list[str],
                           other: list[str]) -> None:
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\r\n")
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
        async for raw in stream:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.strip():
                tail.append(line)


# -- HTTP ---------------------------------------------------------------------------------------


class HttpModel(ModelAdapter):
    """A model behind HTTP: ``POST {url}/infer`` with a multipart form (``input_file``,
    ``prompt``, ``style``, ``seed``, plus extra options as fields); the answer is JSON
    ``{"success": true, "frames_path": "..."}`` (other keys go to ``extra``).

    HTTP 5xx, connection errors and timeouts are retried with backoff (``max_retries``), then
    fail with a :class:`ModelError` naming the URL and the last error. A 4xx is not retried,
    nor is ``success: false`` (a :class:`ModelError` with the server's ``error`` text). A body
    that is not JSON, or no ``frames_path``, is a :class:`ModelOutputError`.

    The server's ``frames_path`` is a path on *its* filesystem, so it is not checked here unless
    ``check_frames_path=True`` (a shared volume). ``transport`` is passed to ``httpx``.
    """

    check_frames_path = False

    def __init__(self, url: str, *, timeout: float | None = 300.0, max_retries: int = 3,
                 retry_initial: float = 1.0, retry_max: float = 30.0,
                 headers: Mapping[str, str] | None = None, check_frames_path: bool = False,
                 name: str | None = None, transport: Any = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"model URL must start with http:// or https://, not {url!r}")
        super().__init__(name=name, timeout=timeout, max_retries=max_retries,
                         retry_initial=retry_initial, retry_max=retry_max)
        self.url = url.rstrip("/")
        self.headers = dict(headers or {})
        self.check_frames_path = check_frames_path
        self.transport = transport

    @property
    def target(self) -> str:
        return self.url

    @property
    def endpoint(self) -> str:
        """The URL posted to."""
        return f"{self.url}/infer"

    async def _infer_once(self, input_path: Path, *, prompt: str, style: str, seed: int,
                          output_dir: Path, progress: Callable[[float], None],
                          options: Mapping[str, Any]) -> ModelResult:
        import httpx

        who = self.describe()
        data = {"prompt": prompt, "style": style, "seed": str(seed),
                **{k: str(v) for k, v in options.items() if v is not None}}
        try:
            content = await asyncio.to_thread(input_path.read_bytes)
        except OSError as exc:
            raise ModelError(f"{who}: cannot read input {input_path}: {exc}", model=who) from exc
        progress(0)
        try:
            async with httpx.AsyncClient(timeout=self.timeout, headers=self.headers,
                                         transport=self.transport) as client:
                response = await client.post(
                    self.endpoint, data=data,
                    files={"input_file": (input_path.name, content, "application/octet-stream")})
        except httpx.TimeoutException as exc:
            raise ModelTimeoutError(f"{who}: POST {self.endpoint} timed out "
                                    f"({type(exc).__name__})", model=who,
                                    retryable=True) from exc
        except httpx.HTTPError as exc:
            raise ModelError(f"{who}: POST {self.endpoint} failed: {type(exc).__name__}: "
                             f"{exc or 'connection error'}", model=who, retryable=True) from exc
        body = response.text
        if response.status_code >= 400:
            raise ModelError(
                f"{who}: POST {self.endpoint} answered HTTP {response.status_code}: "
                f"{body[-500:].strip() or response.reason_phrase}", model=who,
                retryable=response.status_code >= 500, status_code=response.status_code)
        try:
            answer = response.json()
        except ValueError as exc:
            raise ModelOutputError(f"{who}: POST {self.endpoint} answered a body that is not "
                                   f"JSON: {body[:200]!r}", model=who,
                                   status_code=response.status_code) from exc
        if not isinstance(answer, dict):
            raise ModelOutputError(f"{who}: POST {self.endpoint} answered {answer!r}, not a "
                                   "JSON object", model=who, status_code=response.status_code)
        if answer.get("success") is not True:
            error = answer.get("error") or answer.get("message") or "no error text"
            raise ModelError(f"{who}: the model failed: {error}", model=who,
                             status_code=response.status_code)
        frames_path = answer.get("frames_path")
        if not isinstance(frames_path, str) or not frames_path:
            raise ModelOutputError(f"{who}: the answer has no 'frames_path': {answer!r}",
                                   model=who, status_code=response.status_code)
        progress(100)
        extra = {k: v for k, v in answer.items() if k not in {"success", "frames_path"}}
        return ModelResult(Path(frames_path), extra)


# -- mock ---------------------------------------------------------------------------------------


class MockModel(ModelAdapter):
    """Writes ``frames`` generated images of ``size`` (width, height) as ``frame_0000.png``
    (or ``.jpg`` with ``fmt="jpg"``) into ``output_dir/frames``, reporting progress after each,
    waiting ``delay`` seconds per frame (cancellable). The images depend on ``seed`` and
    ``style`` (a colour gradient and a moving square), so runs are reproducible. The input file
    is not read. For tests and demos."""

    def __init__(self, frames: int = 10, size: tuple[int, int] = (320, 240), *,
                 delay: float = 0.0, fmt: str = "png", name: str | None = None,
                 timeout: float | None = None, max_retries: int = 0) -> None:
        if frames < 1:
            raise ValueError(f"frames must be >= 1, not {frames}")
        if size[0] < 8 or size[1] < 8:
            raise ValueError(f"size must be at least 8x8, not {size}")
        if fmt not in ("png", "jpg"):
            raise ValueError(f"fmt must be 'png' or 'jpg', not {fmt!r}")
        super().__init__(name=name, timeout=timeout, max_retries=max_retries)
        self.frames = frames
        self.size = size
        self.delay = delay
        self.fmt = fmt

    @property
    def target(self) -> str:
        return f"{self.frames} frames {self.size[0]}x{self.size[1]}"

    def render(self, index: int, *, seed: int = 0, style: str = "default") -> Image:
        """Frame ``index`` as a BGR image."""
        w, h = self.size
        tint = (seed * 37 + sum(style.encode())) % 256
        x = np.linspace(0, 255, w, dtype=np.float32)
        y = np.linspace(0, 255, h, dtype=np.float32)
        image = np.empty((h, w, 3), np.uint8)
        image[..., 0] = np.broadcast_to(x[None, :], (h, w)).astype(np.uint8)
        image[..., 1] = np.broadcast_to(y[:, None], (h, w)).astype(np.uint8)
        image[..., 2] = tint
        side = max(2, min(w, h) // 6)
        left = (index * 7) % max(1, w - side)
        image[h // 2 - side // 2: h // 2 + side // 2, left:left + side] = 255
        return image

    async def _infer_once(self, input_path: Path, *, prompt: str, style: str, seed: int,
                          output_dir: Path, progress: Callable[[float], None],
                          options: Mapping[str, Any]) -> ModelResult:
        import cv2

        frames_dir = output_dir / "frames"
        frames_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        progress(0)
        for i in range(self.frames):
            if self.delay:
                await asyncio.sleep(self.delay)
            path = frames_dir / f"frame_{i:04d}.{self.fmt}"
            if not cv2.imwrite(str(path), self.render(i, seed=seed, style=style)):
                raise ModelError(f"{self.describe()}: cannot write {path}", model=self.describe())
            progress(100 * (i + 1) / self.frames)
        return ModelResult(frames_dir, {"frames": self.frames, "prompt": prompt,
                                        "seconds": round(time.monotonic() - started, 3)})
