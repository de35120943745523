"""One media step's run: its sources found and fetched, its operation run, its outputs uploaded.

:func:`~framepipe.media.steps.run_media` (and so every step
:func:`~framepipe.media.steps.media_step` adds) makes one :class:`StepRun` per call; the
guarantees :mod:`framepipe.media.steps` states for every step are kept here. A source is looked
up as a step's output, then as an execution input (read through
:func:`~framepipe.jobs.inputs.local_input` with the execution's roots), then as a path or key
written in the pipeline's code (an :class:`ObjectKey` is an object key only, looked up nowhere
else), and fetched into the step's own folder; progress is 0-10 % of the call's part of the
step (its ``span``, all of it by default) fetching, 10-90 % the operation, 90-100 % uploading,
and never goes back within the step, however many calls it makes (one high-water mark per
step); a cancelled step stops at the next frame, packet or image its operation handles
(:func:`~framepipe.media.progress.stop_when`), not at its next whole percent, and uploads
nothing more; nothing is uploaded before the operation succeeded; a
:class:`~framepipe.errors.MediaError` names the user's file, never the step's copy of it.
"""

from __future__ import annotations

import inspect
import string
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2

from framepipe.config import load_settings
from framepipe.errors import InvalidKeyError, MediaError, StepParamsError
from framepipe.jobs.context import StepContext
from framepipe.jobs.inputs import copy_local_file, declared_path_fields, local_input
from framepipe.media.atomic import scratch_outputs
from framepipe.media.frames import IMAGE_SUFFIXES, extract_frames, read_image
from framepipe.media.limits import DEFAULT_MAX_PIXELS, LIMIT_SETTINGS
from framepipe.media.probe import MediaInfo, probe
from framepipe.media.progress import stop_when
from framepipe.media.qr import decode_qr

__all__ = [
    "MAX_LISTED_KEYS",
    "SOURCE_OPTIONS",
    "FromInput",
    "ObjectKey",
    "OpSpec",
    "Source",
    "StepRun",
]

MAX_LISTED_KEYS = 100
"""``extract_frames`` lists at most this many keys in its result (``count`` has them all)."""

_FETCH, _WORK, _UPLOAD = (0.0, 10.0), (10.0, 90.0), (90.0, 100.0)

_LIMITS = LIMIT_SETTINGS
"""The toolkit's limit options and the settings a step fills them from when not given."""

_MARKS: weakref.WeakKeyDictionary[StepContext, float] = weakref.WeakKeyDictionary()
"""Each running step's progress high-water mark, shared by all the runs in that step."""
_MARKS_LOCK = threading.Lock()


@dataclass(frozen=True)
class OpSpec:
    """What a step runs for one operation: the function, the suffix of its output and the
    parameters the step fills in itself (the rest are the operation's options)."""

    fn: Callable[..., Any]
    ext: str  # output suffix; "" for no file output, "/" for a folder of images
    reserved: tuple[str, ...]  # the function's parameters a step fills in itself


SOURCE_OPTIONS = {"watermark": "image", "stitch": "audio"}
"""The option of an operation that names a file, read like a source (a step's output, an
input, an object key or, written in the pipeline's code, a local path): ``watermark``'s
``image`` (the logo) and ``stitch``'s ``audio`` (the video whose sound goes under the frames)."""


@dataclass(frozen=True)
class FromInput:
    """A source option given as :class:`~framepipe.media.steps.Input`: the input's name, so its
    value is read as an input (through :func:`local_input`), not as a source written in the
    pipeline's code."""

    name: str


@dataclass(frozen=True)
class ObjectKey:
    """A source that is an object key and nothing else: fetched from the object store (for
    ``stitch``, a prefix listed there), never taken as a step's name, an input's name or a
    file on the worker's disk. A key a client named (an input's value, or a key a step
    passed on from one) is given this way, so it cannot reach the disk however it is spelt::

        run_media(ctx, "normalise", ObjectKey(ctx.data["input_key"]))
    """

    key: str


Source = str | ObjectKey
"""A source: a step's name, an input's name, a path or key written in the pipeline's code, or
an :class:`ObjectKey`."""


class StepRun:
    """One run of one operation in one step (:func:`~framepipe.media.steps.run_media`
    makes one per call)."""

    def __init__(
        self,
        ctx: StepContext,
        operation: str,
        op: OpSpec,
        work: Path,
        key: str,
        span: tuple[float, float] = (0.0, 100.0),
    ) -> None:
        lo, hi = (float(v) for v in span)
        if not 0.0 <= lo <= hi <= 100.0:
            raise StepParamsError(
                f"span {span!r} is not a part of 0-100 (low, high)",
                pipeline=ctx.pipeline.name,
                step_key=ctx.step_key,
            )
        self.ctx = ctx
        self.span = (lo, hi)
        self.operation = operation
        self.op = op
        self.work = work
        self.key_template = key
        self.names: dict[Path, str] = {}  # local copy -> what the user named
        self._downloads = 0
        self.max_pixels = DEFAULT_MAX_PIXELS  # the operation's, for probing its output

    # -- progress -------------------------------------------------------------------------

    def report(self, part: tuple[float, float]) -> Callable[[float], None]:
        """A callback taking 0-100 of ``part`` (of this call's 0-100) to the step's progress."""
        lo, hi = part
        start, end = self.span

        def progress(pct: float) -> None:
            share = min(100.0, max(0.0, float(pct))) / 100.0
            self._advance(start + (end - start) * (lo + (hi - lo) * share) / 100.0)

        return progress

    def _advance(self, value: float, *, again: bool = False) -> None:
        """Report ``value`` if it is above the step's mark (``again``: or at it); never
        backwards within the step, whichever of its runs reports."""
        with _MARKS_LOCK:
            mark = _MARKS.get(self.ctx, 0.0)
            if value < mark or (value == mark and not again):
                return
            _MARKS[self.ctx] = value
        self.ctx.progress(value, self.operation)

    # -- sources --------------------------------------------------------------------------

    def _lookup(self, ref: Source) -> tuple[str, str, Path | None]:
        """(kind, value, local file). Kinds: ``prefix`` (an object prefix), ``key`` (an object
        key, never looked up on the disk), ``local`` (a local file allowed by the execution's
        roots, or a declared input's, given as the third item: copied without following
        links), ``path`` (a local file or folder of an unrestricted execution, read where it
        is), ``ref`` (a source of the pipeline's own: a local path if one exists there, else
        an object key). An :class:`ObjectKey` is a ``key``, whatever it spells."""
        ctx = self.ctx
        if isinstance(ref, ObjectKey):
            return "key", ref.key, None
        if ctx.pipeline.get(ref) is not None:
            if ref not in ctx.data:
                raise StepParamsError(
                    f"source {ref!r} is a step of this pipeline without output yet: make this "
                    "step depend on it (media_step does when the source step is added first)",
                    pipeline=ctx.pipeline.name,
                    step_key=ctx.step_key,
                )
            value = ctx.data[ref]
            if isinstance(value, Mapping):
                if isinstance(value.get("prefix"), str):
                    return "prefix", value["prefix"], None
                if isinstance(value.get("key"), str):
                    return "ref", value["key"], None
            if isinstance(value, str):
                return "ref", value, None
            raise StepParamsError(
                f"source {ref!r}: its output {value!r} names no file (a "
                "key, or a dict with 'key' or 'prefix')",
                pipeline=ctx.pipeline.name,
                step_key=ctx.step_key,
            )
        if ref in ctx.inputs:
            return self._input(ref)
        return "ref", ref, None

    def _input(self, name: str) -> tuple[str, str, Path | None]:
        """The input ``name`` as a source (see :meth:`_lookup`), as the execution's roots
        allow (:func:`local_input`; see the module)."""
        ctx = self.ctx
        value = ctx.inputs.get(name)
        if not isinstance(value, str) or not value:
            raise StepParamsError(
                f"input {name!r} is {value!r}, not a path or object key",
                pipeline=ctx.pipeline.name,
                step_key=ctx.step_key,
            )
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

    def fetch(self, ref: Source | FromInput, *, folder: bool = False) -> Path:
        """The source ``ref`` as a local file (or folder of images).

        An input (named by the source, or given with :class:`Input`) is read as the
        execution's roots allow (:func:`~framepipe.jobs.inputs.local_input`): a local file
        allowed by the roots, or a declared input's, is copied without following links (a
        folder is refused), a value outside the roots fails with
        :class:`~framepipe.errors.PathNotAllowedError` before anything is read, and an
        object key is never looked up on the disk; without roots an existing local path is
        read where it is. An :class:`ObjectKey` is an object key (or prefix), never looked
        up on the disk. Other sources of the pipeline's own (written in its code, or a step's
        output) are a local path if one exists there, else an object key (or prefix)."""
        kind, value, local = (
            self._input(ref.name) if isinstance(ref, FromInput) else self._lookup(ref)
        )
        slot = self.work / f"in{self._downloads}"
        self._downloads += 1
        report = self.report(_FETCH)
        if kind == "local":
            if folder:
                raise MediaError(
                    value,
                    "a folder of images must be given as an object-key "
                    "prefix here (this input is a file or an object)",
                )
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
                raise MediaError(value, f"no such file, nor object key in {self.ctx.objects.url}")
        prefix = value.rstrip("/") + "/"
        try:
            infos = [
                i for i in self.ctx.objects.list(prefix) if i.key.lower().endswith(IMAGE_SUFFIXES)
            ]
        except InvalidKeyError:
            infos = []
        if not infos:
            raise MediaError(
                value, f"no such folder, nor object prefix holding images in {self.ctx.objects.url}"
            )
        for n, info in enumerate(infos, 1):
            self.ctx.objects.get_file(info.key, slot / info.key[len(prefix) :].replace("/", "_"))
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
                renamed = MediaError(
                    shown, exc.reason.replace(str(exc.path), shown).replace(str(local), name)
                )
                return renamed.with_traceback(exc.__traceback__)
        return exc

    # -- outputs --------------------------------------------------------------------------

    def key(self, ext: str) -> str:
        ctx = self.ctx
        return string.Formatter().vformat(
            self.key_template,
            (),
            {
                "execution_id": ctx.execution_id,
                "pipeline": ctx.pipeline.name,
                "step": ctx.step_name,
                "step_key": ctx.step_key,
                "attempt": ctx.attempt,
                "ext": ext,
                "inputs": ctx.inputs,
            },
        )

    def output_path(self, key: str) -> Path:
        return self.work / "out" / key.rsplit("/", 1)[-1]

    # -- the operation ----------------------------------------------------------------------

    def run(self, source: Source | Sequence[Source], options: dict[str, Any]) -> dict[str, Any]:
        refs = [source] if isinstance(source, (str, ObjectKey)) else list(source)
        if self.operation != "concat" and len(refs) != 1:
            raise StepParamsError(
                f"{self.operation} takes one source, not {len(refs)}",
                pipeline=self.ctx.pipeline.name,
                step_key=self.ctx.step_key,
            )
        named = [ref.key if isinstance(ref, ObjectKey) else ref for ref in refs]
        shown = named[0] if len(named) == 1 else named
        try:
            # the work folder is uploaded, then deleted; a cancel stops the work between frames
            with scratch_outputs(), stop_when(self.ctx.check_cancelled):
                result = self._run(refs, options)
        except MediaError as exc:
            raise self.renamed(exc) from exc
        self._advance(self.span[1], again=True)
        return {**result, "source": shown}

    def _run(self, refs: list[Source], options: dict[str, Any]) -> dict[str, Any]:
        fn, op = self.op.fn, self.operation
        work = self.report(_WORK)
        params = inspect.signature(fn).parameters
        unset = [o for o in _LIMITS if o in params and options.get(o) is None]
        if unset:  # not given (or an Input without a value): the settings, read now
            settings = load_settings()
            options.update({option: getattr(settings, _LIMITS[option]) for option in unset})
        self.max_pixels = options["max_pixels"]
        if op == "probe":
            info = probe(self.fetch(refs[0]), **options)
            work(100)
            return {"info": self._info(info, None)}
        if op == "decode_qr":
            found = decode_qr(self.fetch(refs[0]), progress=work, **options)
            if found is None:
                return {"text": None, "codes": [], "unreadable_frames": [], "frames_scanned": None}
            return {
                "text": found.text,
                "codes": [
                    {"text": c.text, "frame_index": c.frame_index, "time": c.time, "hits": c.hits}
                    for c in found.codes
                ],
                "unreadable_frames": list(found.unreadable_frames),
                "frames_scanned": found.frames_scanned,
            }
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
        named = SOURCE_OPTIONS.get(op)
        if named and isinstance(options.get(named), (str, FromInput, ObjectKey)):
            options[named] = self.fetch(options[named])
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
            try:
                image = read_image(path, 0, flags=cv2.IMREAD_UNCHANGED)
            except MediaError as exc:
                raise MediaError(path, "the written image cannot be read back") from exc
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
        return {"prefix": prefix, "count": len(keys), "keys": keys[:MAX_LISTED_KEYS], "size": size}
