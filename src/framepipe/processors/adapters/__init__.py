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
- :class:`OnnxModel`: an ONNX model on ONNX Runtime (``framepipe[onnx]``), in process: its
  call is ``predict(images)`` (frames batched up to a size or a deadline when the model's
  batch axis is dynamic), a live stage through :class:`ModelProcessor`; the file-based
  ``infer`` is refused with a pointer to ``predict``.

An adapter is not a :class:`~framepipe.processors.Processor`: most models work on files (a
video in, a directory of frames out), not on live frames. An in-process model also runs on live
frames through :class:`ModelProcessor`, a processor made for that::

    Stage(ModelProcessor(PythonModel(Detector)), workers=2)

Which adapter the ready ML video pipeline builds, and with which retries, is that pipeline's
setting (:class:`framepipe.pipelines.ml_settings.MlVideoSettings`); the adapters read no
settings.

One module per place a model runs, all exported here: ``base`` (the contract, the retry and
timeout policy, :class:`ModelResult`, progress), ``python`` (:class:`PythonModel`,
:class:`ModelProcessor`), ``subprocess`` (:class:`SubprocessModel`), ``http``
(:class:`HttpModel`), ``mock`` (:class:`MockModel`) and ``onnx`` (:class:`OnnxModel`).
"""

from __future__ import annotations

from framepipe.processors.adapters.base import (
    ModelAdapter,
    ModelResult,
    ProgressCallback,
    as_step_progress,
)
from framepipe.processors.adapters.http import HttpModel
from framepipe.processors.adapters.mock import MockModel
from framepipe.processors.adapters.onnx import OnnxModel
from framepipe.processors.adapters.python import ModelProcessor, PythonModel
from framepipe.processors.adapters.subprocess import SubprocessModel

__all__ = [
    "HttpModel",
    "MockModel",
    "ModelAdapter",
    "ModelProcessor",
    "ModelResult",
    "OnnxModel",
    "ProgressCallback",
    "PythonModel",
    "SubprocessModel",
    "as_step_progress",
]
