"""Loading a pipeline from a reference: ``FILE.py:NAME`` or ``package.module:NAME``.

``NAME`` is the Python variable that holds the :class:`Pipeline` or its ``Pipeline.name``; without
``:NAME`` the module must define exactly one pipeline. A file is imported under a fresh module
name starting with ``framepipe_userfile_`` (every load runs the file again, so an edited file is
picked up), with its folder first on ``sys.path`` so it can import its neighbours. A module is
imported normally, with the current folder on ``sys.path`` as ``python -m`` would have it.

Every problem is a :class:`PipelineDefinitionError` with a message that says what to fix. The
loaded pipeline is validated (cycles, dangling ``depends_on``) before it is returned, and its
reference is text every state backend can store: a file whose path is not valid UTF-8 is refused
before it is imported, its path shown with the bad bytes escaped (``n\\xffame.py``).
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
import re
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from framepipe.errors import InvalidInputError, PipelineDefinitionError
from framepipe.jobs.pipeline import Pipeline
from framepipe.logs import get_logger
from framepipe.untrusted import check_text

__all__ = [
    "KnownPipelines",
    "LoadedPipeline",
    "LoadedTarget",
    "load_pipeline",
    "resolve_pipeline",
    "resolve_target",
]

_log = get_logger("jobs.loading")

USERFILE_PREFIX = "framepipe_userfile_"
_counter = itertools.count(1)


@dataclass(frozen=True)
class LoadedPipeline:
    """A pipeline and the canonical reference that loads it again from any folder:
    ``/abs/path/file.py:PIPELINE_NAME`` or ``package.module:PIPELINE_NAME``."""

    pipeline: Pipeline
    ref: str


@dataclass(frozen=True)
class LoadedTarget:
    """Something ``framepipe run`` can run: a job :class:`Pipeline`, a live ``App`` or a
    ``StreamPipeline``, with its canonical reference."""

    target: Any
    ref: str


def _runnable_types() -> tuple[type, ...]:
    from framepipe.app import App
    from framepipe.stream.pipeline import StreamPipeline

    return (Pipeline, App, StreamPipeline)


def resolve_target(ref: str) -> LoadedTarget:
    """Load a job pipeline, an ``App`` or a ``StreamPipeline`` named by ``ref``."""
    module, where, name = _load(ref)
    target = _pick(module, name, where, _runnable_types(), "Pipeline, App or StreamPipeline")
    if isinstance(target, Pipeline):
        target.validate()
    return LoadedTarget(target, _storable_ref(f"{where}:{target.name}"))


def load_pipeline(ref: str) -> Pipeline:
    """The pipeline ``ref`` names (``FILE.py:NAME`` or ``package.module:NAME``), validated."""
    return resolve_pipeline(ref).pipeline


def resolve_pipeline(ref: str) -> LoadedPipeline:
    """Like :func:`load_pipeline`, also returning the canonical reference to store."""
    module, where, name = _load(ref)
    pipeline = _pick(module, name, where, (Pipeline,), "Pipeline")
    assert isinstance(pipeline, Pipeline)
    pipeline.validate()
    return LoadedPipeline(pipeline, _storable_ref(f"{where}:{pipeline.name}"))


def _load(ref: str) -> tuple[ModuleType, str, str | None]:
    target, name = _split(ref)
    if not target:
        raise PipelineDefinitionError(
            f"invalid pipeline reference {ref!r}: give FILE.py:NAME or package.module:NAME"
        )
    if _looks_like_file(target):
        path = Path(target).expanduser().resolve()
        _check_path(path)
        return _import_file(path, target), str(path), name
    _storable_ref(target)
    return _import_module(target), target, name


def _shown(text: str) -> str:
    """``text`` with the bytes that are not UTF-8 (and lone surrogates, NULs) escaped."""
    text = text.replace("\x00", "\\x00")
    try:
        raw = os.fsencode(text)  # the bytes a file name was read from, back
    except UnicodeEncodeError:  # a lone surrogate that no file name was decoded to
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def _check_path(path: Path) -> None:
    try:
        check_text(str(path), "path")
    except InvalidInputError:
        raise PipelineDefinitionError(
            f"pipeline file {_shown(str(path))}: its path is not valid UTF-8, so it cannot be "
            "stored as the execution's reference; rename it (or its folder)"
        ) from None


def _storable_ref(ref: str) -> str:
    try:
        return check_text(ref, "reference")
    except InvalidInputError as exc:
        raise PipelineDefinitionError(
            f"pipeline reference {_shown(ref)} cannot be stored (it {exc.reason}); rename "
            "what it names"
        ) from None


def _split(ref: str) -> tuple[str, str | None]:
    ref = ref.strip()
    head, sep, tail = ref.rpartition(":")
    # "C:\\x\\p.py" or "dir/with:colon/p.py": the part after ':' is a path, not a NAME.
    if not sep or not tail or "/" in tail or "\\" in tail or tail.endswith(".py"):
        return ref, None
    return head, tail


def _looks_like_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target or Path(target).is_file()


def _import_file(path: Path, given: str) -> ModuleType:
    if not path.exists():
        raise PipelineDefinitionError(f"pipeline file {given} not found (looked for {path})")
    if not path.is_file():
        raise PipelineDefinitionError(f"pipeline file {given} is not a file")
    stem = re.sub(r"\W", "_", path.stem)
    name = f"{USERFILE_PREFIX}{stem}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PipelineDefinitionError(f"pipeline file {given} is not a Python file")
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise PipelineDefinitionError(
            f"importing pipeline file {path} failed: {_describe(exc)}"
        ) from exc
    return module


def _import_module(target: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(f"{exc.name}.")):
            raise PipelineDefinitionError(
                f"no module named {target!r} (for a file, give FILE.py:NAME)"
            ) from exc
        raise PipelineDefinitionError(
            f"importing module {target} failed: {_describe(exc)}"
        ) from exc
    except (Exception, SystemExit) as exc:
        raise PipelineDefinitionError(
            f"importing module {target} failed: {_describe(exc)}"
        ) from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _pipelines(module: ModuleType, kinds: tuple[type, ...]) -> dict[str, Any]:
    """The module's pipelines by variable name, each object once (first name wins)."""
    found: dict[str, Any] = {}
    seen: set[int] = set()
    for var, value in vars(module).items():
        if isinstance(value, kinds) and id(value) not in seen:
            seen.add(id(value))
            found[var] = value
    return found


def _listing(found: dict[str, Any], what: str = "Pipeline") -> str:
    if not found:
        return f"it defines no {what}"
    names = ", ".join(
        var if var == p.name else f"{var} (named {p.name!r})" for var, p in found.items()
    )
    return f"its pipelines: {names}"


def _pick(
    module: ModuleType, name: str | None, where: str, kinds: tuple[type, ...], what: str
) -> Any:
    found = _pipelines(module, kinds)
    if name is None:
        if len(found) == 1:
            return next(iter(found.values()))
        raise PipelineDefinitionError(
            f"{where} defines {len(found) or 'no'} pipeline{'s' if len(found) != 1 else ''}: "
            f"add :NAME to the reference ({_listing(found, what)})"
        )
    value = vars(module).get(name)
    if isinstance(value, kinds):
        return value
    by_name = [p for p in found.values() if p.name == name]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        raise PipelineDefinitionError(
            f"{where} defines {len(by_name)} pipelines named {name!r}: use the variable name "
            f"({_listing(found, what)})"
        )
    if value is not None:
        raise PipelineDefinitionError(
            f"{name!r} in {where} is a {type(value).__name__}, not a "
            f"{what} ({_listing(found, what)})"
        )
    raise PipelineDefinitionError(f"no pipeline {name!r} in {where} ({_listing(found, what)})")


class KnownPipelines:
    """The pipelines a process runs steps of (a worker): those given by name, and those loaded
    from the reference stored with each execution, loaded once per reference (thread-safe).

    :meth:`get` prefers the referenced pipeline; one whose reference does not load (logged
    once per attempt, naming the execution) or loads a pipeline of another name falls back to
    the one given by name, and None means neither is known here."""

    def __init__(self, pipelines: Iterable[Pipeline] = (), *, owner: str = "") -> None:
        self._by_name = {p.name: p for p in pipelines}
        self._by_ref: dict[str, Pipeline] = {}
        self._lock = threading.Lock()
        self._owner = owner

    def get(self, name: str, ref: str | None, execution_id: str) -> Pipeline | None:
        """The pipeline ``name`` of execution ``execution_id``, stored with reference ``ref``."""
        with self._lock:
            if ref:
                found = self._by_ref.get(ref)
                if found is None:
                    try:
                        found = resolve_pipeline(ref).pipeline
                    except Exception as exc:  # user code: any error fails just its steps
                        _log.error(
                            "%s cannot load pipeline %r for execution %s: %s",
                            self._owner or "this process",
                            ref,
                            execution_id[:8],
                            exc,
                        )
                        found = self._by_name.get(name)
                    else:
                        self._by_ref[ref] = found
                if found is not None and found.name == name:
                    return found
            return self._by_name.get(name)
