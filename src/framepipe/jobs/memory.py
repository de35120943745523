"""The in-memory state of the executions an embedded engine runs.

:class:`ExecState` and :class:`StepState` hold what the store holds (a step's row, an
execution's row) plus what scheduling needs: the counters (unfinished, active, running, per
step name), each step's unfinished key dependencies and dependents, the name waiters and the
weighted progress. They are mutated only by the engine's scheduler task
(:mod:`framepipe.jobs.scheduler`), by the rules of :mod:`framepipe.jobs.rules`; a step's thread
reads only :meth:`ExecState.data_view` (a snapshot replaced, never changed in place) and
:meth:`ExecState.deps_of`.
"""

from __future__ import annotations

import asyncio
import collections
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from framepipe.jobs.models import ExecutionStatus, StepStatus
from framepipe.jobs.rules import (
    execution_progress,
    is_key_dependency,
    missing_dependency_error,
    new_step_row,
    plan_step,
)

if TYPE_CHECKING:
    from framepipe.jobs.context import StepContext
    from framepipe.jobs.pipeline import Pipeline, Step
    from framepipe.jobs.running import Ran

__all__ = ["ACTIVE", "ExecState", "Finished", "JsonCopies", "StepState"]


def _json_copy(value: Any) -> Any:
    """A deep copy of ``value``, part of an output parsed from JSON (dicts with string keys,
    lists, strings, numbers, bools, None): what a round trip through JSON gives, made without
    one, five times faster (the dicts and lists are copied, the immutable leaves kept).
    Anything else, and nesting deeper than this copy can recurse, goes through JSON."""
    try:
        return _copy_parsed(value)
    except (RecursionError, _NotParsed):
        return json.loads(json.dumps(value, ensure_ascii=False))


class _NotParsed(Exception):
    """A value that JSON parsing cannot have produced."""


def _copy_parsed(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {k: _copy_parsed(v) for k, v in value.items()}
    if kind is list:
        return [_copy_parsed(v) for v in value]
    if value is None or kind in (str, int, float, bool):
        return value
    raise _NotParsed


_MISSING = object()


class JsonCopies(Mapping[str, Any]):
    """A step's ``ctx.data`` in the embedded engine (read-only at the top level).

    ``snapshot`` is the merged outputs completed when the step started, as the engine keeps
    them: parsed back from their canonical JSON (:func:`~framepipe.jobs.outcomes.check_output`)
    and never changed in place. The first time the step reads a key it gets a JSON copy of
    that key's value of its own, and the same copy on every later read, so the step sees
    what a JSON copy of the whole data would show, as a worker reads it from the store
    (string keys, lists, and nothing shared with another step or the engine: a step that
    changes a list it was given changes its own copy only, and sees its change when it reads
    the key again). It pays only for the keys it reads: listing the keys, their number and
    ``in`` copy nothing. Thread-safe (a step may read it from threads of its own)."""

    __slots__ = ("_copies", "_snapshot")

    def __init__(self, snapshot: Mapping[str, Any]) -> None:
        self._snapshot = snapshot
        self._copies: dict[str, Any] = {}

    def __getitem__(self, key: str) -> Any:
        copy = self._copies.get(key, _MISSING)
        if copy is _MISSING:
            # setdefault is one atomic dict operation: two threads reading the key at once
            # both get the copy that was stored first.
            copy = self._copies.setdefault(key, _json_copy(self._snapshot[key]))
        return copy

    def __contains__(self, key: object) -> bool:
        return key in self._snapshot

    def __iter__(self) -> Iterator[str]:
        return iter(self._snapshot)

    def __len__(self) -> int:
        return len(self._snapshot)

    def __repr__(self) -> str:
        return repr(dict(self))


ACTIVE = frozenset({StepStatus.READY, StepStatus.RUNNING, StepStatus.RETRYING})
"""The statuses of a step that keep its execution from being quiescent."""


class StepState:
    """In-memory state of one step; mutated only by the scheduler."""

    __slots__ = (
        "attempt",
        "crashes",
        "created_at",
        "ctx",
        "dependents",
        "deps",
        "done_seq",
        "error",
        "failures",
        "finished_at",
        "key",
        "message",
        "name",
        "name_deps",
        "new",
        "next_attempt_at",
        "output",
        "params",
        "progress",
        "ready_at",
        "seq",
        "spawned_by",
        "started_at",
        "status",
        "step",
        "task",
        "timer",
        "waiting",
        "weight",
        "x",
    )

    def __init__(self, x: ExecState, row: Mapping[str, Any], step: Step) -> None:
        self.x = x
        self.step = step
        self.key: str = row["key"]
        self.name: str = row["name"]
        self.params: dict[str, Any] = row["params"]
        self.deps: list[str] = list(row["depends_on"])
        self.spawned_by: str | None = row["spawned_by"]
        self.status = StepStatus(row["status"])
        self.weight: float = row["weight"]
        self.progress: float = row["progress"]
        self.message: str | None = row["message"]
        self.attempt: int = row["attempt"]
        self.failures: int = row["failures"]
        self.crashes: int = row["crashes"]
        self.output: dict[str, Any] | None = row["output"]
        self.error: str | None = row["error"]
        self.seq: int = row["seq"]
        self.done_seq: int | None = row["done_seq"]
        self.created_at: float = row["created_at"]
        self.ready_at: float | None = row["ready_at"]
        self.started_at: float | None = row["started_at"]
        self.finished_at: float | None = row["finished_at"]
        self.next_attempt_at: float | None = row["next_attempt_at"]
        self.waiting = 0
        self.name_deps: list[str] = []
        self.dependents: list[StepState] = []
        self.ctx: StepContext | None = None
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.new = False

    def row(self) -> dict[str, Any]:
        return {
            "execution_id": self.x.id,
            "key": self.key,
            "name": self.name,
            "params": self.params,
            "depends_on": self.deps,
            "spawned_by": self.spawned_by,
            "status": self.status.value,
            "weight": self.weight,
            "progress": self.progress,
            "message": self.message,
            "attempt": self.attempt,
            "failures": self.failures,
            "crashes": self.crashes,
            "output": self.output,
            "error": self.error,
            "seq": self.seq,
            "done_seq": self.done_seq,
            "created_at": self.created_at,
            "ready_at": self.ready_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "next_attempt_at": self.next_attempt_at,
        }


class ExecState:
    """In-memory state of one execution being run by this engine."""

    def __init__(self, row: Mapping[str, Any], pipeline: Pipeline) -> None:
        self.id: str = row["id"]
        self.pipeline = pipeline
        self.row = dict(row)
        self.inputs = MappingProxyType(dict(row["inputs"]))
        roots = row.get("input_roots")
        self.input_roots: tuple[str, ...] | None = None if roots is None else tuple(roots)
        self.steps: dict[str, StepState] = {}
        self.active = 0
        self.running = 0
        self.unfinished = 0
        self.unfinished_by_name: collections.Counter[str] = collections.Counter()
        self.name_waiters: dict[str, StepState] = {}
        self.data: dict[str, Any] = {}
        self.snapshot: Mapping[str, Any] | None = None
        self.wsum = 0.0
        self.wtotal = 0.0
        self.next_seq = 0
        self.next_done_seq = 0
        self.stopping: ExecutionStatus | None = None
        self.waiters: list[asyncio.Future[None]] = []

    def data_view(self) -> Mapping[str, Any]:
        """The ``ctx.data`` of a step starting now: the merged outputs completed so far, as
        :class:`JsonCopies`, so every step gets a JSON copy of its own of each value it reads,
        with the values a worker would read from the store (never the objects another step
        holds), at the cost of the keys it reads only."""
        if self.snapshot is None:
            self.snapshot = MappingProxyType(dict(self.data))
        return JsonCopies(self.snapshot)

    @property
    def label(self) -> str:
        return f"{self.pipeline.name}/{self.id[:8]}"

    def deps_of(self, key: str) -> list[str] | None:
        """The dependencies of step ``key`` (read from a step's thread: a step's list is
        replaced, never changed in place, once the step exists)."""
        s = self.steps.get(key)
        return None if s is None else list(s.deps)

    def new_step_row(
        self,
        step: Step,
        params: dict[str, Any],
        key: str,
        deps: Iterable[str],
        spawned_by: str | None,
        now: float,
    ) -> dict[str, Any]:
        """The stored row of a new instance ``key`` of ``step`` (:func:`plan_step` splits and
        orders its dependencies), numbered after the execution's last step."""
        plan = plan_step(self.pipeline, step.name, params, key, deps, spawned_by)
        seq = self.next_seq
        self.next_seq += 1
        return new_step_row(self.id, plan, StepStatus.PENDING, seq=seq, created_at=now)

    def add_rows(self, step_rows: list[dict[str, Any]]) -> None:
        """Take stored steps (a resume) in: their states, numbering and completed outputs."""
        for r in step_rows:
            s = StepState(self, r, self.pipeline.steps[r["name"]])
            self.steps[s.key] = s
            self.next_seq = max(self.next_seq, s.seq + 1)
            if s.done_seq is not None:
                self.next_done_seq = max(self.next_done_seq, s.done_seq + 1)
        for s in sorted(self.steps.values(), key=lambda s: s.done_seq or 0):
            if s.status is StepStatus.COMPLETED and s.output:
                self.data.update(s.output)

    def count(self, s: StepState, sign: int) -> int:
        """Add (``sign`` 1) or remove (-1) ``s`` in the counters of its status; returns how
        the number of running steps changed."""
        if s.status is not StepStatus.COMPLETED:
            self.unfinished += sign
            self.unfinished_by_name[s.name] += sign
        if s.status in ACTIVE:
            self.active += sign
        if s.status is StepStatus.RUNNING:
            self.running += sign
            return sign
        return 0

    def link(self, s: StepState) -> str | None:
        """Wire ``s`` to its dependencies: it waits for each unfinished key dependency and is
        listed among the name waiters if it has name dependencies. Returns why the execution
        must fail if a key dependency does not exist, else None."""
        missing = None
        for dep in s.deps:
            if is_key_dependency(self.pipeline, dep):
                t = self.steps.get(dep)
                if t is None:
                    missing = missing or missing_dependency_error(s.key, dep)
                    continue
                if t.status is not StepStatus.COMPLETED:
                    s.waiting += 1
                    t.dependents.append(s)
            else:
                s.name_deps.append(dep)
        if s.name_deps and s.status is not StepStatus.COMPLETED:
            self.name_waiters[s.key] = s
        return missing

    def set_progress(self, s: StepState, pct: float) -> bool:
        """Set a step's progress; True if the execution's progress rose."""
        self.wsum += s.weight * (pct - s.progress)
        s.progress = pct
        return self.recompute_progress()

    def recompute_progress(self) -> bool:
        """The execution's weighted progress (:func:`execution_progress`) into its row; True
        if it rose."""
        if self.wtotal == 0.0 and self.steps:
            self.wtotal = sum(s.weight for s in self.steps.values())
            self.wsum = sum(
                s.weight * (100.0 if s.status is StepStatus.COMPLETED else s.progress)
                for s in self.steps.values()
            )
        completed = (
            0
            if self.wtotal > 0
            else sum(1 for s in self.steps.values() if s.status is StepStatus.COMPLETED)
        )
        value = execution_progress(
            self.row["progress"], self.wsum, self.wtotal, completed=completed, total=len(self.steps)
        )
        if value > self.row["progress"]:
            self.row["progress"] = value
            return True
        return False


@dataclass(slots=True)
class Finished:
    """A step's attempt is done (what its thread or task sends the scheduler)."""

    step: StepState
    ctx: StepContext
    ran: Ran

    @property
    def execution_id(self) -> str:
        return self.step.x.id
