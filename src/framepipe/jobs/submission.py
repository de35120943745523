"""What a submit stores: the checked inputs of a new execution, and its first rows.

Plain functions :class:`~framepipe.jobs.engine.JobEngine.submit` calls, the same in both
modes for the inputs. Guarantees:

* :func:`checked_inputs` refuses before anything is created, in this order: inputs that are
  not storable JSON within ``max_inputs_bytes`` (:class:`InputTooLargeError`), inputs the
  pipeline's declared model refuses (:class:`InvalidInputError` naming the field, or
  :class:`PathNotAllowedError` for a local path outside ``input_roots``), what the
  pipeline's ``on_submit`` returns checked again as storable, and inputs that do not
  serialise canonically (:class:`PipelineDefinitionError`); file system calls and the hook
  run in a thread, off the event loop;
* :func:`new_execution` builds, without touching the store, the running execution of the
  embedded mode owned by the given engine, its initial steps and the batch that commits them
  with its ``execution.created`` and ``execution.started`` events.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from framepipe.backends.objects import ObjectStore
from framepipe.config import Settings
from framepipe.errors import PipelineDefinitionError
from framepipe.events import Event
from framepipe.jobs.batches import Batch
from framepipe.jobs.inputs import recorded_roots
from framepipe.jobs.keys import canonical_json
from framepipe.jobs.memory import ExecState
from framepipe.jobs.models import ExecutionStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.rules import created_data
from framepipe.untrusted import check_json, check_size

__all__ = ["checked_inputs", "new_execution", "storable_inputs"]


def storable_inputs(inputs: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """``inputs`` once checked storable: JSON within ``max_inputs_bytes``."""
    check_json(inputs, "inputs")
    check_size(
        inputs,
        "inputs",
        limit=settings.max_inputs_bytes,
        setting="FRAMEPIPE_MAX_INPUTS_BYTES",
    )
    return inputs


async def checked_inputs(
    pipeline: Pipeline,
    inputs: dict[str, Any],
    *,
    input_roots: Iterable[str | os.PathLike[str]] | None,
    settings: Settings,
    objects: Callable[[], ObjectStore],
) -> tuple[dict[str, Any], list[str] | None]:
    """The inputs to store for an execution of ``pipeline`` and the ``input_roots`` to record
    with it (resolved; None stays None: unrestricted). ``objects`` gives the object store the
    pipeline's ``on_submit`` may pin what the inputs name in; it is called only for that."""
    inputs = storable_inputs(inputs, settings)
    if pipeline.inputs is not None:  # paths are resolved: file system calls
        inputs = await asyncio.to_thread(pipeline.check_inputs, inputs, input_roots=input_roots)
    if pipeline.on_submit is not None:  # pins what the inputs name (Pipeline)
        hook, checked = pipeline.on_submit, inputs
        pinned = await asyncio.to_thread(lambda: hook(checked, objects()))
        inputs = storable_inputs(dict(pinned), settings)
    roots = None if input_roots is None else await asyncio.to_thread(recorded_roots, input_roots)
    try:
        canonical_json(inputs)
    except (TypeError, ValueError) as exc:
        raise PipelineDefinitionError(
            f"inputs are not JSON-serialisable: {exc}", pipeline=pipeline.name
        ) from exc
    return inputs, roots


def new_execution(
    pipeline: Pipeline,
    inputs: dict[str, Any],
    *,
    ref: str | None,
    roots: list[str] | None,
    traceparent: str | None,
    owner: str,
    now: float,
) -> tuple[ExecState, list[dict[str, Any]], Batch]:
    """A new embedded execution of ``pipeline``, running and owned by ``owner`` from ``now``:
    its state, its initial step rows and the batch that stores both with its first events."""
    row = {
        "id": uuid.uuid4().hex,
        "pipeline": pipeline.name,
        "pipeline_ref": ref,
        "status": ExecutionStatus.RUNNING.value,
        "inputs": inputs,
        "input_roots": roots,
        "progress": 0.0,
        "error": None,
        "owner": owner,
        "heartbeat_at": now,
        "cancel_requested": False,
        "runs": 1,
        "created_at": now,
        "started_at": now,
        "finished_at": None,
        "traceparent": traceparent,
    }
    x = ExecState(row, pipeline)
    step_rows = [
        x.new_step_row(step, {}, step.name, [], None, now) for step in pipeline.initial_steps
    ]
    batch = Batch(
        new_executions=[row],
        new_steps=step_rows,
        events=[
            Event("execution.created", now, x.id, None, created_data(pipeline.name, inputs)),
            Event("execution.started", now, x.id, None, {"run": 1}),
        ],
    )
    return x, step_rows, batch
