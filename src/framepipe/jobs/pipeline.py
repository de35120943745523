"""Batch pipelines defined in Python: steps, their dependencies, retries and weights.

A :class:`Pipeline` is built by decorating functions with :meth:`Pipeline.step`; it is only a
definition (nothing runs until an engine runs an execution of it) and is validated before its
first execution: a ``depends_on`` naming no step, or a cycle, is refused with an error that names
the pipeline and the step.
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, overload

from pydantic import BaseModel

from framepipe.errors import PipelineCycleError, StepParamsError, UnknownDependencyError
from framepipe.jobs.inputs import validate_inputs
from framepipe.jobs.keys import validate_step_name

if TYPE_CHECKING:
    from framepipe.backends.objects import ObjectStore

__all__ = ["OnSubmit", "Pipeline", "Step"]

F = TypeVar("F", bound=Callable[..., Any])

OnSubmit = Callable[[dict[str, Any], "ObjectStore"], Mapping[str, Any]]
"""``on_submit(inputs, objects)``: see :class:`Pipeline`."""


@dataclass(frozen=True)
class Step:
    """One step of a pipeline.

    A step whose function takes parameters besides ``ctx`` exists only as instances created by
    ``ctx.spawn_step``; one without parameters is an initial step of every execution.
    ``depends_on`` names steps (every instance of them) and applies to every instance.
    """

    name: str
    fn: Callable[..., Any]
    depends_on: tuple[str, ...] = ()
    retries: int = 0
    weight: float = 1.0
    retry_delay: float | None = None
    params: tuple[str, ...] = ()
    required: frozenset[str] = frozenset()
    accepts_any: bool = False
    is_async: bool = False

    @property
    def parameterised(self) -> bool:
        """True when the step takes parameters (and so exists only as spawned instances)."""
        return bool(self.params) or self.accepts_any

    def check_params(self, params: Mapping[str, Any], pipeline: str, key: str) -> None:
        """Raise :class:`StepParamsError` unless ``params`` fit the step's function."""
        missing = sorted(self.required - params.keys())
        unknown = [] if self.accepts_any else sorted(set(params) - set(self.params))
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"missing parameter(s) {', '.join(missing)}")
            if unknown:
                parts.append(f"unexpected parameter(s) {', '.join(unknown)}")
            raise StepParamsError(
                f"spawn_step({self.name!r}): {'; '.join(parts)} for "
                f"{self.name}({', '.join(self.params)})",
                pipeline=pipeline,
                step_key=key,
            )


def _inspect_params(
    name: str, fn: Callable[..., Any], pipeline: str
) -> tuple[tuple[str, ...], frozenset[str], bool]:
    signature = inspect.signature(fn)
    items = list(signature.parameters.values())
    if not items or items[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise StepParamsError(
            f"function {fn.__qualname__} must take the StepContext as its "
            "first positional parameter",
            pipeline=pipeline,
            step_key=name,
        )
    params: list[str] = []
    required: set[str] = set()
    accepts_any = False
    for p in items[1:]:
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            accepts_any = True
        elif p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            raise StepParamsError(
                f"parameter {p.name!r} of {fn.__qualname__} must be passable by keyword",
                pipeline=pipeline,
                step_key=name,
            )
        else:
            params.append(p.name)
            if p.default is inspect.Parameter.empty:
                required.add(p.name)
    return tuple(params), frozenset(required), accepts_any


def _count(value: Any, field: str, pipeline: str, step: str) -> int:
    """``value`` as a whole number >= 0, else :class:`StepParamsError` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise StepParamsError(
            f"{field} must be a whole number >= 0, not {value!r}", pipeline=pipeline, step_key=step
        )
    return int(value)


def _amount(value: Any, field: str, pipeline: str, step: str) -> float:
    """``value`` as a finite number >= 0, else :class:`StepParamsError` naming ``field``
    (NaN and infinity would make an execution's progress and a retry's delay meaningless)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 0
    ):
        raise StepParamsError(
            f"{field} must be a finite number >= 0, not {value!r}",
            pipeline=pipeline,
            step_key=step,
        )
    return float(value)


def _module_ref(depth: int) -> str | None:
    """Where the pipeline was defined: an importable module name or a file path."""
    frame = sys._getframe(depth)
    module = frame.f_globals.get("__name__")
    path = frame.f_globals.get("__file__")
    if module and module != "__main__" and not module.startswith("framepipe_userfile_"):
        return str(module)
    return str(Path(path).resolve()) if path else None


class Pipeline:
    """A named DAG of steps. Decorate functions with :meth:`step` to add them.

    ``inputs``, a Pydantic model, declares the execution's inputs: every submit validates
    them against it before an execution exists, and confines the local paths among them
    (fields of type :data:`~framepipe.jobs.inputs.LocalPathOrKey`) to the roots the submitter
    gives (:mod:`framepipe.jobs.inputs`). Without it, inputs are taken as given.

    ``on_submit(inputs, objects)``, when given, is run by every submit (the HTTP service, the
    command line, the Python API; embedded or on workers) after the inputs are checked and
    before anything is stored, with the submitter's object store: it returns the inputs to
    store, say with the version of an object they name pinned, so the steps later take what
    was there at the submit. What it raises refuses the submit, and nothing is stored. A
    retry does not run it again."""

    def __init__(
        self,
        name: str,
        *,
        description: str = "",
        inputs: type[BaseModel] | None = None,
        on_submit: OnSubmit | None = None,
    ) -> None:
        self.name = validate_step_name(name)
        self.description = description
        if inputs is not None and not (isinstance(inputs, type) and issubclass(inputs, BaseModel)):
            raise StepParamsError(
                f"inputs must be a Pydantic model class, not {inputs!r}", pipeline=self.name
            )
        self.inputs = inputs
        self.on_submit = on_submit
        self._steps: dict[str, Step] = {}
        self._validated = False
        self.module_ref = _module_ref(2)

    @property
    def steps(self) -> Mapping[str, Step]:
        """The steps by name, in the order they were added."""
        return self._steps

    def check_inputs(
        self,
        inputs: Mapping[str, Any],
        *,
        input_roots: Iterable[str | os.PathLike[str]] | None = None,
    ) -> dict[str, Any]:
        """``inputs`` as an execution of this pipeline stores them: validated against the
        declared model (:func:`~framepipe.jobs.inputs.validate_inputs`: an
        :class:`~framepipe.errors.InvalidInputError` naming the field, local paths confined to
        ``input_roots`` unless it is None), or as given when none is declared."""
        if self.inputs is None:
            return dict(inputs)
        return validate_inputs(self.inputs, inputs, input_roots=input_roots)

    @property
    def ref(self) -> str | None:
        """``module_or_file:pipeline_name``, used to load this pipeline again for a retry."""
        return f"{self.module_ref}:{self.name}" if self.module_ref else None

    @overload
    def step(self, fn: F, /) -> F: ...

    @overload
    def step(
        self,
        name: str | None = None,
        *,
        depends_on: Iterable[str] = (),
        retries: int = 0,
        weight: float = 1.0,
        retry_delay: float | None = None,
    ) -> Callable[[F], F]: ...

    def step(
        self,
        name: Any = None,
        *,
        depends_on: Iterable[str] = (),
        retries: int = 0,
        weight: float = 1.0,
        retry_delay: float | None = None,
    ) -> Any:
        """Add the decorated function as a step.

        ``retries`` is how many times a failing step is tried again (with exponential backoff
        starting at ``retry_delay`` seconds, or the ``retry_initial_delay`` setting);
        ``weight`` is its share of the execution's progress. ``retries`` must be a whole
        number >= 0, ``weight`` and ``retry_delay`` finite numbers >= 0: anything else is
        refused here with :class:`~framepipe.errors.StepParamsError` naming the step and the
        field.
        """
        if callable(name):
            return self.step()(name)

        def decorate(fn: F) -> F:
            self.add_step(
                fn,
                name=name,
                depends_on=depends_on,
                retries=retries,
                weight=weight,
                retry_delay=retry_delay,
            )
            return fn

        return decorate

    def add_step(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        depends_on: Iterable[str] = (),
        retries: int = 0,
        weight: float = 1.0,
        retry_delay: float | None = None,
    ) -> Step:
        """Add ``fn`` as a step (the non-decorator form of :meth:`step`)."""
        step_name = validate_step_name(name or fn.__name__)
        if step_name in self._steps:
            raise StepParamsError(
                f"step {step_name!r} is defined twice", pipeline=self.name, step_key=step_name
            )
        if isinstance(depends_on, str):
            depends_on = [depends_on]
        deps = tuple(dict.fromkeys(depends_on))
        for dep in deps:
            if not isinstance(dep, str) or ":" in dep:
                raise UnknownDependencyError(
                    f"depends_on entry {dep!r} must be a step name (instance keys are given to "
                    "spawn_step)",
                    pipeline=self.name,
                    step_key=step_name,
                )
        retries = _count(retries, "retries", self.name, step_name)
        weight = _amount(weight, "weight", self.name, step_name)
        if retry_delay is not None:
            retry_delay = _amount(retry_delay, "retry_delay", self.name, step_name)
        params, required, accepts_any = _inspect_params(step_name, fn, self.name)
        step = Step(
            name=step_name,
            fn=fn,
            depends_on=deps,
            retries=retries,
            weight=weight,
            retry_delay=retry_delay,
            params=params,
            required=required,
            accepts_any=accepts_any,
            is_async=inspect.iscoroutinefunction(fn),
        )
        self._steps[step_name] = step
        self._validated = False
        return step

    def get(self, name: str) -> Step | None:
        """The step called ``name``, or None."""
        return self._steps.get(name)

    @property
    def initial_steps(self) -> list[Step]:
        """Steps without parameters: each execution starts with one instance of each."""
        return [s for s in self._steps.values() if not s.parameterised]

    def validate(self) -> None:
        """Check every ``depends_on`` names a step and the dependencies have no cycle."""
        if self._validated:
            return
        if not self._steps:
            raise UnknownDependencyError("the pipeline has no steps", pipeline=self.name)
        for step in self._steps.values():
            for dep in step.depends_on:
                if dep not in self._steps:
                    raise UnknownDependencyError(
                        f"depends_on names {dep!r}, which is no step of this pipeline "
                        f"(steps: {', '.join(self._steps)})",
                        pipeline=self.name,
                        step_key=step.name,
                    )
        cycle = self._find_cycle()
        if cycle:
            raise PipelineCycleError(
                f"dependency cycle {' -> '.join(cycle)}", pipeline=self.name, step_key=cycle[0]
            )
        if not self.initial_steps:
            raise UnknownDependencyError(
                "no initial step: at least one step must take no parameters besides ctx",
                pipeline=self.name,
            )
        self._validated = True

    def _find_cycle(self) -> list[str] | None:
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(name: str) -> list[str] | None:
            state[name] = 1
            stack.append(name)
            for dep in self._steps[name].depends_on:
                if state.get(dep) == 1:
                    return [*stack[stack.index(dep) :], dep]
                if dep not in state:
                    found = visit(dep)
                    if found:
                        return found
            stack.pop()
            state[name] = 2
            return None

        for name in self._steps:
            if name not in state:
                found = visit(name)
                if found:
                    return found
        return None

    def upstream_names(self, name: str) -> set[str]:
        """Every step name ``name`` depends on, directly or transitively."""
        seen: set[str] = set()
        todo = list(self._steps[name].depends_on)
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(self._steps[dep].depends_on)
        return seen

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, steps={list(self._steps)})"
