"""Loading an ONNX model into an ONNX Runtime session: :func:`load_session` and what it read.

Guarantees:

- ONNX Runtime is imported only when asked for (:func:`onnxruntime`); without it, a
  :class:`~framepipe.errors.MissingDependencyError` giving the pip command.
- A path that does not exist, is not a file or is not an ONNX model is a
  :class:`~framepipe.errors.ModelError` (not retryable) naming the model and what is wrong
  (ONNX Runtime's own error's first line); nothing is left loaded.
- The session's options are the ones given: threads (None: ONNX Runtime's default), the
  graph optimization level, and spinning of idle threads (off unless asked for).
- Execution providers are tried in the order given, CPU always last: a provider this ONNX
  Runtime does not have is logged (on ``framepipe.models``) and skipped, never an error.
- Input and output names, shapes and types are read from the model (:class:`LoadedModel`):
  it has a batch axis when every input's first dimension is dynamic or 1, and is batchable
  when every input's first dimension is dynamic.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from framepipe.errors import MissingDependencyError, ModelError
from framepipe.processors.adapters.batching import Batcher
from framepipe.processors.adapters.tensors import Array, Outputs, TensorSpec

__all__ = [
    "CPU",
    "GraphOptimization",
    "LoadedModel",
    "Provider",
    "Sample",
    "first_line",
    "load_session",
    "onnxruntime",
]

log = logging.getLogger("framepipe.models")

Sample = dict[str, Array]
"""One frame's checked input: input name -> array (without the batch axis)."""
GraphOptimization = Literal["disable", "basic", "extended", "all"]
Provider = str | tuple[str, Mapping[str, Any]]

CPU = "CPUExecutionProvider"


def onnxruntime() -> Any:
    """The ``onnxruntime`` module, or a MissingDependencyError saying how to install it."""
    try:
        import onnxruntime  # type: ignore[import-untyped]
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "OnnxModel") from exc
    return onnxruntime


@dataclass
class LoadedModel:
    """A loaded session and what was read from it."""

    session: Any
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    providers: tuple[str, ...]
    has_batch_axis: bool
    batchable: bool
    batcher: Batcher[Sample, Outputs] | None = None


def load_session(
    path: Path,
    who: str,
    *,
    providers: Sequence[Provider],
    intra_op_threads: int | None,
    inter_op_threads: int | None,
    graph_optimization: GraphOptimization,
    spin: bool,
) -> LoadedModel:
    """The model at ``path`` (``who``: the model, as errors and logs name it) in a session
    with these options (see the module)."""
    ort = onnxruntime()
    if not path.exists():
        raise ModelError(f"{who}: no such file", model=who)
    if not path.is_file():
        raise ModelError(f"{who}: not a file", model=who)
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    if inter_op_threads is not None:
        options.inter_op_num_threads = inter_op_threads
    for pool in ("intra_op", "inter_op"):
        options.add_session_config_entry(f"session.{pool}.allow_spinning", str(int(spin)))
    level = ort.GraphOptimizationLevel
    options.graph_optimization_level = {
        "disable": level.ORT_DISABLE_ALL,
        "basic": level.ORT_ENABLE_BASIC,
        "extended": level.ORT_ENABLE_EXTENDED,
        "all": level.ORT_ENABLE_ALL,
    }[graph_optimization]
    try:
        session = ort.InferenceSession(
            str(path), sess_options=options, providers=choose_providers(ort, providers, who)
        )
    except Exception as exc:
        raise ModelError(
            f"{who}: cannot load the model (not a valid ONNX file?): {first_line(exc)}",
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
    return LoadedModel(session, inputs, outputs, used, has_batch_axis, batchable)


def choose_providers(ort: Any, requested: Sequence[Provider], who: str) -> list[Provider]:
    """The requested providers this ONNX Runtime has, in order, then CPU unless given."""
    available = set(ort.get_available_providers())
    chosen: list[Provider] = []
    for provider in requested:
        name = provider if isinstance(provider, str) else provider[0]
        if name in available:
            chosen.append(provider if isinstance(provider, str) else (name, dict(provider[1])))
        else:
            log.warning(
                "%s: execution provider %s is not available in this onnxruntime "
                "(available: %s); skipped",
                who,
                name,
                ", ".join(sorted(available)),
            )
    if not any((p if isinstance(p, str) else p[0]) == CPU for p in chosen):
        chosen.append(CPU)
    return chosen


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
