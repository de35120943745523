"""Declared inputs: a pipeline's inputs validated, and its local paths confined, before an
execution of it exists.

A pipeline declares its inputs with a Pydantic model; a field of type :data:`LocalPathOrKey`
names a file, as a local path or an object key::

    class Inputs(BaseModel):
        model_config = ConfigDict(extra="forbid")   # a misspelt input is refused too
        video: LocalPathOrKey
        width: int = Field(640, ge=2)

    publish = Pipeline("publish", inputs=Inputs)

    @publish.step()
    def fetch(ctx):
        inputs = load_inputs(Inputs, ctx.inputs)
        path = local_path(inputs.video)        # None: an object key
        ...

Guarantees (:func:`validate_inputs`, which :meth:`JobEngine.submit` runs in both modes, before
anything is stored):

* inputs that do not fit the model are refused with
  :class:`~framepipe.errors.InvalidInputError` whose ``where`` names the field
  (``inputs.width``); no execution is created, so nothing is tried, let alone retried;
* what is stored is the model's JSON (values coerced, defaults filled in, paths in canonical
  form), so the record says what the execution runs with;
* a :data:`LocalPathOrKey` value is stored as either an absolute path, resolved (every link
  followed, so the stored path holds none), or an object key (relative). Which one is decided
  at submit, never by looking at a disk when the step runs:

  - with ``input_roots`` given (a list of folders; the HTTP service passes the setting
    ``input_roots``): an absolute path must lie inside one of them once resolved, else
    :class:`~framepipe.errors.PathNotAllowedError`, worded the same whether the path exists
    or not (:func:`framepipe.confined.confine`); ``[]`` refuses every local path. Any other
    value is an object key (its syntax checked); it is never looked up on the disk, where a
    relative path would be relative to the server's working folder;
  - without ``input_roots`` (``None``: the command line and the Python API, whose users own
    the machine): a path that exists, relative to the working folder or absolute, and any
    absolute path, is a local path, resolved; anything else is an object key.

How the confinement travels with the execution: the roots do not. The submit records the
resolved path, which was inside a root and held no link when it was checked, in the stored
inputs, which only the submit writes (a client gives inputs to the submit, never to a step).
When the step runs, on this machine or a worker in another process, it reads the file with
:func:`copy_local_file`, which opens every folder on that path without following a link: so
it reads that very path or fails (a link planted on it after the submit is an error naming
it), and it never needs the roots or the submitter's settings. Workers must see the path as
the submitting machine did (one machine, or a shared volume mounted at the same place).

A pipeline without an inputs model gets its inputs as given (storable JSON within
``max_inputs_bytes``, nothing more): its steps must treat them as untrusted.
"""

from __future__ import annotations

import os
import shutil
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ValidationError, ValidationInfo

from framepipe.backends.objects.base import validate_key
from framepipe.confined import confine, open_beneath
from framepipe.errors import InvalidInputError, InvalidKeyError
from framepipe.untrusted import check_json

__all__ = ["LocalPathOrKey", "copy_local_file", "load_inputs", "local_path",
           "path_or_key_fields", "validate_inputs"]

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


class _PathOrKeyMarker:
    """Marks a field as a :data:`LocalPathOrKey` (found by :func:`path_or_key_fields`)."""

    def __repr__(self) -> str:
        return "LocalPathOrKey"


_MARKER = _PathOrKeyMarker()

LocalPathOrKey = Annotated[str, AfterValidator(_path_or_key), _MARKER]
"""A field naming a file as a local path or an object key; stored as an absolute, resolved
path (confined at submit when the submitter gives roots) or as a relative object key. Read it
with :func:`local_path` and :func:`copy_local_file`."""


def validate_inputs(model: type[BaseModel], inputs: Mapping[str, Any], *,
                    input_roots: Iterable[str | os.PathLike[str]] | None = None,
                    where: str = "inputs") -> dict[str, Any]:
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
            problems.append((field, f"{error['msg']}, not {_shown(error.get('input'))}",
                             None))
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
    object key."""
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
    try:
        # O_NONBLOCK: opening a FIFO planted there must not wait for a writer
        fd = open_beneath("/", parts, os.O_RDONLY | os.O_NONBLOCK, where=text)
    except FileNotFoundError:
        raise FileNotFoundError(2, "no such file", text) from None
    with os.fdopen(fd, "rb") as src, open(dest, "xb") as out:
        shutil.copyfileobj(src, out, _COPY_CHUNK)
    return dest


def _marked(annotation: Any) -> bool:
    if annotation is LocalPathOrKey:
        return True
    metadata = getattr(annotation, "__metadata__", ())
    return any(m is _MARKER for m in metadata) or any(
        _marked(arg) for arg in typing.get_args(annotation))


def path_or_key_fields(model: type[BaseModel]) -> frozenset[str]:
    """The inputs (by the name they are stored under) that ``model`` declares as
    :data:`LocalPathOrKey`, also inside ``Optional`` or a union."""
    names = set()
    for name, field in model.model_fields.items():
        if any(m is _MARKER for m in field.metadata) or _marked(field.annotation):
            names.add(field.alias or name)
    return frozenset(names)
