"""Inference on a loaded ONNX model: checked samples in, one run per batch, each frame's
outputs out, counted (:class:`InferenceStats`).

Guarantees:

- Each input is checked before anything runs (:func:`sample`, :func:`conform`): the names
  must be the model's, a wrong rank or a wrong fixed dimension or a type it cannot be
  converted to without loss is a :class:`~framepipe.errors.ModelError` naming the model, the
  input and both shapes. Dynamic dimensions take any size; integers convert to floats.
- A sample is one frame's input without the batch axis (a preprocess that added it has it
  taken off); a model without a batch axis takes its arrays exactly as they are.
- :func:`run_group` runs samples of one shape (:func:`shape_key`) as one inference and gives
  each its own outputs, batch axis removed; an output whose first axis is not the batch is a
  :class:`~framepipe.errors.ModelOutputError`.
- A failed inference is a :class:`~framepipe.errors.ModelError` naming the model and the
  input shapes; only inferences that ran are counted, with their frames.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from framepipe.errors import ModelError, ModelOutputError
from framepipe.processors.adapters.onnx_session import LoadedModel, Sample, first_line
from framepipe.processors.adapters.tensors import Array, Outputs, TensorSpec

__all__ = ["InferenceStats", "conform", "run_group", "sample", "session_run", "shape_key"]


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


def sample(loaded: LoadedModel, value: Any, who: str) -> Sample:
    """``preprocess``'s answer as one checked sample (input name -> array)."""
    if isinstance(value, Mapping):
        given = dict(value)
    elif len(loaded.inputs) == 1:
        given = {loaded.inputs[0].name: value}
    else:
        raise ModelError(
            f"{who}: the model has inputs "
            f"{', '.join(repr(s.name) for s in loaded.inputs)}: preprocess must return a "
            f"dict of them, not {type(value).__name__}",
            model=who,
        )
    names = [s.name for s in loaded.inputs]
    if set(given) != set(names):
        raise ModelError(
            f"{who}: preprocess gave inputs {sorted(given)}; the model's inputs are "
            f"{sorted(names)}",
            model=who,
        )
    checked: Sample = {}
    for spec in loaded.inputs:
        array = np.asarray(given[spec.name])
        if not loaded.has_batch_axis:
            checked[spec.name] = conform(spec, array, spec.shape, who)
            continue
        if array.ndim == len(spec.shape) and array.shape[:1] == (1,):
            array = array[0]  # a preprocess that added the batch axis itself
        checked[spec.name] = conform(spec, array, spec.shape[1:], who, per_sample=True)
    return checked


def conform(
    spec: TensorSpec,
    value: Any,
    shape: Sequence[int | str],
    who: str,
    *,
    per_sample: bool = False,
) -> Array:
    """``value`` converted to the input's type and checked against ``shape``."""
    array: Array = np.asarray(value)
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


def run_group(
    loaded: LoadedModel, samples: list[Sample], who: str, stats: InferenceStats
) -> list[Outputs]:
    """Run samples of one shape as one batch (one sample when there is no batch axis)."""
    if not loaded.has_batch_axis:
        (only,) = samples
        names = [s.name for s in loaded.outputs]
        return [dict(zip(names, session_run(loaded, only, who, stats), strict=True))]
    n = len(samples)
    feeds = {
        s.name: np.stack([x[s.name] for x in samples]) if n > 1 else samples[0][s.name][None]
        for s in loaded.inputs
    }
    raw = session_run(loaded, feeds, who, stats, n)
    per: list[Outputs] = [{} for _ in range(n)]
    for spec, array in zip(loaded.outputs, raw, strict=True):
        if array.ndim == 0 or array.shape[0] != n:
            raise ModelOutputError(
                f"{who}: output {spec.name!r} has shape {tuple(array.shape)} for a batch of "
                f"{n}: its first axis is not the batch axis",
                model=who,
            )
        for i in range(n):
            per[i][spec.name] = array[i]
    return per


def session_run(
    loaded: LoadedModel,
    feeds: Mapping[str, Array],
    who: str,
    stats: InferenceStats,
    frames: int = 1,
) -> list[Array]:
    """One inference of ``frames`` samples: the outputs in the model's order."""
    try:
        outputs: list[Array] = loaded.session.run(None, dict(feeds))
        stats.record(frames)
    except Exception as exc:
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in feeds.items())
        raise ModelError(
            f"{who}: inference failed for input {shapes}: {first_line(exc)}",
            model=who,
        ) from exc
    return outputs


def shape_key(sample: Sample) -> tuple[Any, ...]:
    """What samples must share to be stacked into one batch: names, shapes and types."""
    return tuple((name, a.shape, a.dtype.str) for name, a in sorted(sample.items()))
