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

Loading the session is in :mod:`~framepipe.processors.adapters.onnx_session`, checking the
inputs and running them in :mod:`~framepipe.processors.adapters.onnx_inference`; this module
holds the model's calls, its hooks and its batching.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from framepipe.errors import ModelError
from framepipe.processors.adapters.base import ModelResult
from framepipe.processors.adapters.batching import Batcher
from framepipe.processors.adapters.onnx_inference import (
    InferenceStats,
    conform,
    run_group,
    sample,
    session_run,
    shape_key,
)
from framepipe.processors.adapters.onnx_session import (
    CPU,
    GraphOptimization,
    LoadedModel,
    Provider,
    Sample,
    load_session,
    onnxruntime,
)
from framepipe.processors.adapters.python import PythonModel
from framepipe.processors.adapters.tensors import (
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

DEFAULT_PREPROCESS = ImageToTensor()
"""Pixels in 0-1, BGR, channels first, at the image's own size."""


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
        onnxruntime()  # a missing onnxruntime is said when the model is made, not at a frame
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
        self._loaded: LoadedModel | None = None

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
                    group_key=shape_key,
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

    def _state(self) -> LoadedModel:
        loaded = self._loaded
        if loaded is None:
            self.setup()
            loaded = self._loaded
            assert loaded is not None
        return loaded

    def _load(self) -> LoadedModel:
        return load_session(
            self.path,
            self.describe(),
            providers=self.requested_providers,
            intra_op_threads=self.intra_op_threads,
            inter_op_threads=self.inter_op_threads,
            graph_optimization=self.graph_optimization,
            spin=self.spin,
        )

    # -- calls ------------------------------------------------------------------------------

    def on_image(self, image: Any) -> Any:
        """One frame's result: ``postprocess(outputs, image)``; batched with other callers'
        frames when :attr:`batching`. Called from the live stage's worker threads."""
        loaded = self._state()
        one = self._sample(loaded, self._hook("preprocess", self.preprocess, image))
        outputs: Outputs | None = None
        while outputs is None:
            if loaded.batcher is None:
                outputs = self._run_group(loaded, [one])[0]
            else:
                outputs = loaded.batcher.submit(one)
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
        for i, one in enumerate(samples):
            groups.setdefault(shape_key(one), []).append(i)
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
        who = self.describe()
        checked = {s.name: conform(s, feeds[s.name], s.shape, who) for s in loaded.inputs}
        outputs = session_run(loaded, checked, who, self.stats)
        return dict(zip([s.name for s in loaded.outputs], outputs, strict=True))

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

    def _sample(self, loaded: LoadedModel, value: Any) -> Sample:
        """``preprocess``'s answer as one checked sample (input name -> array)."""
        return sample(loaded, value, self.describe())

    def _run_group(self, loaded: LoadedModel, samples: list[Sample]) -> list[Outputs]:
        """Run samples of one shape as one batch (one sample when there is no batch axis)."""
        return run_group(loaded, samples, self.describe(), self.stats)
