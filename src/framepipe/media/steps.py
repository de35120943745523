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
folder, an object-key prefix, or an ``extract_frames`` step. ``concat`` takes a list of
sources; ``watermark``'s ``image`` option is a source too (given as a string, or read from an
input with :class:`Input`).

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
and the outputs of steps are the pipeline author's and are taken as they are.

What every step guarantees:

- it works in a temporary folder of its own (:meth:`StepContext.tempdir`), removed when the
  step ends, completed or failed; objects it reads are downloaded there;
- outputs are uploaded to the object store only after the operation succeeded, under ``key``
  (a template; default :data:`DEFAULT_KEY`): a failed step uploads nothing (``extract_frames``
  uploads its images one by one at the end, so a failure *during* those uploads can leave
  some, which a retry overwrites);
- progress: downloading is 0-10 % of the step, the operation 10-90 % (frames done / total, as
  the function reports it), uploading 90-100 %, and the step reports 100 % when done;
- a media failure is a :class:`~framepipe.errors.MediaError` naming the user's file (the
  object key or local path the source named, never the temporary copy); that includes a
  video larger than the picture-size limit (the ``max_pixels`` option, else the setting
  ``FRAMEPIPE_MEDIA_MAX_PIXELS``, read when the step runs and passed to the function, which
  reads no setting itself), refused before it is decoded, so a retry after raising the limit
  (or replacing the file) runs it; a bad setting fails the step with
  :class:`~framepipe.errors.ConfigError` naming it;
- it returns ``{step_name: result}`` (merged into the execution's data), the result a JSON
  dict: ``key``, ``size`` and ``info`` (:class:`~framepipe.media.MediaInfo` fields, ``path``
  replaced by the key) for a video; ``key``, ``size``, ``width``, ``height`` for an image;
  ``prefix``, ``keys`` (up to :data:`MAX_LISTED_KEYS`), ``count``, ``size`` for frames;
  ``info`` for ``probe``; ``text``, ``codes``, ``unreadable_frames``, ``frames_scanned`` for
  ``decode_qr``. Every result also names its ``source``.
"""

from __future__ import annotations

import inspect
import shutil
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import cv2

from framepipe.config import load_settings
from framepipe.errors import InvalidKeyError, MediaError, StepParamsError
from framepipe.jobs.context import StepContext
from framepipe.jobs.inputs import copy_local_file, declared_path_fields, local_input
from framepipe.jobs.pipeline import Pipeline, Step
from framepipe.media.concat import concat
from framepipe.media.frames import IMAGE_SUFFIXES, extract_frames, stitch
from framepipe.media.limits import DEFAULT_MAX_PIXELS
from framepipe.media.normalise import normalise
from framepipe.media.probe import MediaInfo, probe
from framepipe.media.qr import decode_qr
from framepipe.media.thumbnails import thumbnail, thumbnail_grid
from framepipe.media.watermark import watermark

__all__ = [
    "DEFAULT_KEY",
    "MAX_LISTED_KEYS",
    "OPERATIONS",
    "Input",
    "Operation",
    "media_step",
    "run_media",
]

Operation = Literal["probe", "normalise", "extract_frames", "stitch", "thumbnail",
                    "thumbnail_grid", "watermark", "concat", "decode_qr"]
OPERATIONS: tuple[str, ...] = get_args(Operation)

DEFAULT_KEY = "media/{execution_id}/{step}{ext}"
"""Where outputs go. Fields: ``execution_id``, ``pipeline``, ``step`` (the step's name),
``step_key``, ``attempt``, ``ext`` (``.mp4``, ``.jpg``; empty for ``extract_frames``, whose
key is the prefix its images go under) and ``inputs`` (``{inputs[name]}``)."""

MAX_LISTED_KEYS = 100
"""``extract_frames`` lists at most this many keys in its result (``count`` has them all)."""

_FETCH, _WORK, _UPLOAD = (0.0, 10.0), (10.0, 90.0), (90.0, 100.0)


@dataclass(frozen=True)
class Input:
    """An option taken from the execution's inputs when the step runs: ``inputs[name]``, or
    ``default`` when the input is absent (no default: the step fails naming the input)."""

    name: str
    default: Any = inspect.Parameter.empty


@dataclass(frozen=True)
class _Op:
    fn: Callable[..., Any]
    ext: str  # output suffix; "" for no file output, "/" for a folder of images
    reserved: tuple[str, ...]  # the function's parameters a step fills in itself


_OPS: dict[str, _Op] = {
    "probe": _Op(probe, "", ("path",)),
    "normalise": _Op(normalise, ".mp4", ("src", "dst", "progress")),
    "extract_frames": _Op(extract_frames, "/", ("src", "out_dir", "progress")),
    "stitch": _Op(stitch, ".mp4", ("frames", "dst", "progress")),
    "thumbnail": _Op(thumbnail, ".jpg", ("src", "dst")),
    "thumbnail_grid": _Op(thumbnail_grid, ".jpg", ("src", "dst", "progress")),
    "watermark": _Op(watermark, ".mp4", ("src", "dst", "progress")),
    "concat": _Op(concat, ".mp4", ("parts", "dst", "progress")),
    "decode_qr": _Op(decode_qr, "", ("src", "progress")),
}


def _op(operation: str) -> _Op:
    try:
        return _OPS[operation]
    except KeyError:
        raise ValueError(f"unknown media operation {operation!r}; one of: "
                         f"{', '.join(OPERATIONS)}") from None


def _check_options(operation: str, options: Mapping[str, Any], pipeline: str,
                   step: str) -> None:
    op = _op(operation)
    params = inspect.signature(op.fn).parameters
    allowed = [n for n in params if n not in op.reserved]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise StepParamsError(f"{operation} takes no option(s) {', '.join(unknown)} (its "
                              f"options: {', '.join(allowed)})", pipeline=pipeline,
                              step_key=step)


def _check_key(template: str, pipeline: str, step: str) -> None:
    fields = {"execution_id": "x", "pipeline": "p", "step": "s", "step_key": "k",
              "attempt": 1, "ext": ".mp4", "inputs": _AnyInputs()}
    try:
        string.Formatter().vformat(template, (), fields)
    except (KeyError, IndexError, ValueError, AttributeError) as exc:
        raise StepParamsError(f"bad key template {template!r}: {exc!r} (fields: "
                              f"{', '.join(sorted(fields))})", pipeline=pipeline,
                              step_key=step) from exc


class _AnyInputs(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "v"


def media_step(pipeline: Pipeline, operation: Operation, *, name: str | None = None,
               source: str | Sequence[str] = "input", key: str = DEFAULT_KEY,
               depends_on: Iterable[str] = (), retries: int = 0, weight: float = 1.0,
               retry_delay: float | None = None, **options: Any) -> Step:
    """Add a step to ``pipeline`` that runs media ``operation`` on ``source``; return it.

    ``name`` defaults to the operation's name. ``source`` is a step name, an input name, a
    local path or an object key (see the module's docs; a list for ``concat``); a source that
    names a step already in the pipeline is added to ``depends_on``. ``key`` is the template of
    the output's object key (:data:`DEFAULT_KEY`). ``options`` are the operation's own keyword
    options (``width=``, ``fps=``, ``text=`` ...), checked now: an unknown option or a bad key
    template raises :class:`~framepipe.errors.StepParamsError` before anything runs. The step
    returns ``{name: result}`` (see :func:`run_media`)."""
    step_name = name or operation
    _check_options(operation, options, pipeline.name, step_name)
    _check_key(key, pipeline.name, step_name)
    refs = [source] if isinstance(source, str) else list(source)
    if not refs:
        raise StepParamsError("source is empty", pipeline=pipeline.name, step_key=step_name)
    if operation != "concat" and len(refs) != 1:
        raise StepParamsError(f"{operation} takes one source, not {len(refs)} (only concat "
                              "takes a list)", pipeline=pipeline.name, step_key=step_name)
    image = options.get("image")
    upstream = [r for r in [*refs, image] if isinstance(r, str) and pipeline.get(r) is not None]
    deps = [*([depends_on] if isinstance(depends_on, str) else depends_on), *upstream]
    frozen = dict(options)
    src: str | list[str] = refs if operation == "concat" else refs[0]

    def run(ctx: StepContext) -> dict[str, Any]:
        return {ctx.step_name: run_media(ctx, operation, src, key=key, **frozen)}

    run.__name__ = run.__qualname__ = f"media_{operation}"
    run.__doc__ = f"media {operation} of {source!r} (framepipe.media.steps)"
    return pipeline.add_step(run, name=step_name, depends_on=deps, retries=retries,
                             weight=weight, retry_delay=retry_delay)


def run_media(ctx: StepContext, operation: Operation, source: str | Sequence[str], *,
              key: str = DEFAULT_KEY, **options: Any) -> dict[str, Any]:
    """Run media ``operation`` on ``source`` inside the step ``ctx``; return its JSON result.

    The guarantees are the module's: a temporary folder removed afterwards (failed or not),
    uploads under ``key`` only after success, progress 0-100 % of the step, a
    :class:`MediaError` naming the user's file. Calling it twice in one step: give each call
    its own ``key`` (the default names the step, so the second output of the same kind would
    replace the first)."""
    op = _op(operation)
    _check_options(operation, options, ctx.pipeline.name, ctx.step_key)
    work = ctx.tempdir()
    try:
        return _Run(ctx, operation, op, work, key).run(source, _resolve_inputs(ctx, options))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _resolve_inputs(ctx: StepContext, options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for option, given in options.items():
        if not isinstance(given, Input):
            out[option] = given
        elif given.name in ctx.inputs:
            value = ctx.inputs[given.name]
            # A file named by an input is read as that input (the execution's roots apply).
            out[option] = (_FromInput(given.name)
                           if option in _SOURCE_OPTIONS and isinstance(value, str) else value)
        elif given.default is not inspect.Parameter.empty:
            out[option] = given.default
        else:
            raise StepParamsError(f"option {option}= reads input {given.name!r}, which this "
                                  "execution does not have", pipeline=ctx.pipeline.name,
                                  step_key=ctx.step_key)
    return out


_SOURCE_OPTIONS = frozenset({"image"})  # options that name a file, read like a source


@dataclass(frozen=True)
class _FromInput:
    """A source option given as :class:`Input`: the input's name, so its value is read as an
    input (through :func:`local_input`), not as a source written in the pipeline's code."""

    name: str


class _Run:
    """One run of one operation in one step."""

    def __init__(self, ctx: StepContext, operation: str, op: _Op, work: Path,
                 key: str) -> None:
        self.ctx = ctx
        self.operation = operation
        self.op = op
        self.work = work
        self.key_template = key
        self.names: dict[Path, str] = {}  # local copy -> what the user named
        self._downloads = 0
        self._last = 0.0
        self.max_pixels = DEFAULT_MAX_PIXELS  # the operation's, for probing its output

    # -- progress -------------------------------------------------------------------------

    def report(self, span: tuple[float, float]) -> Callable[[float], None]:
        lo, hi = span

        def progress(pct: float) -> None:
            share = min(100.0, max(0.0, float(pct))) / 100.0
            value = lo + (hi - lo) * share
            if value > self._last:  # never backwards within the step
                self._last = value
                self.ctx.progress(value, self.operation)

        return progress

    # -- sources --------------------------------------------------------------------------

    def _lookup(self, ref: str) -> tuple[str, str, Path | None]:
        """(kind, value, local file). Kinds: ``prefix`` (an object prefix), ``key`` (an object
        key, never looked up on the disk), ``local`` (a local file allowed by the execution's
        roots, or a declared input's, given as the third item: copied without following
        links), ``path`` (a local file or folder of an unrestricted execution, read where it
        is), ``ref`` (a source of the pipeline's own: a local path if one exists there, else
        an object key)."""
        ctx = self.ctx
        if ctx.pipeline.get(ref) is not None:
            if ref not in ctx.data:
                raise StepParamsError(
                    f"source {ref!r} is a step of this pipeline without output yet: make this "
                    "step depend on it (media_step does when the source step is added first)",
                    pipeline=ctx.pipeline.name, step_key=ctx.step_key)
            value = ctx.data[ref]
            if isinstance(value, Mapping):
                if isinstance(value.get("prefix"), str):
                    return "prefix", value["prefix"], None
                if isinstance(value.get("key"), str):
                    return "ref", value["key"], None
            if isinstance(value, str):
                return "ref", value, None
            raise StepParamsError(f"source {ref!r}: its output {value!r} names no file (a "
                                  "key, or a dict with 'key' or 'prefix')",
                                  pipeline=ctx.pipeline.name, step_key=ctx.step_key)
        if ref in ctx.inputs:
            return self._input(ref)
        return "ref", ref, None

    def _input(self, name: str) -> tuple[str, str, Path | None]:
        """The input ``name`` as a source (see :meth:`_lookup`), as the execution's roots
        allow (:func:`local_input`; see the module)."""
        ctx = self.ctx
        value = ctx.inputs.get(name)
        if not isinstance(value, str) or not value:
            raise StepParamsError(f"input {name!r} is {value!r}, not a path or object key",
                                  pipeline=ctx.pipeline.name, step_key=ctx.step_key)
        model = ctx.pipeline.inputs
        declared = model is not None and name in declared_path_fields(model)
        confined = declared or ctx.input_roots is not None
        local = local_input(ctx, value, where=f"inputs.{name}", declared=declared)
        if local is None:  # no local file: an object key (unconfined: no such file either)
            return ("key" if confined else "ref"), value, None
        if confined:
            return "local", value, local
        return "path", value, None

    def _object_exists(self, key: str) -> bool:
        try:
            return self.ctx.objects.exists(key)
        except InvalidKeyError:
            return False

    def fetch(self, ref: str | _FromInput, *, folder: bool = False) -> Path:
        """The source ``ref`` as a local file (or folder of images).

        An input (named by the source, or given with :class:`Input`) is read as the
        execution's roots allow (:func:`~framepipe.jobs.inputs.local_input`): a local file
        allowed by the roots, or a declared input's, is copied without following links (a
        folder is refused), a value outside the roots fails with
        :class:`~framepipe.errors.PathNotAllowedError` before anything is read, and an
        object key is never looked up on the disk; without roots an existing local path is
        read where it is. Sources of the pipeline's own (written in its code, or a step's
        output) are a local path if one exists there, else an object key (or prefix)."""
        kind, value, local = (self._input(ref.name) if isinstance(ref, _FromInput)
                              else self._lookup(ref))
        slot = self.work / f"in{self._downloads}"
        self._downloads += 1
        report = self.report(_FETCH)
        if kind == "local":
            if folder:
                raise MediaError(value, "a folder of images must be given as an object-key "
                                        "prefix here (this input is a file or an object)")
            assert local is not None
            slot.mkdir(parents=True)
            dest = copy_local_file(local, slot / local.name)
            self.names[dest] = value
            report(100)
            return dest
        if kind == "path":
            return Path(value)
        if kind in ("ref", "key"):
            if kind == "ref" and Path(value).exists():
                return Path(value)
            if not folder and self._object_exists(value):
                dest = self.ctx.objects.get_file(value, slot / value.rsplit("/", 1)[-1])
                self.names[dest] = value
                report(100)
                return dest
            if not folder and kind == "key":
                raise MediaError(value, "no such object in the object store")
            if not folder:
                raise MediaError(value, "no such file, nor object key in "
                                        f"{self.ctx.objects.url}")
        prefix = value.rstrip("/") + "/"
        try:
            infos = [i for i in self.ctx.objects.list(prefix)
                     if i.key.lower().endswith(IMAGE_SUFFIXES)]
        except InvalidKeyError:
            infos = []
        if not infos:
            raise MediaError(value, "no such folder, nor object prefix holding images in "
                                    f"{self.ctx.objects.url}")
        for n, info in enumerate(infos, 1):
            self.ctx.objects.get_file(info.key, slot / info.key[len(prefix):].replace("/", "_"))
            report(100 * n / len(infos))
        self.names[slot] = value
        return slot

    def renamed(self, exc: MediaError) -> MediaError:
        """``exc`` naming the user's file instead of this step's copy of it (in its path and
        in its reason), with the same traceback."""
        for local, name in self.names.items():
            if exc.path == local or local in exc.path.parents:
                inner = exc.path.relative_to(local)
                shown = name if not inner.parts else f"{name.rstrip('/')}/{inner}"
                renamed = MediaError(shown, exc.reason.replace(str(exc.path), shown)
                                     .replace(str(local), name))
                return renamed.with_traceback(exc.__traceback__)
        return exc

    # -- outputs --------------------------------------------------------------------------

    def key(self, ext: str) -> str:
        ctx = self.ctx
        return string.Formatter().vformat(self.key_template, (), {
            "execution_id": ctx.execution_id, "pipeline": ctx.pipeline.name,
            "step": ctx.step_name, "step_key": ctx.step_key, "attempt": ctx.attempt,
            "ext": ext, "inputs": ctx.inputs})

    def output_path(self, key: str) -> Path:
        return self.work / "out" / key.rsplit("/", 1)[-1]

    # -- the operation ----------------------------------------------------------------------

    def run(self, source: str | Sequence[str], options: dict[str, Any]) -> dict[str, Any]:
        refs = [source] if isinstance(source, str) else list(source)
        if self.operation != "concat" and len(refs) != 1:
            raise StepParamsError(f"{self.operation} takes one source, not {len(refs)}",
                                  pipeline=self.ctx.pipeline.name, step_key=self.ctx.step_key)
        shown = refs[0] if len(refs) == 1 else refs
        try:
            result = self._run(refs, options)
        except MediaError as exc:
            raise self.renamed(exc) from exc
        self._last = 100.0
        self.ctx.progress(100.0, self.operation)
        return {**result, "source": shown}

    def _run(self, refs: list[str], options: dict[str, Any]) -> dict[str, Any]:
        fn, op = self.op.fn, self.operation
        work = self.report(_WORK)
        if options.get("max_pixels") is None:  # not given (or an Input without a value)
            options["max_pixels"] = load_settings().media_max_pixels
        self.max_pixels = options["max_pixels"]
        if op == "probe":
            info = probe(self.fetch(refs[0]), **options)
            work(100)
            return {"info": self._info(info, None)}
        if op == "decode_qr":
            found = decode_qr(self.fetch(refs[0]), progress=work, **options)
            if found is None:
                return {"text": None, "codes": [], "unreadable_frames": [],
                        "frames_scanned": None}
            return {"text": found.text,
                    "codes": [{"text": c.text, "frame_index": c.frame_index, "time": c.time,
                               "hits": c.hits} for c in found.codes],
                    "unreadable_frames": list(found.unreadable_frames),
                    "frames_scanned": found.frames_scanned}
        if op == "extract_frames":
            src = self.fetch(refs[0])
            out = self.work / "frames"
            paths = extract_frames(src, out, progress=work, **options)
            return self._upload_frames(paths)
        if op == "stitch":
            src = self.fetch(refs[0], folder=True)
        elif op == "concat":
            parts = [self.fetch(ref) for ref in refs]
        else:
            src = self.fetch(refs[0])
        if op == "watermark" and isinstance(options.get("image"), (str, _FromInput)):
            options["image"] = self.fetch(options["image"])
        key = self.key(self.op.ext)
        dst = self.output_path(key)
        if op == "concat":
            fn(parts, dst, progress=work, **options)
        elif op == "thumbnail":
            fn(src, dst, **options)
            work(100)
        else:
            fn(src, dst, progress=work, **options)
        return self._upload(key, dst)

    def _info(self, info: MediaInfo, key: str | None) -> dict[str, Any]:
        data = info.as_dict()
        data["path"] = key if key is not None else self.names.get(info.path, str(info.path))
        return data

    def _upload(self, key: str, path: Path) -> dict[str, Any]:
        upload = self.report(_UPLOAD)
        result: dict[str, Any] = {"key": key, "size": path.stat().st_size}
        if self.op.ext == ".mp4":
            result["info"] = self._info(probe(path, max_pixels=self.max_pixels), key)
        else:
            image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if image is None:
                raise MediaError(path, "the written image cannot be read back")
            result["height"], result["width"] = (int(n) for n in image.shape[:2])
        self.ctx.objects.put_file(key, path)
        upload(100)
        return result

    def _upload_frames(self, paths: list[Path]) -> dict[str, Any]:
        upload = self.report(_UPLOAD)
        prefix = self.key("").rstrip("/")
        keys: list[str] = []
        size = 0
        for n, path in enumerate(paths, 1):
            key = f"{prefix}/{path.name}"
            self.ctx.objects.put_file(key, path)
            keys.append(key)
            size += path.stat().st_size
            upload(100 * n / len(paths))
        return {"prefix": prefix, "count": len(keys), "keys": keys[:MAX_LISTED_KEYS],
                "size": size}

