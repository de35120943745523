"""What a running step sees: :class:`StepContext`."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from framepipe.errors import (
    InvalidInputError,
    PipelineCycleError,
    StepCancelledError,
    StepParamsError,
    UnknownDependencyError,
    UnknownStepError,
)
from framepipe.jobs.keys import former_step_key, is_step_key, step_key
from framepipe.jobs.ledger import Ledger, ledger_row
from framepipe.jobs.scratch import HeldFolders
from framepipe.logs import ComponentLogger, get_logger
from framepipe.untrusted import check_json, storable_text

if TYPE_CHECKING:
    from framepipe.backends.objects import ObjectStore
    from framepipe.backends.state import StateStore
    from framepipe.jobs.models import ExecutionInfo
    from framepipe.jobs.pipeline import Pipeline

__all__ = ["LazyData", "Progressed", "Spawned", "StepContext", "StepLedger", "StepMessage"]


@dataclass(frozen=True, slots=True)
class Progressed:
    """A running step reported its progress (0-100) and an optional message."""

    execution_id: str
    step_key: str
    pct: float
    message: str | None


@dataclass(frozen=True, slots=True)
class Spawned:
    """A running step (``spawner``) spawned the instance ``key`` of step ``name``; ``deps``
    are the keys or names it waits for besides the step's declared ``depends_on``."""

    execution_id: str
    spawner: str
    name: str
    params: dict[str, Any]
    key: str
    deps: list[str]


StepMessage = Progressed | Spawned
"""What a step's context sends its scheduler (the engine, or the worker running it)."""


class LazyData(Mapping[str, Any]):
    """A step's ``ctx.data`` on a worker: the execution's merged outputs, loaded by ``load``
    (read from the store) when the step first looks at them (read-only at the top level).

    Both modes give each attempt a copy of its own parsed from JSON (a worker parses what it
    reads from the store; the embedded engine copies each value the step reads through JSON
    in the step's thread, :class:`~framepipe.jobs.memory.JsonCopies`), so the same code sees
    the same values in both: string keys, lists, and nothing shared with another step (a step
    that changes a list it was given changes its own copy only)."""

    def __init__(self, load: Callable[[], dict[str, Any]]) -> None:
        self._load = load
        self._data: Mapping[str, Any] | None = None
        self._lock = threading.Lock()

    def _get(self) -> Mapping[str, Any]:
        if self._data is None:
            with self._lock:
                if self._data is None:
                    self._data = MappingProxyType(self._load())
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(dict(self._get()))


class StepLedger(Ledger):
    """The ledger as a step sees it: :meth:`record` is committed with the step's completion."""

    def __init__(self, store: StateStore, namespace: str, ctx: StepContext) -> None:
        super().__init__(store, namespace)
        self._ctx = ctx

    def record(
        self,
        identity: str,
        *,
        content_hash: str | None = None,
        size: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Record ``identity`` as imported once this step completes (not if it fails)."""
        try:
            row = ledger_row(
                self.namespace,
                identity,
                content_hash=content_hash,
                size=size,
                meta=meta,
                execution_id=self._ctx.execution_id,
                step_key=self._ctx.step_key,
            )
        except (TypeError, ValueError) as exc:
            raise StepParamsError(
                f"cannot record {identity!r} in the ledger: {exc}",
                pipeline=self._ctx.pipeline.name,
                step_key=self._ctx.step_key,
            ) from exc
        self._ctx._ledger_rows.append(row)


class StepContext:
    """The first argument of every step function.

    ``inputs`` are the execution's inputs; ``data`` is the merged output of the steps that had
    completed when this one started (read-only); ``params`` are this instance's parameters.
    :attr:`input_roots` says which local files the inputs may name (see
    :func:`framepipe.jobs.inputs.local_input`, the one way a step should turn an input into
    a local file). ``progress``, ``spawn_step`` and ``ledger.record`` may be called from the
    step's own thread.
    """

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        execution_id: str,
        step_key: str,
        step_name: str,
        attempt: int,
        inputs: Mapping[str, Any],
        data: Mapping[str, Any],
        params: Mapping[str, Any],
        store: StateStore,
        objects: Callable[[], ObjectStore],
        post: Callable[[StepMessage], None],
        has_key: Callable[[str], bool],
        known_key: Callable[[str], bool] | None = None,
        input_roots: Iterable[str | os.PathLike[str]] | None = None,
        deps_of: Callable[[str], Sequence[str] | None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.execution_id = execution_id
        self.step_key = step_key
        self.step_name = step_name
        self.attempt = attempt
        self.inputs = inputs
        self.data = data
        self.params = MappingProxyType(dict(params))
        self.store = store
        self._log: ComponentLogger | None = None
        self._objects = objects
        self._post = post
        self._has_key = has_key
        # Whether a spawned key may be skipped as existing: a cheap check is enough, since
        # spawning an existing key changes nothing anyway.
        self._known_key = known_key or has_key
        self._deps_of = deps_of or (lambda _key: None)
        self._cancel = threading.Event()
        self._spawned: dict[str, frozenset[str]] = {}  # key -> its dependencies
        self._ledger_rows: list[dict[str, Any]] = []
        self._tempdirs: list[Path] = []
        self._folders = HeldFolders(self._make_tempdir)
        self._folders_lock = threading.Lock()
        self._input_roots = (
            None if input_roots is None else tuple(Path(root) for root in input_roots)
        )
        self.ledger = StepLedger(store, pipeline.name, self)

    @property
    def input_roots(self) -> tuple[Path, ...] | None:
        """The folders whose local files this execution's inputs may name, as its submitter
        was allowed (the HTTP service: the setting ``input_roots``; ``()``: none, object keys
        only), or None: unrestricted (submitted from the command line or the Python API).
        Recorded by the submit, kept by a retry, never set by a client; read-only."""
        return self._input_roots

    @property
    def log(self) -> ComponentLogger:
        """This step's logger: every line carries ``[pipeline/step_key]``."""
        if self._log is None:
            self._log = get_logger(f"{self.pipeline.name}/{self.step_key}", "framepipe.steps")
        return self._log

    # -- progress and cancellation -------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        """True once the execution was cancelled, failed elsewhere, or is shutting down."""
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        """Raise :class:`StepCancelledError` if the step should stop now."""
        if self._cancel.is_set():
            raise StepCancelledError(
                "stopped: the execution is cancelled or shutting down",
                pipeline=self.pipeline.name,
                step_key=self.step_key,
                execution_id=self.execution_id,
            )

    def progress(self, pct: float, message: str | None = None) -> None:
        """Report this step's progress (0-100) with an optional message.

        The message is stored as :func:`~framepipe.jobs.storable.storable_text` makes it (a
        lone surrogate from a file name becomes ``\\udcXX``, a NUL ``\\x00``; anything but a
        string is stored as its ``str()``), so no message can fail the commit that records it.
        Reports are committed in rounds: reports made between two commits are coalesced
        into the last of them, and a step's last report is always stored and published,
        before its ``step.completed`` (or ``step.failed``), in both modes.
        Raises :class:`StepCancelledError` once the execution is being stopped, so a long step
        that reports progress stops at its next report."""
        self.check_cancelled()
        text = None if message is None else storable_text(str(message))
        self._post(
            Progressed(self.execution_id, self.step_key, min(100.0, max(0.0, float(pct))), text)
        )

    # -- dynamic steps ------------------------------------------------------------------------

    def spawn_step(
        self,
        name: str,
        params: Mapping[str, Any] | None = None,
        depends_on: Iterable[str] | None = None,
    ) -> str:
        """Create an instance of step ``name`` with ``params``; return its key.

        The instance also waits for ``depends_on`` (step keys or step names) on top of the
        step's declared ``depends_on``. It is queued as soon as this call is committed, not when
        the calling step ends. Spawning a key that already exists returns it and changes nothing;
        so does spawning an instance that an older release stored under its former key
        (:func:`~framepipe.jobs.keys.former_step_key`), whose key is returned.

        ``params`` must be JSON every backend can store: text with a lone surrogate (a file
        name ``os.listdir`` could not decode) or a NUL is refused with
        :class:`StepParamsError` naming the parameter, on SQLite as on PostgreSQL.

        ``depends_on`` that could only be silently dropped is refused with
        :class:`StepParamsError`, in both modes: given for a step without parameters (an
        initial step, which exists from the execution's start: declare its dependencies on
        the step instead), or differing from those of the existing instance with the same
        key.
        """
        pipeline = self.pipeline
        step = pipeline.get(name)
        if step is None:
            raise UnknownStepError(
                f"spawn_step names unknown step {name!r} (steps: {', '.join(pipeline.steps)})",
                pipeline=pipeline.name,
                step_key=self.step_key,
            )
        values = dict(params or {})
        step.check_params(values, pipeline.name, self.step_key)
        key, former = _instance_keys(name, values, pipeline.name, self.step_key)
        if former is not None and self._has_key(former):
            key = former  # stored by a release before keys were labelled: the same instance
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        deps: list[str] = []
        for dep in depends_on or ():
            dep_name = dep.partition(":")[0]
            if is_step_key(dep):
                if not (self._has_key(dep) or dep in self._spawned):
                    raise UnknownDependencyError(
                        f"spawn_step({name!r}) depends on {dep!r}, which is no step of this "
                        "execution",
                        pipeline=pipeline.name,
                        step_key=self.step_key,
                    )
            elif pipeline.get(dep) is None:
                raise UnknownDependencyError(
                    f"spawn_step({name!r}) depends on {dep!r}, which is no step of this pipeline",
                    pipeline=pipeline.name,
                    step_key=self.step_key,
                )
            if dep_name == name and not is_step_key(dep) and step.parameterised:
                raise PipelineCycleError(
                    f"{key} cannot wait for every instance of its own step",
                    pipeline=pipeline.name,
                    step_key=self.step_key,
                )
            if name in pipeline.upstream_names(dep_name):
                raise PipelineCycleError(
                    f"{key} would wait for {dep}, which waits for every {name!r} step",
                    pipeline=pipeline.name,
                    step_key=self.step_key,
                )
            deps.append(dep)
        if deps and not step.parameterised:
            raise StepParamsError(
                f"spawn_step({name!r}, depends_on={deps!r}) would do nothing: {name!r} takes no "
                "parameters, so it is an initial step of every execution, created when the "
                "execution starts, and a spawn cannot give it dependencies. Declare them on the "
                f"step (@pipeline.step(depends_on=[{deps[0].partition(':')[0]!r}])), or give "
                f"it a parameter so that each spawn makes an instance that waits",
                pipeline=pipeline.name,
                step_key=self.step_key,
            )
        wanted = frozenset([*step.depends_on, *deps])
        existing = self._spawned.get(key)
        if existing is None and deps:
            found = self._deps_of(key)
            existing = None if found is None else frozenset(found)
        if deps and existing is not None and existing != wanted:
            raise StepParamsError(
                f"spawn_step({name!r}) names the existing instance {key} with other "
                f"dependencies ({sorted(wanted)} instead of {sorted(existing)}), which would be "
                "ignored: spawn it once with all its dependencies, or give the instances "
                "different parameters",
                pipeline=pipeline.name,
                step_key=self.step_key,
            )
        if key not in self._spawned and not self._known_key(key):
            self._spawned[key] = wanted
            self._post(Spawned(self.execution_id, self.step_key, name, values, key, deps))
        return key

    # -- resources ------------------------------------------------------------------------------

    @property
    def objects(self) -> ObjectStore:
        """The object store (frames, videos, thumbnails)."""
        return self._objects()

    def get_ledger(self, namespace: str) -> StepLedger:
        """The ledger of another namespace (the default is the pipeline's name)."""
        return StepLedger(self.store, namespace, self)

    def executions(
        self,
        *,
        status: Sequence[str] | None = None,
        pipeline: str | None = None,
        limit: int = 1000,
    ) -> list[ExecutionInfo]:
        """Executions of ``pipeline`` (default: this step's), newest first, with their inputs,
        only those with one of the ``status`` values when given: what other runs hold (an
        incremental import, files another run may still read). A read of the state store: in
        an ``async`` step, call it with ``asyncio.to_thread``."""
        from framepipe.jobs.records import list_executions

        rows = list_executions(
            self.store,
            limit=limit,
            status=list(status) if status is not None else None,
            pipeline=self.pipeline.name if pipeline is None else pipeline,
        )
        return [info for info, _done, _total in rows]

    def tempdir(self) -> Path:
        """A fresh directory for this attempt, deleted when the step ends, failed or not; one
        an attempt killed with its process left is deleted by the next attempt on the machine
        that makes one (:mod:`framepipe.jobs.scratch`). Thread-safe."""
        path = self._folders.new()
        with self._folders_lock:
            self._tempdirs.append(path)
        return path

    def _make_tempdir(self) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.step_key)
        return Path(tempfile.mkdtemp(prefix=f"framepipe-{self.execution_id[:8]}-{safe}-"))

    def _cleanup(self) -> None:
        with self._folders_lock:
            paths, self._tempdirs = self._tempdirs, []
        for path in paths:
            shutil.rmtree(path, ignore_errors=True)
        self._folders.release()


def _instance_keys(
    name: str, values: dict[str, Any], pipeline: str, caller: str
) -> tuple[str, str | None]:
    """The key of the instance of step ``name`` with parameters ``values``, and its former
    key (:func:`~framepipe.jobs.keys.former_step_key`); :class:`StepParamsError` naming the
    parameter when ``values`` is not JSON every backend can store."""
    try:
        check_json(values, "params")
    except InvalidInputError as exc:
        raise StepParamsError(
            f"spawn_step({name!r}): {exc} (every backend stores parameters as JSON text)",
            pipeline=pipeline,
            step_key=caller,
        ) from exc
    try:
        return step_key(name, values), former_step_key(name, values)
    except (TypeError, ValueError) as exc:
        raise StepParamsError(
            f"parameters of spawned step {name!r} are not JSON-serialisable: {exc}",
            pipeline=pipeline,
            step_key=caller,
        ) from exc
