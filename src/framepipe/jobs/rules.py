"""The scheduling rules of an execution, written once for both modes.

The embedded engine (:mod:`framepipe.jobs.engine`: state in memory, written back in batches)
and the workers (:mod:`framepipe.jobs.dispatch`: state in the database, one transaction per
round) differ in where an execution's state lives and how "step X is ready" is delivered
(in-process queue, or a broker). What happens to a step is decided here, by functions of plain
values that both call:

* **Dependencies** (:func:`plan_step`): an instance waits for its step's declared
  ``depends_on`` plus those it was spawned with. A dependency naming a step key, or the name of
  a step without parameters (which has exactly one instance), is a *key* dependency: the
  instance waits for that one step. The name of a parameterised step is a *name* dependency:
  the instance waits for every instance of it, including those spawned later.
* **Readiness** (:func:`is_ready`): a step is ready when no key dependency is unfinished, it
  has no name dependency, and its execution runs. A step with name dependencies is released
  only when nothing of its execution is ready, running or retrying (so no new instance can
  appear) and every instance of those names completed (:func:`released_by_names`).
* **Stuck** (:func:`stuck_error`): when nothing is active and no step can be released, the
  execution fails, naming what waits for what.
* **A failed attempt** (:func:`after_failure`): retried after a delay while the
  :class:`~framepipe.jobs.outcomes.RetryPolicy` allows and the execution runs; otherwise the
  step fails and so does its execution (fail-fast: nothing new starts, running steps finish
  and keep their results) with :func:`failed_error`.
* **An attempt its execution stopped** (:func:`interrupted_status`): whatever it raised, it
  is not a failure: its step ends ``cancelled`` if the execution is cancelled, otherwise
  ``pending`` (interrupted: it runs again when the execution is resumed).
* **Progress** (:func:`execution_progress`): the weighted mean of the steps' progress, never
  going back.
* **What ``execution.created`` says** (:func:`created_data`): the pipeline and its inputs, the
  inputs left out (with their size) when their JSON is over :data:`EVENT_INPUTS_MAX` bytes.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from framepipe.jobs.keys import is_step_key
from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.untrusted import json_size

if TYPE_CHECKING:
    from framepipe.jobs.outcomes import RetryPolicy
    from framepipe.jobs.pipeline import Pipeline

__all__ = [
    "StepPlan",
    "after_failure",
    "execution_progress",
    "failed_error",
    "interrupted_status",
    "is_key_dependency",
    "is_ready",
    "missing_dependency_error",
    "new_step_row",
    "plan_step",
    "released_by_names",
    "stuck_error",
]

_STUCK_SHOWN = 5


@dataclass(slots=True)
class StepPlan:
    """A step instance to create: its key, parameters and dependencies split by kind."""

    key: str
    name: str
    params: dict[str, Any]
    deps: list[str]
    key_deps: list[str]
    name_deps: list[str]
    weight: float
    spawned_by: str | None = None


def new_step_row(
    execution_id: str, plan: StepPlan, status: StepStatus, *, seq: int, created_at: float
) -> dict[str, Any]:
    """The row of a new step planned as ``plan`` (``status``, ``seq`` in its execution): not
    started, no output, no error. The same in both modes; the workers' columns are added by
    :func:`framepipe.jobs.step_graph.step_row`."""
    return {
        "execution_id": execution_id,
        "key": plan.key,
        "name": plan.name,
        "params": plan.params,
        "depends_on": plan.deps,
        "spawned_by": plan.spawned_by,
        "status": status.value,
        "weight": plan.weight,
        "progress": 0.0,
        "message": None,
        "attempt": 0,
        "failures": 0,
        "crashes": 0,
        "output": None,
        "error": None,
        "seq": seq,
        "done_seq": None,
        "created_at": created_at,
        "ready_at": None,
        "started_at": None,
        "finished_at": None,
        "next_attempt_at": None,
    }


def is_key_dependency(pipeline: Pipeline, dep: str) -> bool:
    """True when ``dep`` names one step (a step key, or a step without parameters), False
    when it names every instance of a parameterised step."""
    target = pipeline.get(dep.partition(":")[0])
    return is_step_key(dep) or (target is not None and not target.parameterised)


def plan_step(
    pipeline: Pipeline,
    name: str,
    params: Mapping[str, Any],
    key: str,
    extra_deps: Iterable[str] = (),
    spawned_by: str | None = None,
) -> StepPlan:
    """The plan of instance ``key`` of step ``name``: its declared dependencies plus
    ``extra_deps`` (in that order, without repeats), split into key and name dependencies."""
    step = pipeline.steps[name]
    deps = list(dict.fromkeys([*step.depends_on, *extra_deps]))
    key_deps = [d for d in deps if is_key_dependency(pipeline, d)]
    name_deps = [d for d in deps if d not in key_deps]
    return StepPlan(
        key=key,
        name=name,
        params=dict(params),
        deps=deps,
        key_deps=key_deps,
        name_deps=name_deps,
        weight=step.weight,
        spawned_by=spawned_by,
    )


def is_ready(waiting: int, name_deps: Collection[str], *, running: bool) -> bool:
    """True when a pending step with ``waiting`` unfinished key dependencies may run now;
    one with name dependencies waits for :func:`released_by_names`."""
    return running and waiting == 0 and not name_deps


def released_by_names(
    waiters: Mapping[str, Collection[str]], open_names: Collection[str]
) -> list[str]:
    """The keys among ``waiters`` (pending, no key dependency left; key -> its name
    dependencies) that no longer wait: none of their names is in ``open_names`` (the step
    names that still have an unfinished instance). Called only when nothing of the execution
    is ready, running or retrying; sorted, so both modes release in the same order."""
    return sorted(k for k, names in waiters.items() if not set(names) & set(open_names))


def missing_dependency_error(key: str, dep: str) -> str:
    """Why an execution fails when step ``key`` depends on a step key it does not have."""
    return f"step '{key}' depends on '{dep}', which does not exist in this execution"


def stuck_error(pipeline: str, waiting: int, shown: Sequence[tuple[str, Sequence[str]]]) -> str:
    """Why an execution fails when nothing is active and nothing can be released: ``waiting``
    steps are pending; ``shown`` are the first of them (in creation order) with their
    dependencies."""
    detail = "; ".join(
        f"{key} waits for {', '.join(deps) or 'nothing'}" for key, deps in shown[:_STUCK_SHOWN]
    )
    return f"pipeline '{pipeline}': no step can run any more ({waiting} waiting: {detail})"


def after_failure(
    failures: int, policy: RetryPolicy, *, permanent: bool, running: bool
) -> float | None:
    """Seconds before a step that has now failed ``failures`` times runs again, or None when
    it fails for good: the policy's retries are spent, the failure is ``permanent``, or its
    execution no longer runs (failed or stopping)."""
    if running and policy.retries_after(failures, permanent=permanent):
        return policy.delay(failures)
    return None


def failed_error(pipeline: str, key: str, failures: int, error: str) -> str:
    """The error of an execution failed by step ``key`` (``error``: its first line is used)."""
    tries = f"after {failures} attempt{'s' if failures != 1 else ''}"
    head = error.splitlines()[0] if error else "failed"
    return f"pipeline '{pipeline}', step '{key}' failed {tries}: {head}"


def interrupted_status(execution: ExecutionStatus) -> StepStatus:
    """What a step becomes whose attempt was stopped because ``execution`` (the status it is
    stopping with) stops: cancelled with a cancelled execution, else pending (interrupted:
    run again on resume, not counted as a failure)."""
    return StepStatus.CANCELLED if execution is ExecutionStatus.CANCELLED else StepStatus.PENDING


def execution_progress(
    previous: float, wsum: float, wtotal: float, *, completed: int, total: int
) -> float:
    """An execution's progress (0-100, two decimals): ``wsum / wtotal``, the weighted sum of
    its steps' progress over their total weight; the share of ``completed`` steps when every
    weight is zero. Never below ``previous``: progress does not go back when new steps are
    spawned."""
    value = wsum / wtotal if wtotal > 0 else 100.0 * completed / max(1, total)
    return max(previous, round(min(100.0, value), 2))


EVENT_INPUTS_MAX = 16 * 1024
"""The largest inputs (bytes of JSON) an ``execution.created`` event carries. Events go to
every live subscriber, page and dashboard; an execution's inputs may be up to
``max_inputs_bytes`` (a card's file list), so larger ones stay on the execution only."""


def created_data(pipeline: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The data of an execution's ``execution.created`` event: ``pipeline`` and ``inputs``;
    inputs whose JSON is over :data:`EVENT_INPUTS_MAX` bytes are ``None`` there, with their
    size as ``inputs_bytes`` (the execution itself has them: ``GET /api/executions/{id}``)."""
    size = json_size(inputs)
    if size > EVENT_INPUTS_MAX:
        return {"pipeline": pipeline, "inputs": None, "inputs_bytes": size}
    return {"pipeline": pipeline, "inputs": inputs}
