"""The adapters' contract and policy: :class:`ModelAdapter`, what it returns (:class:`ModelResult`)
and how it reports progress (:class:`ProgressCallback`, :func:`as_step_progress`).

What every adapter guarantees, whatever runs the model: ``setup()`` once before the first call
(idempotent), the output directory created before it, a ``timeout`` per attempt (a
:class:`~framepipe.errors.ModelTimeoutError`), retries with exponential backoff only for a
:class:`~framepipe.errors.ModelError` marked ``retryable`` (the last one restated as "failed
after N attempts", same class), progress clamped to 0-100, and a result whose ``frames_path``
is a directory unless the adapter says it cannot check (``check_frames_path``). The adapters
themselves are in the sibling modules; :mod:`framepipe.processors.adapters` exports them all.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from framepipe.backoff import Backoff
from framepipe.errors import ModelError, ModelOutputError, ModelTimeoutError

if TYPE_CHECKING:
    from framepipe.jobs.context import StepContext

__all__ = [
    "IMAGE_SUFFIXES",
    "ModelAdapter",
    "ModelResult",
    "PathLike",
    "ProgressCallback",
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
        """The image files in :attr:`frames_path`, in playing order
        (:func:`~framepipe.media.frames.frame_order`: ``frame_10000`` after ``frame_9999``)."""
        from framepipe.media.frames import frame_order  # OpenCV and NumPy: on first use

        return sorted(
            (
                p
                for p in self.frames_path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            ),
            key=frame_order,
        )


def as_step_progress(
    ctx: StepContext, lo: float = 0.0, hi: float = 100.0, message: str | None = None
) -> ProgressCallback:
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

    def __init__(
        self,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_retries: int = 2,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {max_retries}")
        if name:
            self.name = name
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = Backoff(
            initial=retry_initial, factor=2.0, maximum=max(retry_max, retry_initial)
        )
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

    async def infer(
        self,
        input_path: PathLike,
        *,
        prompt: str = "",
        style: str = "default",
        seed: int = 0,
        output_dir: PathLike,
        progress: ProgressCallback | None = None,
        **options: Any,
    ) -> ModelResult:
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
                    async with asyncio.timeout(self.timeout) as deadline:
                        result = await self._infer_once(
                            Path(input_path),
                            prompt=prompt,
                            style=style,
                            seed=seed,
                            output_dir=out,
                            progress=report,
                            options=options,
                        )
                except TimeoutError as exc:
                    if isinstance(exc, ModelError):
                        raise
                    why = (
                        f"no result within {self.timeout:g}s"
                        if deadline.expired() and self.timeout is not None
                        else f"timed out inside the model ({exc or type(exc).__name__})"
                    )
                    raise ModelTimeoutError(
                        f"{self.describe()}: {why}", model=self.describe(), retryable=True
                    ) from exc
                return self._checked(result)
            except ModelError as exc:
                if not exc.retryable or attempt == attempts:
                    if attempt > 1:
                        raise _after_retries(exc, attempt) from exc
                    raise
                delay = self.backoff.delay(attempt)
                log.warning(
                    "%s: attempt %d of %d failed (%s); retrying in %.2fs",
                    self.describe(),
                    attempt,
                    attempts,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

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
        """One attempt. Raise :class:`ModelError` with ``retryable`` set as appropriate."""
        raise NotImplementedError

    def frames_path_problem(self, frames_path: Path) -> str | None:
        """Why this process cannot read the frames at ``frames_path``, or None when it is a
        directory here. The check of ``check_frames_path``; a caller that reads the frames of
        an adapter that does not check (``check_frames_path`` false) asks it itself."""
        if frames_path.is_dir():
            return None
        what = "is not a directory" if frames_path.exists() else "does not exist"
        return f"{self.describe()}: frames_path {frames_path} {what}"

    def _checked(self, result: ModelResult) -> ModelResult:
        if self.check_frames_path and (problem := self.frames_path_problem(result.frames_path)):
            raise ModelOutputError(problem, model=self.describe())
        return result


def _after_retries(exc: ModelError, attempts: int) -> ModelError:
    """``exc`` restated as the final failure after ``attempts`` attempts (same class)."""
    return type(exc)(
        f"failed after {attempts} attempts; last error: {exc}",
        model=exc.model,
        retryable=exc.retryable,
        exit_code=exc.exit_code,
        stderr_tail=exc.stderr_tail,
        status_code=exc.status_code,
    )
