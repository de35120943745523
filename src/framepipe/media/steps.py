"""Ready job steps for the media toolkit: each operation as a step of a :class:`Pipeline`.

::

    from framepipe import Pipeline
    from framepipe.media.steps import Input, media_step

    publish = Pipeline("publish")
    media_step(publish, "normalise", source="video", width=Input("width", 1280), fps=25)
    media_step(publish, "watermark", source="normalise", text="ACME")
    media_step(publish, "concat", source=["intro", "watermark", "outro"])
    media_step(publish, "thumbnail", source="concat", width=320)

``media_step(pipeline, operation, ...)`` adds a step running one of :data:`OPERATIONS`
(``probe``, ``normalise``, ``extract_frames``, ``stitch``, ``thumbnail``, ``thumbnail_grid``,
``watermark``, ``concat``, ``decode_qr``) with the function's own options (checked when the
step is added; an :class:`Input` option is read from the execution's inputs when the step
runs). Inside a step of your own, :func:`run_media` does the same work.

Sources. A source string is, in this order: the name of a step of the pipeline (its output:
the file it uploaded, or the folder of frames ``extract_frames`` uploaded; ``media_step`` adds
it to ``depends_on``), the name of an execution input (whose value is a local path or an object
key), or itself a local path or an object key. For ``stitch`` it is a folder of images: a local
folder, an object-key prefix, or an ``extract_frames`` step. An :class:`ObjectKey` source is an
object key (a prefix for ``stitch``) and nothing else: give a key a client named (an input's
value, or a key a step passed on from one, as the ML video pipeline's ``input_key``) this way
to :func:`run_media`, so it is never read as a name, nor as a file of the worker's disk.
``concat`` takes a list of sources; ``watermark``'s ``image`` option and ``stitch``'s ``audio``
option (the video whose sound goes under the frames) are sources too (given as a string, or
read from an input with :class:`Input`; a step named there is a dependency).

Which local files an input may name is the execution's, not the step's, to say: every value
taken from the inputs goes through :func:`framepipe.jobs.inputs.local_input` with the
execution's recorded roots (:attr:`StepContext.input_roots`). Submitted over HTTP (roots: the
setting ``FRAMEPIPE_INPUT_ROOTS``, none by default), an input is a local file only as an
absolute path inside a root, read by a copy that follows no link; any other absolute path
fails the step with :class:`~framepipe.errors.PathNotAllowedError` worded alike whether the
file exists or not, before anything is read or uploaded; a relative value is an object key,
never a file of the server's working folder. Submitted from the command line or the Python
API (no roots), an input naming an existing local file or folder is read where it is, as
before. A declared :data:`~framepipe.jobs.inputs.LocalPathOrKey` input keeps the kind the
submit gave it and is checked against the roots again. Sources written in the pipeline's code
and the outputs of steps are the pipeline author's and are taken as they are; a value a client
chose that the code passes on must be wrapped in :class:`ObjectKey` (a plain string would be
read as a local path when a file of that name exists in the worker's working folder).

What every step guarantees:

- it works in a temporary folder of its own (:meth:`StepContext.tempdir`), removed when the
  step ends, completed or failed; objects it reads are downloaded there;
- outputs are uploaded to the object store only after the operation succeeded, under ``key``
  (a template; default :data:`DEFAULT_KEY`): a failed step uploads nothing (``extract_frames``
  uploads its images one by one at the end, so a failure *during* those uploads can leave
  some, which a retry overwrites);
- progress: downloading is 0-10 % of the step, the operation 10-90 % (frames done / total, as
  the function reports it), uploading 90-100 %, and the step reports 100 % when done; a step
  that calls :func:`run_media` more than once gives each call its part of the step (``span``)
  and the same percentages apply within it; the step's progress never goes back, whatever
  the calls' spans;
- a cancelled execution (or an engine shutting down) stops the step at the next frame, packet
  or image its operation handles, with :class:`~framepipe.errors.StepCancelledError`, writing
  and uploading nothing more (a step is not otherwise stopped between two progress reports,
  and a clip whose length its header does not tell, as a raw ``.h264`` stream, gives none);
- a media failure is a :class:`~framepipe.errors.MediaError` naming the user's file (the
  object key or local path the source named, never the temporary copy); that includes a
  video larger than the picture-size limit (the ``max_pixels`` option, else the setting
  ``FRAMEPIPE_MEDIA_MAX_PIXELS``, read when the step runs and passed to the function, which
  reads no setting itself), refused before it is decoded, so a retry after raising the limit
  (or replacing the file) runs it, and a video longer than the length limit (the
  ``max_duration`` and ``max_frame_count`` options, else the settings
  ``FRAMEPIPE_MEDIA_MAX_DURATION`` and ``FRAMEPIPE_MEDIA_MAX_FRAME_COUNT``, passed in alike;
  not ``probe``'s), refused from its header or stopped at the frame that passes the limit,
  uploading nothing; a bad setting fails the step with :class:`~framepipe.errors.ConfigError`
  naming it;
- it returns ``{step_name: result}`` (merged into the execution's data), the result a JSON
  dict: ``key``, ``size`` and ``info`` (:class:`~framepipe.media.MediaInfo` fields, ``path``
  replaced by the key) for a video; ``key``, ``size``, ``width``, ``height`` for an image;
  ``prefix``, ``keys`` (up to :data:`MAX_LISTED_KEYS`), ``count``, ``size`` for frames;
  ``info`` for ``probe``; ``text``, ``codes``, ``unreadable_frames``, ``frames_scanned`` for
  ``decode_qr``. Every result also names its ``source``.

This module defines the steps and checks them when they are added; how one of them runs (its
sources found and fetched, the operation, the uploads) is :mod:`framepipe.media.step_run`.
"""

from __future__ import annotations

import inspect
import shutil
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from framepipe.errors import StepParamsError
from framepipe.jobs.context import StepContext
from framepipe.jobs.pipeline import Pipeline, Step
from framepipe.media.concat import concat
from framepipe.media.frames import extract_frames, stitch
from framepipe.media.normalise import normalise
from framepipe.media.probe import probe
from framepipe.media.qr import decode_qr
from framepipe.media.step_run import (
    MAX_LISTED_KEYS,
    SOURCE_OPTIONS,
    FromInput,
    ObjectKey,
    OpSpec,
    Source,
    StepRun,
)
from framepipe.media.thumbnails import thumbnail, thumbnail_grid
from framepipe.media.watermark import watermark

__all__ = [
    "DEFAULT_KEY",
    "MAX_LISTED_KEYS",
    "OPERATIONS",
    "Input",
    "ObjectKey",
    "Operation",
    "media_step",
    "run_media",
]

Operation = Literal[
    "probe",
    "normalise",
    "extract_frames",
    "stitch",
    "thumbnail",
    "thumbnail_grid",
    "watermark",
    "concat",
    "decode_qr",
]
OPERATIONS: tuple[str, ...] = get_args(Operation)

DEFAULT_KEY = "media/{execution_id}/{step}{ext}"
"""Where outputs go. Fields: ``execution_id``, ``pipeline``, ``step`` (the step's name),
``step_key``, ``attempt``, ``ext`` (``.mp4``, ``.jpg``; empty for ``extract_frames``, whose
key is the prefix its images go under) and ``inputs`` (``{inputs[name]}``)."""


@dataclass(frozen=True)
class Input:
    """An option taken from the execution's inputs when the step runs: ``inputs[name]``, or
    ``default`` when the input is absent (no default: the step fails naming the input)."""

    name: str
    default: Any = inspect.Parameter.empty


_OPS: dict[str, OpSpec] = {
    "probe": OpSpec(probe, "", ("path",)),
    "normalise": OpSpec(normalise, ".mp4", ("src", "dst", "progress")),
    "extract_frames": OpSpec(extract_frames, "/", ("src", "out_dir", "progress")),
    "stitch": OpSpec(stitch, ".mp4", ("frames", "dst", "progress")),
    "thumbnail": OpSpec(thumbnail, ".jpg", ("src", "dst")),
    "thumbnail_grid": OpSpec(thumbnail_grid, ".jpg", ("src", "dst", "progress")),
    "watermark": OpSpec(watermark, ".mp4", ("src", "dst", "progress")),
    "concat": OpSpec(concat, ".mp4", ("parts", "dst", "progress")),
    "decode_qr": OpSpec(decode_qr, "", ("src", "progress")),
}


def _op(operation: str) -> OpSpec:
    try:
        return _OPS[operation]
    except KeyError:
        raise ValueError(
            f"unknown media operation {operation!r}; one of: {', '.join(OPERATIONS)}"
        ) from None


def _check_options(operation: str, options: Mapping[str, Any], pipeline: str, step: str) -> None:
    op = _op(operation)
    params = inspect.signature(op.fn).parameters
    allowed = [n for n in params if n not in op.reserved]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise StepParamsError(
            f"{operation} takes no option(s) {', '.join(unknown)} (its "
            f"options: {', '.join(allowed)})",
            pipeline=pipeline,
            step_key=step,
        )


def _check_key(template: str, pipeline: str, step: str) -> None:
    fields = {
        "execution_id": "x",
        "pipeline": "p",
        "step": "s",
        "step_key": "k",
        "attempt": 1,
        "ext": ".mp4",
        "inputs": _AnyInputs(),
    }
    try:
        string.Formatter().vformat(template, (), fields)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise StepParamsError(
            f"bad key template {template!r}: {exc!r} (fields: {', '.join(sorted(fields))})",
            pipeline=pipeline,
            step_key=step,
        ) from exc


class _AnyInputs(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "v"


def media_step(
    pipeline: Pipeline,
    operation: Operation,
    *,
    name: str | None = None,
    source: Source | Sequence[Source] = "input",
    key: str = DEFAULT_KEY,
    depends_on: Iterable[str] = (),
    retries: int = 0,
    weight: float = 1.0,
    retry_delay: float | None = None,
    **options: Any,
) -> Step:
    """Add a step to ``pipeline`` that runs media ``operation`` on ``source``; return it.

    ``name`` defaults to the operation's name. ``source`` is a step name, an input name, a
    local path or an object key, or an :class:`ObjectKey` (see the module's docs; a list for
    ``concat``); a source that names a step already in the pipeline is added to
    ``depends_on``. ``key`` is the template of
    the output's object key (:data:`DEFAULT_KEY`). ``options`` are the operation's own keyword
    options (``width=``, ``fps=``, ``text=`` ...), checked now: an unknown option or a bad key
    template raises :class:`~framepipe.errors.StepParamsError` before anything runs. The step
    returns ``{name: result}`` (see :func:`run_media`)."""
    step_name = name or operation
    _check_options(operation, options, pipeline.name, step_name)
    _check_key(key, pipeline.name, step_name)
    refs = [source] if isinstance(source, (str, ObjectKey)) else list(source)
    if not refs:
        raise StepParamsError("source is empty", pipeline=pipeline.name, step_key=step_name)
    if operation != "concat" and len(refs) != 1:
        raise StepParamsError(
            f"{operation} takes one source, not {len(refs)} (only concat takes a list)",
            pipeline=pipeline.name,
            step_key=step_name,
        )
    named = options.get(SOURCE_OPTIONS.get(operation, ""))
    upstream = [r for r in [*refs, named] if isinstance(r, str) and pipeline.get(r) is not None]
    deps = [*([depends_on] if isinstance(depends_on, str) else depends_on), *upstream]
    frozen = dict(options)
    src: Source | list[Source] = refs if operation == "concat" else refs[0]

    def run(ctx: StepContext) -> dict[str, Any]:
        return {ctx.step_name: run_media(ctx, operation, src, key=key, **frozen)}

    run.__name__ = run.__qualname__ = f"media_{operation}"
    run.__doc__ = f"media {operation} of {source!r} (framepipe.media.steps)"
    return pipeline.add_step(
        run,
        name=step_name,
        depends_on=deps,
        retries=retries,
        weight=weight,
        retry_delay=retry_delay,
    )


def run_media(
    ctx: StepContext,
    operation: Operation,
    source: Source | Sequence[Source],
    *,
    key: str = DEFAULT_KEY,
    span: tuple[float, float] = (0.0, 100.0),
    **options: Any,
) -> dict[str, Any]:
    """Run media ``operation`` on ``source`` inside the step ``ctx``; return its JSON result.

    The guarantees are the module's: a temporary folder removed afterwards (failed or not),
    uploads under ``key`` only after success, progress over ``span`` of the step (low, high
    within 0-100; all of it by default) ending at its high end, never going back within the
    step, a :class:`MediaError` naming the user's file. A key a client named is given as an
    :class:`ObjectKey`. Calling it more than once in one step: give each call its own ``key``
    (the default names the step, so the second output of the same kind would replace the
    first) and its own ``span`` (e.g. ``(0, 30)`` then ``(30, 100)``; a later call whose span
    lies below what an earlier one reported shows no progress until it passes it)."""
    op = _op(operation)
    _check_options(operation, options, ctx.pipeline.name, ctx.step_key)
    run = StepRun(ctx, operation, op, ctx.tempdir(), key, span)
    try:
        return run.run(source, _resolve_inputs(ctx, operation, options))
    finally:
        shutil.rmtree(run.work, ignore_errors=True)


def _resolve_inputs(ctx: StepContext, operation: str, options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for option, given in options.items():
        if not isinstance(given, Input):
            out[option] = given
        elif given.name in ctx.inputs:
            value = ctx.inputs[given.name]
            # A file named by an input is read as that input (the execution's roots apply).
            out[option] = (
                FromInput(given.name)
                if option == SOURCE_OPTIONS.get(operation) and isinstance(value, str)
                else value
            )
        elif given.default is not inspect.Parameter.empty:
            out[option] = given.default
        else:
            raise StepParamsError(
                f"option {option}= reads input {given.name!r}, which this execution does not have",
                pipeline=ctx.pipeline.name,
                step_key=ctx.step_key,
            )
    return out
