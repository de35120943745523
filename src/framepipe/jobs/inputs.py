"""Declared inputs and local paths: a pipeline's inputs validated, and the local files they
name confined, before an execution of it exists and again when a step reads them.

A pipeline declares its inputs with a Pydantic model; a field of type :data:`LocalPathOrKey`
names a file, as a local path or an object key, one of type :data:`LocalPath` a local file or
folder (never an object key)::

    class Inputs(BaseModel):
        model_config = ConfigDict(extra="forbid")   # a misspelt input is refused too
        video: LocalPathOrKey
        width: int = Field(640, ge=2)

    publish = Pipeline("publish", inputs=Inputs)

    @publish.step()
    def fetch(ctx):
        inputs = load_inputs(Inputs, ctx.inputs)
        path = local_input(ctx, inputs.video, where="inputs.video", declared=True)
        if path is None:                          # an object key
            ...
        copy = copy_local_file(path, ctx.tempdir() / path.name)

**The rule** (one rule, in both modes, for declared and undeclared inputs): the submitter
decides which local files an execution may name, and the execution keeps that decision.

* :meth:`JobEngine.submit(..., input_roots=) <framepipe.jobs.engine.JobEngine.submit>` records
  ``input_roots`` with the execution (:func:`recorded_roots`: resolved absolute folders),
  embedded or distributed. ``None`` (the command line, the Python API, whose users own the
  machine) leaves local paths unrestricted; a list confines them to those folders (the HTTP
  service passes the setting ``input_roots``, ``FRAMEPIPE_INPUT_ROOTS``; ``[]``, its default,
  allows no local path at all, only object keys). Only the submit writes it; a retry keeps
  it; no client sets it. A step sees it as :attr:`StepContext.input_roots
  <framepipe.jobs.context.StepContext.input_roots>`, on this machine or on a worker.
* :func:`local_input` is the one way a step turns an input value into a local file: with
  roots, only an absolute path that lies inside one of them once resolved
  (:func:`framepipe.confined.confine`: :class:`~framepipe.errors.PathNotAllowedError`, worded
  the same whether the path exists or not), and a relative value is an object key, never
  looked up on the disk (where it would be relative to the server's working folder);
  without roots, today's convenience: an existing path, relative or absolute, is local.
  The media steps (:mod:`framepipe.media.steps`) read every input through it.

Guarantees at submit (:func:`validate_inputs`, which :meth:`JobEngine.submit` runs in both
modes, before anything is stored):

* inputs that do not fit the model are refused with
  :class:`~framepipe.errors.InvalidInputError` whose ``where`` names the field
  (``inputs.width``); no execution is created, so nothing is tried, let alone retried;
* what is stored is the model's JSON (values coerced, defaults filled in, paths in canonical
  form), so the record says what the execution runs with;
* a :data:`LocalPathOrKey` value is stored as either an absolute path, resolved (every link
  followed, so the stored path holds none), or an object key (relative). Which one is decided
  at submit, never by looking at a disk when the step runs (read it with ``declared=True``):

  - with ``input_roots`` given: an absolute path must lie inside one of them once resolved,
    else :class:`~framepipe.errors.PathNotAllowedError` (same wording whether it exists or
    not); any other value is an object key (its syntax checked);
  - without: a path that exists, relative to the working folder or absolute, and any
    absolute path, is a local path, resolved; anything else is an object key;
* a :data:`LocalPath` value (a shared folder, say) is stored absolute and resolved; with
  ``input_roots`` it must be absolute and inside a root, like a local :data:`LocalPathOrKey`.

When a step runs, a declared value is checked again against the execution's roots by
:func:`local_input` (defense in depth: a link planted on the path after the submit that leads
out of the roots is refused), and :func:`copy_local_file` then reads it opening every folder
without following a link, so what it reads is the very path that was checked, or it fails
naming the link. Workers must see the paths as the submitting machine did (one machine, or a
shared volume mounted at the same place).

A pipeline without an inputs model gets its inputs as given (storable JSON within
``max_inputs_bytes``, nothing more): the submit cannot tell which of them name files, so its
steps must read any file an input names through :func:`local_input`, which applies the
execution's roots when the step runs.
"""

from __future__ import annotations

import os
import shutil
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError, ValidationInfo

from framepipe.backends.objects.base import validate_key
from framepipe.confined import confine, open_beneath
from framepipe.errors import InvalidInputError, InvalidKeyError
from framepipe.untrusted import check_json, check_text

__all__ = [
    "HasInputRoots",
    "LocalPath",
    "LocalPathOrKey",
    "copy_local_file",
    "declared_path_fields",
    "load_inputs",
    "local_input",
    "local_path",
    "path_or_key_fields",
    "recorded_roots",
    "validate_inputs",
]

M = TypeVar("M", bound=BaseModel)

_SUBMIT = "framepipe.submit"  # key of the validation context at submit (absent afterwards)
_COPY_CHUNK = 1 << 20


def _path_or_key(value: str, info: ValidationInfo) -> str:
    """A :data:`LocalPathOrKey` in canonical form (see the module); at submit only, so stored
    values, read again when a step runs, are taken as they were stored."""
    context = info.context if isinstance(info.context, Mapping) else {}
    if _SUBMIT not in context:
        return value
    roots: tuple[Path, ...] | None = context[_SUBMIT]
    field = info.field_name or "input"
    if roots is not None:
        if os.path.isabs(value):
            return str(confine(value, roots, where=field))
    elif os.path.isabs(value) or os.path.lexists(value):
        return os.path.realpath(value)
    try:
        return validate_key(value)
    except InvalidKeyError as exc:
        if roots is not None:
            raise InvalidInputError(str(exc), where=field) from None
        raise InvalidInputError(f"no local file by that name, and {exc}", where=field) from None


def _local(value: str, info: ValidationInfo) -> str:
    """A :data:`LocalPath` in canonical form (absolute, resolved; confined with roots); at
    submit only, like :func:`_path_or_key`."""
    context = info.context if isinstance(info.context, Mapping) else {}
    if _SUBMIT not in context:
        return value
    roots: tuple[Path, ...] | None = context[_SUBMIT]
    field = info.field_name or "input"
    check_text(value, field)
    if not value.strip():
        raise InvalidInputError("is an empty path", where=field)
    if roots is None:
        return os.path.realpath(value)
    if not os.path.isabs(value):
        raise InvalidInputError(
            f"{value!r} is relative; an absolute local path is needed", where=field
        )
    return str(confine(value, roots, where=field))


class _Marker:
    """Marks a field as :data:`LocalPathOrKey` or :data:`LocalPath` (found by
    :func:`path_or_key_fields` and :func:`declared_path_fields`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_MARKER = _Marker("LocalPathOrKey")
_LOCAL_MARKER = _Marker("LocalPath")

LocalPathOrKey = Annotated[str, AfterValidator(_path_or_key), _MARKER]
"""A field naming a file as a local path or an object key; stored as an absolute, resolved
path (confined at submit when the submitter gives roots) or as a relative object key. Read it
with :func:`local_input` (``declared=True``) and :func:`copy_local_file`."""

LocalPath = Annotated[str, AfterValidator(_local), _LOCAL_MARKER]
"""A field naming a local file or folder, never an object key; stored absolute and resolved,
and with the submitter's roots it must be an absolute path inside one of them
(:class:`~framepipe.errors.PathNotAllowedError` otherwise, worded the same whether it exists
or not). Read it with :func:`local_input` (``declared=True``), which checks it again."""


class HasInputRoots(Protocol):
    """What :func:`local_input` reads of a step's context: the execution's
    :attr:`~framepipe.jobs.context.StepContext.input_roots` (None: unrestricted)."""

    @property
    def input_roots(self) -> tuple[Path, ...] | None: ...


def recorded_roots(input_roots: Iterable[str | os.PathLike[str]] | None) -> list[str] | None:
    """``input_roots`` as an execution records them: None stays None (unrestricted), else
    each folder resolved (links followed) and absolute, in order, without repeats. Touches
    the file system (run it off the event loop)."""
    if input_roots is None:
        return None
    recorded: list[str] = []
    for root in input_roots:
        text = os.fspath(root)
        check_text(text, "input_roots")
        resolved = os.path.realpath(text)
        if resolved not in recorded:
            recorded.append(resolved)
    return recorded


def local_input(
    ctx: HasInputRoots, value: str, *, where: str, declared: bool = False
) -> Path | None:
    """The local file (or folder) that the input ``value`` names, or None when it is to be
    taken as an object key; the one way a step should turn an input into a local path.

    With ``ctx.input_roots`` (the submitter was confined): only an absolute path, which must
    lie inside one of the roots once resolved, is local; it is returned resolved, and
    :class:`~framepipe.errors.PathNotAllowedError` naming ``where`` says the same whether it
    exists or not. A relative value is an object key and is never looked up on the disk.
    Without roots (``None``: the command line, the Python API): a path that exists, relative
    or absolute, is local (returned absolute), anything else an object key.

    ``declared``: ``value`` is a stored :data:`LocalPathOrKey` or :data:`LocalPath`, whose
    kind the submit decided: absolute is local (checked against the roots again when there
    are some), anything else an object key, whatever the disk holds.

    Read what it returns with :func:`copy_local_file` (or
    :func:`framepipe.confined.open_beneath`), which follows no link, so what is read is the
    path that was checked."""
    roots = ctx.input_roots
    text = check_text(value, where)
    if roots is None and not declared:
        return Path(os.path.abspath(text)) if os.path.exists(text) else None
    if not os.path.isabs(text):
        return None
    if roots is None:
        return Path(text)
    return confine(text, roots, where=where)


def validate_inputs(
    model: type[BaseModel],
    inputs: Mapping[str, Any],
    *,
    input_roots: Iterable[str | os.PathLike[str]] | None = None,
    where: str = "inputs",
) -> dict[str, Any]:
    """``inputs`` validated against ``model``, as they are to be stored (see the module): the
    model's JSON, by alias. Refusals are :class:`InvalidInputError` (or its subclass
    :class:`PathNotAllowedError`) naming the first wrong field as ``where.field``; the
    message also lists the others."""
    roots = None if input_roots is None else tuple(Path(r) for r in input_roots)
    try:
        parsed = model.model_validate(dict(inputs), context={_SUBMIT: roots})
    except ValidationError as exc:
        raise _refusal(exc, where) from None
    stored = parsed.model_dump(mode="json", by_alias=True)
    check_json(stored, where)
    return stored


def _location(loc: tuple[int | str, ...], where: str) -> str:
    text = where
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _refusal(exc: ValidationError, where: str) -> InvalidInputError:
    """One :class:`InvalidInputError` for a model's validation errors (the first one's class
    and field; the others named in the message)."""
    errors = exc.errors(include_url=False)
    problems: list[tuple[str, str, InvalidInputError | None]] = []
    for error in errors:
        field = _location(tuple(error["loc"]), where)
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, InvalidInputError):
            problems.append((field, cause.reason, cause))
        elif error["type"] == "missing":
            problems.append((field, "is required", None))
        elif error["type"] == "extra_forbidden":
            problems.append((field, "is not an input of this pipeline", None))
        else:
            problems.append((field, f"{error['msg']}, not {_shown(error.get('input'))}", None))
    field, message, cause = problems[0]
    if len(problems) > 1:
        message += "; also " + "; ".join(f"{f}: {m}" for f, m, _ in problems[1:])
    kind = type(cause) if cause is not None else InvalidInputError
    return kind(message, where=field)


def load_inputs(model: type[M], inputs: Mapping[str, Any]) -> M:
    """The stored inputs of an execution (``ctx.inputs``) as ``model``, for a step to read:
    typed, with defaults. Values are taken as the submit stored them (no path is looked up or
    confined again: see the module). An execution stored before its pipeline declared the
    model may not fit it: inputs the model does not know are left out when it forbids them,
    and a value that does not fit is an :class:`InvalidInputError` naming it."""
    values = dict(inputs)
    if model.model_config.get("extra") == "forbid":
        known = {f.alias or n for n, f in model.model_fields.items()} | set(model.model_fields)
        values = {k: v for k, v in values.items() if k in known}
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        raise _refusal(exc, "inputs") from None


def local_path(value: str) -> Path | None:
    """The local path a stored :data:`LocalPathOrKey` value names, or None when it is an
    object key. It does not check the execution's roots again: in a step, prefer
    :func:`local_input` with ``declared=True``."""
    return Path(value) if os.path.isabs(value) else None


def copy_local_file(path: str | os.PathLike[str], dest: Path) -> Path:
    """Copy the local file ``path`` (a stored :data:`LocalPathOrKey`: absolute, resolved) to
    ``dest`` and return ``dest``, opening every folder on ``path`` without following a
    symbolic link, so what is copied is the file at that very path.

    A link (or something other than a folder) on the way, or a ``path`` that is not a regular
    file, raises :class:`~framepipe.confined.LinkRefusedError` (an
    :class:`~framepipe.errors.InvalidInputError`) naming it; a missing file
    :class:`FileNotFoundError` naming ``path``. ``dest`` is created exclusively (never written
    through a file or link already there)."""
    text = os.fspath(path)
    if not os.path.isabs(text):
        raise ValueError(f"{text!r} is not an absolute path")
    parts = Path(text).parts[1:]
    try:  # a FIFO planted there is refused at once (open_beneath opens it non-blocking)
        fd = open_beneath("/", parts, os.O_RDONLY, where=text)
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such file", text) from None
    with os.fdopen(fd, "rb") as src, open(dest, "xb") as out:
        shutil.copyfileobj(src, out, _COPY_CHUNK)
    return dest


def _is_marker(item: object, markers: tuple[_Marker, ...]) -> bool:
    return any(item is marker for marker in markers)


def _marked(annotation: Any, markers: tuple[_Marker, ...]) -> bool:
    metadata = getattr(annotation, "__metadata__", ())
    return any(_is_marker(m, markers) for m in metadata) or any(
        _marked(arg, markers) for arg in typing.get_args(annotation)
    )


def _fields(model: type[BaseModel], markers: tuple[_Marker, ...]) -> frozenset[str]:
    names = set()
    for name, field in model.model_fields.items():
        if any(_is_marker(m, markers) for m in field.metadata) or _marked(
            field.annotation, markers
        ):
            names.add(field.alias or name)
    return frozenset(names)


def path_or_key_fields(model: type[BaseModel]) -> frozenset[str]:
    """The inputs (by the name they are stored under) that ``model`` declares as
    :data:`LocalPathOrKey`, also inside ``Optional`` or a union."""
    return _fields(model, (_MARKER,))


def declared_path_fields(model: type[BaseModel]) -> frozenset[str]:
    """The inputs that ``model`` declares as :data:`LocalPathOrKey` or :data:`LocalPath`
    (whose kind the submit decided: read them with ``local_input(..., declared=True)``)."""
    return _fields(model, (_MARKER, _LOCAL_MARKER))
