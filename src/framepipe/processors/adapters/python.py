"""In-process models: :class:`PythonModel`, a callable or class loaded once and run in a thread,
and :class:`ModelProcessor`, the live-stage processor that runs one on each frame.

Guarantees: the model is instantiated and loaded once per :meth:`PythonModel.setup` (under a
lock, so concurrent callers share one instance) and released by ``teardown``; an exception
raised while it is made or loaded is a :class:`~framepipe.errors.ModelError` naming the model
(not retryable: the next call loads it again); an exception of the model's call becomes a
retryable :class:`~framepipe.errors.ModelError` (one that already is a ``ModelError`` passes as
it is, and so does one the progress callback raised, a cancelled step, which is not retried);
once the awaiting task is cancelled or times out, the model's next progress report raises
:class:`asyncio.CancelledError`.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from framepipe.errors import ModelError, ModelOutputError
from framepipe.frames import Frame, Image
from framepipe.processors.adapters.base import ModelAdapter, ModelResult
from framepipe.processors.base import Processor

__all__ = ["ModelProcessor", "PythonModel"]


def _as_result(value: Any, who: str) -> ModelResult:
    """A model's return value as a :class:`ModelResult` (a result, a path, or a dict)."""
    if isinstance(value, ModelResult):
        return value
    if isinstance(value, str | os.PathLike):
        return ModelResult(Path(value))
    if isinstance(value, Mapping) and isinstance(value.get("frames_path"), str | os.PathLike):
        extra = {k: v for k, v in value.items() if k != "frames_path"}
        return ModelResult(Path(value["frames_path"]), extra)
    raise ModelOutputError(
        f"{who} returned {type(value).__name__}, not a frames path, a dict "
        "with 'frames_path' or a ModelResult",
        model=who,
    )


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

    def __init__(
        self,
        model: Any,
        *,
        name: str | None = None,
        timeout: float | None = None,
        max_retries: int = 0,
        retry_initial: float = 1.0,
        retry_max: float = 30.0,
    ) -> None:
        if not callable(model) and not hasattr(model, "infer"):
            raise TypeError(f"{model!r} is neither callable nor has an infer() method")
        super().__init__(
            name=name,
            timeout=timeout,
            max_retries=max_retries,
            retry_initial=retry_initial,
            retry_max=retry_max,
        )
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
            model = self.factory
            if isinstance(self.factory, type):
                try:
                    model = self.factory()
                    for hook in ("load", "setup"):
                        method = getattr(model, hook, None)
                        if callable(method):
                            method()
                            break
                except ModelError:
                    raise
                except Exception as exc:
                    raise ModelError(
                        f"{self.describe()}: loading the model failed: {type(exc).__name__}: {exc}",
                        model=self.describe(),
                    ) from exc
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
            return fn(
                input_path,
                prompt=prompt,
                style=style,
                seed=seed,
                output_dir=output_dir,
                progress=report,
                **options,
            )

        async def attempt() -> Any:
            value = await asyncio.to_thread(call)
            if inspect.isawaitable(value):  # an async model: its errors are wrapped alike
                value = await value
            return value

        try:
            value = await attempt()
        except asyncio.CancelledError:
            stop.set()
            raise
        except ModelError:
            raise
        except Exception as exc:
            if any(exc is r for r in raised):  # e.g. the step is cancelled: do not retry
                raise
            raise ModelError(
                f"{self.describe()} raised {type(exc).__name__}: {exc}",
                model=self.describe(),
                retryable=True,
            ) from exc
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
                "a PythonModel"
            )
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
            return frame.with_image(out)
        frame.meta[self.label] = out
        return frame
