"""ONNX models on ONNX Runtime: :class:`OnnxModel`, in process, on live frames and in job steps.

Guarantees:

- The model is loaded once per :meth:`OnnxModel.setup` (under a lock; concurrent callers share
  one session) and released by ``teardown``; a later call loads it again.
- Execution providers are tried in the order given, CPU always last: a provider this
  ONNX Runtime does not have is logged and skipped, never an error.
- Input and output names, shapes and types are read from the model. Each input is checked
  against them before anything runs: a wrong rank, a wrong fixed dimension or an impossible
  type is a :class:`~framepipe.errors.ModelError` naming the model, the input and both shapes.
  Dynamic dimensions take any size.
- Frames are batched only when every input's first axis is dynamic (the batch axis). In a live
  stage, frames arriving from the stage's workers are gathered up to ``batch_size`` or
  ``max_wait_ms`` after the first one, whichever comes first, run as one inference, and each
  caller gets its own frame's result. Frames whose shapes differ are never stacked together.
  A batch that fails is run again frame by frame, so one bad frame fails only itself.
- A bad path, a file that is not an ONNX model, a failed inference, a hook that raised: a
  :class:`~framepipe.errors.ModelError` (not retryable) naming the model and what is wrong
  (the hook's own exception is its ``__cause__``).
- Without ``onnxruntime``: a :class:`~framepipe.errors.MissingDependencyError` giving the pip
  command, when the model is made.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from framepipe.errors import MissingDependencyError, ModelError, ModelOutputError
from framepipe.processors.adapters.base import ModelResult
from framepipe.processors.adapters.batching import Batcher
from framepipe.processors.adapters.python import PythonModel
from framepipe.processors.adapters.tensors import (
    Array,
    ImageToTensor,
    Outputs,
    TensorSpec,
    outputs_by_name,
)

__all__ = [
    "GraphOptimization",
    "ImageToTensor",
    "InferenceStats",
    "OnnxModel",
    "Outputs",
    "TensorSpec",
    "outputs_by_name",
]

log = logging.getLogger("framepipe.models")

Sample = dict[str, Array]
GraphOptimization = Literal["disable", "basic", "extended", "all"]
Provider = str | tuple[str, Mapping[str, Any]]

CPU = "CPUExecutionProvider"
DEFAULT_PREPROCESS = ImageToTensor()
"""Pixels in 0-1, BGR, channels first, at the image's own size."""


def _ort() -> Any:
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "OnnxModel") from exc
    return onnxruntime


class InferenceStats:
    """Counts of what a model ran since it was made: ``runs`` (inferences) and ``frames``
    (samples in them); ``mean_batch`` is their ratio. Updated from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.runs = 0
        self.frames = 0

    def record(self, frames: int) -> None:
        """Count one inference of ``frames`` samples."""
        with self._lock:
            self.runs += 1
            self.frames += frames

    @property
    def mean_batch(self) -> float:
        """Samples per inference (0 before the first)."""
        with self._lock:
            return self.frames / self.runs if self.runs else 0.0


@dataclass
class _Loaded:
    """What :meth:`OnnxModel.setup` loaded: the session and what was read from it."""

    session: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    providers: tuple[str, ...]
    has_batch_axis: bool
    batchable: bool
    batcher: Batcher[Sample, Outputs] | None = None


class OnnxModel(PythonModel):
    """An ONNX model run by ONNX Runtime, in process.

    ``path`` is the ``.onnx`` file. Session options: ``intra_op_threads`` and
    ``inter_op_threads`` (None: ONNX Runtime's default, about one per core),
    ``graph_optimization`` (``"disable"``, ``"basic"``, ``"extended"``, ``"all"``), ``spin``
    (default False: ONNX Runtime's idle threads sleep instead of spinning for the next run,
    which on a machine shared with decoders and other stages takes CPU from them; True for a
    machine given to the model alone). ``providers``: execution providers in order of
    preference, names or ``(name, options)``; one this ONNX Runtime lacks is logged and
    skipped, and CPU is always the last resort.

    The hooks: ``preprocess(frame) -> array`` makes one frame's input without the batch axis
    (a dict name -> array for a model with several inputs; default :class:`ImageToTensor`);
    ``postprocess(outputs, frame) -> Any`` turns that frame's outputs (name -> array, batch axis
    removed) into its result (default :func:`outputs_by_name`: the dict itself). A model has
    a batch axis when every input's first dimension is dynamic or 1; one without takes
    ``preprocess``'s arrays and gives its outputs exactly as they are.

    Where it runs:

    - a live stage: ``Stage(ModelProcessor(OnnxModel(...)), workers=8)``; each frame's result
      goes to ``frame.meta[name]`` (the processor's name; an array result replaces the image
      instead, None drops the frame). With ``batch_size`` > 1 and a dynamic batch axis, frames
      from the stage's workers are batched (see the module); give the stage at least
      ``batch_size`` workers, or every batch waits the whole ``max_wait_ms``.
    - a job step: ``results = model.predict(images)`` (sync steps run in a thread) or
      ``await model.predict_async(images)``, one result per image, in batches of ``batch_size``.
    - :meth:`run`: raw feeds in, raw outputs out, no hooks.

    ``stats`` (:class:`InferenceStats`) counts inferences and frames: the mean batch size.
    Every method is thread-safe. Unlike the file-based adapters, ``await model.infer(path, ...)``
    is refused with a :class:`~framepipe.errors.ModelError` saying to call :meth:`predict`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        providers: Sequence[Provider] = (CPU,),
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        graph_optimization: GraphOptimization = "all",
        spin: bool = False,
        batch_size: int = 1,
        max_wait_ms: float = 5.0,
        preprocess: Callable[[Any], Any] = DEFAULT_PREPROCESS,
        postprocess: Callable[[Outputs, Any], Any] = outputs_by_name,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, not {max_wait_ms}")
        for label, threads in (
            ("intra_op_threads", intra_op_threads),
            ("inter_op_threads", inter_op_threads),
        ):
            if threads is not None and threads < 0:
                raise ValueError(f"{label} must be >= 0 (0: ONNX Runtime's default), not {threads}")
        if graph_optimization not in ("disable", "basic", "extended", "all"):
            raise ValueError(
                "graph_optimization must be 'disable', 'basic', 'extended' or 'all', "
                f"not {graph_optimization!r}"
            )
        _ort()  # a missing onnxruntime is said when the model is made, not at the first frame
        super().__init__(self.predict, name=name)
        self.path = Path(path)
        self.requested_providers = tuple(providers)
        self.intra_op_threads = intra_op_threads
        self.inter_op_threads = inter_op_threads
        self.graph_optimization = graph_optimization
        self.spin = spin
        self.batch_size = batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.preprocess = preprocess
        self.postprocess = postprocess
        self.stats = InferenceStats()
        self._loaded: _Loaded | None = None

    @property
    def target(self) -> str:
        return str(self.path)

    # -- what was read from the model -------------------------------------------------------

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        """The model's inputs (loads the model if needed)."""
        return self._state().inputs

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        """The model's outputs (loads the model if needed)."""
        return self._state().outputs

    @property
    def providers(self) -> tuple[str, ...]:
        """The execution providers the session uses, in order (loads the model if needed)."""
        return self._state().providers

    @property
    def batching(self) -> bool:
        """Whether frames are run in batches: ``batch_size`` > 1 and a dynamic batch axis."""
        return self._state().batchable and self.batch_size > 1

    # -- lifecycle --------------------------------------------------------------------------

    def setup(self) -> None:
        with self._lock:
            if self._loaded is not None:
                return
            loaded = self._load()
            if loaded.batchable and self.batch_size > 1:
                loaded.batcher = Batcher(
                    functools.partial(self._run_group, loaded),
                    size=self.batch_size,
                    max_wait=self.max_wait,
                    group_key=_shape_key,
                    name=f"onnx-batcher-{self.label}",
                )
            elif self.batch_size > 1:
                log.info(
                    "%s: the batch axis is not dynamic; frames run one by one", self.describe()
                )
            self._loaded = loaded
            self.model = loaded.session

    def teardown(self) -> None:
        with self._lock:
            loaded, self._loaded = self._loaded, None
            self.model = None
            self._ready = False
        if loaded is not None and loaded.batcher is not None:
            loaded.batcher.close()

    def _state(self) -> _Loaded:
        loaded = self._loaded
        if loaded is None:
            self.setup()
            loaded = self._loaded
            assert loaded is not None
        return loaded

    def _load(self) -> _Loaded:
        ort = _ort()
        who = self.describe()
        if not self.path.exists():
            raise ModelError(f"{who}: no such file", model=who)
        if not self.path.is_file():
            raise ModelError(f"{who}: not a file", model=who)
        options = ort.SessionOptions()
        if self.intra_op_threads is not None:
            options.intra_op_num_threads = self.intra_op_threads
        if self.inter_op_threads is not None:
            options.inter_op_num_threads = self.inter_op_threads
        for pool in ("intra_op", "inter_op"):
            options.add_session_config_entry(f"session.{pool}.allow_spinning", str(int(self.spin)))
        level = ort.GraphOptimizationLevel
        options.graph_optimization_level = {
            "disable": level.ORT_DISABLE_ALL,
            "basic": level.ORT_ENABLE_BASIC,
            "extended": level.ORT_ENABLE_EXTENDED,
            "all": level.ORT_ENABLE_ALL,
        }[self.graph_optimization]
        try:
            session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=self._providers(ort)
            )
        except Exception as exc:
            raise ModelError(
                f"{who}: cannot load the model (not a valid ONNX file?): {_first_line(exc)}",
                model=who,
            ) from exc
        inputs = tuple(TensorSpec.of(a) for a in session.get_inputs())
        outputs = tuple(TensorSpec.of(a) for a in session.get_outputs())
        has_batch_axis = bool(inputs) and all(
            s.shape and (s.batch_dynamic or s.shape[0] == 1) for s in inputs
        )
        batchable = has_batch_axis and all(s.batch_dynamic for s in inputs)
        used = tuple(session.get_providers())
        log.info(
            "%s loaded: inputs %s, outputs %s, providers %s",
            who,
            ", ".join(f"{s.name}{s.text(s.shape)}" for s in inputs),
            ", ".join(f"{s.name}{s.text(s.shape)}" for s in outputs),
            ", ".join(used),
        )
        return _Loaded(session, inputs, outputs, used, has_batch_axis, batchable)

    def _providers(self, ort: Any) -> list[Provider]:
        available = set(ort.get_available_providers())
        chosen: list[Provider] = []
        for provider in self.requested_providers:
            name = provider if isinstance(provider, str) else provider[0]
            if name in available:
                chosen.append(provider if isinstance(provider, str) else (name, dict(provider[1])))
            else:
                log.warning(
                    "%s: execution provider %s is not available in this onnxruntime "
                    "(available: %s); skipped",
                    self.describe(),
                    name,
                    ", ".join(sorted(available)),
                )
        if not any((p if isinstance(p, str) else p[0]) == CPU for p in chosen):
            chosen.append(CPU)
        return chosen

    # -- calls ------------------------------------------------------------------------------

    def on_image(self, image: Any) -> Any:
        """One frame's result: ``postprocess(outputs, image)``; batched with other callers'
        frames when :attr:`batching`. Called from the live stage's worker threads."""
        loaded = self._state()
        sample = self._sample(loaded, self._hook("preprocess", self.preprocess, image))
        outputs: Outputs | None = None
        while outputs is None:
            if loaded.batcher is None:
                outputs = self._run_group(loaded, [sample])[0]
            else:
                outputs = loaded.batcher.submit(sample)
                if outputs is None:  # torn down meanwhile (a pipeline sharing it ended):
                    loaded = self._state()  # loaded again, as by any call after teardown
        return self._hook("postprocess", self.postprocess, outputs, image)

    def predict(self, items: Sequence[Any]) -> list[Any]:
        """One result per item (``postprocess(outputs, item)``), in order. Items of the same
        shape run in batches of up to ``batch_size`` when the batch axis is dynamic."""
        loaded = self._state()
        samples = [
            self._sample(loaded, self._hook("preprocess", self.preprocess, item)) for item in items
        ]
        results: list[Outputs | None] = [None] * len(samples)
        size = self.batch_size if loaded.batchable else 1
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(_shape_key(sample), []).append(i)
        for indices in groups.values():
            for start in range(0, len(indices), size):
                chunk = indices[start : start + size]
                outs = self._run_group(loaded, [samples[i] for i in chunk])
                for i, out in zip(chunk, outs, strict=True):
                    results[i] = out
        done = [out for out in results if out is not None]
        assert len(done) == len(items)
        return [
            self._hook("postprocess", self.postprocess, out, item)
            for out, item in zip(done, items, strict=True)
        ]

    async def predict_async(self, items: Sequence[Any]) -> list[Any]:
        """:meth:`predict` in a thread, for ``async`` job steps."""
        return await asyncio.to_thread(self.predict, items)

    def run(self, feeds: Mapping[str, Any]) -> Outputs:
        """One raw inference: ``feeds`` (input name -> array, batch axis included) in, output
        name -> array out; no hooks, no batching, the same checks of names and shapes."""
        loaded = self._state()
        names = {s.name for s in loaded.inputs}
        if set(feeds) != names:
            raise ModelError(
                f"{self.describe()}: feeds name inputs {sorted(feeds)}; the model's inputs "
                f"are {sorted(names)}",
                model=self.describe(),
            )
        checked = {s.name: self._conform(s, feeds[s.name], s.shape) for s in loaded.inputs}
        return dict(
            zip([s.name for s in loaded.outputs], self._session_run(loaded, checked), strict=True)
        )

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
        raise ModelError(
            f"{self.describe()} works on images, not files: call model.predict(images) in a "
            "job step (await model.predict_async(images) in an async one)",
            model=self.describe(),
        )

    # -- the parts --------------------------------------------------------------------------

    def _hook(self, which: str, hook: Callable[..., Any], *args: Any) -> Any:
        """A hook's answer; its exception becomes a ModelError naming the model and hook."""
        try:
            return hook(*args)
        except ModelError:
            raise
        except Exception as exc:
            item = args[-1]
            what = f" for an array of shape {item.shape}" if isinstance(item, np.ndarray) else ""
            raise ModelError(
                f"{self.describe()}: {which}{what} raised {type(exc).__name__}: {exc}",
                model=self.describe(),
            ) from exc

    def _sample(self, loaded: _Loaded, value: Any) -> Sample:
        """``preprocess``'s answer as one checked sample (input name -> array)."""
        if isinstance(value, Mapping):
            given = dict(value)
        elif len(loaded.inputs) == 1:
            given = {loaded.inputs[0].name: value}
        else:
            raise ModelError(
                f"{self.describe()}: the model has inputs "
                f"{', '.join(repr(s.name) for s in loaded.inputs)}: preprocess must return a "
                f"dict of them, not {type(value).__name__}",
                model=self.describe(),
            )
        names = [s.name for s in loaded.inputs]
        if set(given) != set(names):
            raise ModelError(
                f"{self.describe()}: preprocess gave inputs {sorted(given)}; the model's "
                f"inputs are {sorted(names)}",
                model=self.describe(),
            )
        sample: Sample = {}
        for spec in loaded.inputs:
            array = np.asarray(given[spec.name])
            if not loaded.has_batch_axis:
                sample[spec.name] = self._conform(spec, array, spec.shape)
                continue
            if array.ndim == len(spec.shape) and array.shape[:1] == (1,):
                array = array[0]  # a preprocess that added the batch axis itself
            sample[spec.name] = self._conform(spec, array, spec.shape[1:], per_sample=True)
        return sample

    def _conform(
        self, spec: TensorSpec, value: Any, shape: Sequence[int | str], *, per_sample: bool = False
    ) -> Array:
        """``value`` converted to the input's type and checked against ``shape``."""
        array: Array = np.asarray(value)
        who = self.describe()
        what = "one frame of" if per_sample else "arrays of"
        wanted = spec.text(shape) + (" (the batch axis is added)" if per_sample else "")
        if array.ndim != len(shape):
            raise ModelError(
                f"{who}: input {spec.name!r} takes {what} shape {wanted}, got an array of "
                f"shape {tuple(array.shape)}",
                model=who,
            )
        for axis, (want, got) in enumerate(zip(shape, array.shape, strict=True)):
            if isinstance(want, int) and want != got:
                raise ModelError(
                    f"{who}: input {spec.name!r} takes {what} shape {wanted}, got "
                    f"{tuple(array.shape)}: axis {axis} must be {want}, not {got}",
                    model=who,
                )
        dtype = spec.dtype
        if dtype is not None and array.dtype != dtype:
            if not (
                np.can_cast(array.dtype, dtype, "same_kind")
                or (array.dtype.kind in "biu" and dtype.kind == "f")
            ):
                raise ModelError(
                    f"{who}: input {spec.name!r} is {spec.type}; an array of {array.dtype} "
                    "cannot be converted to it without loss",
                    model=who,
                )
            array = array.astype(dtype)
        return array

    def _run_group(self, loaded: _Loaded, samples: list[Sample]) -> list[Outputs]:
        """Run samples of one shape as one batch (one sample when there is no batch axis)."""
        if not loaded.has_batch_axis:
            (sample,) = samples
            names = [s.name for s in loaded.outputs]
            return [dict(zip(names, self._session_run(loaded, sample), strict=True))]
        n = len(samples)
        feeds = {
            s.name: np.stack([x[s.name] for x in samples]) if n > 1 else samples[0][s.name][None]
            for s in loaded.inputs
        }
        raw = self._session_run(loaded, feeds, n)
        per: list[Outputs] = [{} for _ in range(n)]
        for spec, array in zip(loaded.outputs, raw, strict=True):
            if array.ndim == 0 or array.shape[0] != n:
                raise ModelOutputError(
                    f"{self.describe()}: output {spec.name!r} has shape {tuple(array.shape)} "
                    f"for a batch of {n}: its first axis is not the batch axis",
                    model=self.describe(),
                )
            for i in range(n):
                per[i][spec.name] = array[i]
        return per

    def _session_run(
        self, loaded: _Loaded, feeds: Mapping[str, Array], frames: int = 1
    ) -> list[Array]:
        try:
            outputs: list[Array] = loaded.session.run(None, dict(feeds))
            self.stats.record(frames)
        except Exception as exc:
            shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in feeds.items())
            raise ModelError(
                f"{self.describe()}: inference failed for input {shapes}: {_first_line(exc)}",
                model=self.describe(),
            ) from exc
        return outputs


def _shape_key(sample: Sample) -> tuple[Any, ...]:
    return tuple((name, a.shape, a.dtype.str) for name, a in sorted(sample.items()))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
