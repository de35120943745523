"""The ML video pipeline: fetch -> preprocess -> inference -> postprocess -> stitch ->
thumbnails -> finalize, a model stylising every frame of a video.

Run it like any pipeline::

    MODEL_ADAPTER_TYPE=mock framepipe run framepipe.pipelines.ml_video:ml_video \\
        --input input=clip.mp4 --input prompt="turn into anime" --input style=studio

Inputs (:class:`MlVideoInputs`, checked when an execution is submitted: a wrong or unknown one
is refused with :class:`~framepipe.errors.InvalidInputError` naming it, and no execution is
created): ``input`` (the video: a local file or an object key, see
:mod:`framepipe.jobs.inputs`; over HTTP local files only inside ``FRAMEPIPE_INPUT_ROOTS``),
``prompt``, ``style`` (default ``"default"``), ``seed`` (the model's random seed, default 0),
``width`` (preprocess width, default 640), ``fps`` (default 25), ``brightness``/``contrast``
(postprocess, default 0 / 1.0). The model is this pipeline's setting
(:class:`~framepipe.pipelines.ml_settings.MlVideoSettings`:
``MODEL_ADAPTER_TYPE=mock|python|http``, ``PYTHON_SCRIPT``, ``MODEL_API_URL``,
``MODEL_API_TIMEOUT``, the retries, ``MODEL_BATCH_SIZE``), read by the inference step where
it runs, so a worker uses its own environment (and a job that ran out of memory is retried
with a smaller ``MODEL_BATCH_SIZE``; the inference step's ``batch_size`` in the execution's
data says which one it ran with).

The media work is done by :func:`framepipe.media.run_media` (normalise, thumbnails), within the
picture size limit of :class:`~framepipe.config.MediaSettings`; the keys it is given (the
job's copy of the input among them) are :class:`~framepipe.media.ObjectKey` sources, read from
the object store only, never from a file of the worker's working folder. Every step works in
its own temporary folders (deleted afterwards, failed or not) and passes its results on through
the object store under ``ml/<execution id>/``, so steps can run on different workers and a
retry resumes at the failed step. The folders of an attempt whose process was killed (the
model's frames among them) are deleted by the next step that makes one on that machine
(``ctx.tempdir``, :mod:`framepipe.jobs.scratch`). The steps' weights make the execution's
progress: fetch 0-10 %, preprocess 10-15 %, inference 15-65 %, postprocess 65-75 %, stitch
75-85 %, thumbnails 85-95 %, finalize 95-100 %. The result video and thumbnail keys end up in
the execution's data (``video``, ``thumbnail``, ``grid``).

Every step logs ``Stage started`` and ``Stage completed in 1.67s`` (or failed, cancelled, or
stopped: handed back by a worker that stops, not failed) under
``[ml_video/<step>:<execution id>]``. Once everything else is stored, finalize writes a
manifest of what the job used and kept, then deletes the intermediates (:data:`INTERMEDIATES`),
unless ``FRAMEPIPE_ML_KEEP_INTERMEDIATES`` / ``ML_KEEP_INTERMEDIATES`` is true; a failed
execution keeps them for its retry. The first step refuses to run where the original worker's
``MINIO_*`` or ``DATABASE_FILE`` are set but this process does not use them (see
:mod:`framepipe.pipelines.ml_worker`, which maps them).

The job runs on the video its submitter sent: the submit pins an object key's version
(``input_version``: its ETag on S3; :func:`~framepipe.pipelines.ml_input.pin_input`), and
fetch takes the job's own copy (``ml/<execution id>/input.<ext>``) of that version only,
which the later steps read; an object replaced after the submit, even within the same second,
is refused naming the key. An empty or non-video input, and a request the
model server refuses for good (an HTTP 4xx), fail at once instead of being retried. The result
keeps the upload's sound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import cv2
from pydantic import BaseModel, ConfigDict, Field

from framepipe import media
from framepipe.config import MediaSettings, load_section
from framepipe.errors import ConfigError, InvalidInputError, MediaError, StepCancelledError
from framepipe.jobs.context import StepContext
from framepipe.jobs.inputs import LocalPathOrKey, copy_local_file, load_inputs, local_input
from framepipe.jobs.pipeline import Pipeline
from framepipe.logs import get_logger
from framepipe.media.frames import read_image, write_image
from framepipe.pipelines.ml_folders import download_folder, fetch_object, images, upload_folder
from framepipe.pipelines.ml_input import ignored_minio, pin_input, probed, take_object
from framepipe.pipelines.ml_manifest import INTERMEDIATES, delete_intermediates, manifest
from framepipe.pipelines.ml_settings import MlVideoSettings
from framepipe.processors.adapters import ModelAdapter, as_step_progress

__all__ = ["INTERMEDIATES", "MlVideoInputs", "ml_video", "model_from_settings"]

T = TypeVar("T")

MAX_FPS = 240.0
"""The highest ``fps`` a job may ask for."""


class MlVideoInputs(BaseModel):
    """The inputs of :data:`ml_video`; an input not listed here is refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    input: LocalPathOrKey = Field(description="The video: a local file or an object key.")
    input_version: str | None = Field(
        None,
        max_length=1024,
        description="The version of the object `input` names (its ETag on S3), pinned at "
        "submit: fetch takes that version or refuses. Give the one your upload got to pin it "
        "yourself; left out, the submit takes the object's version then.",
    )
    prompt: str = Field("", description="What the model is asked to do.")
    style: str = Field("default", description="The model's style.")
    seed: int = Field(0, description="The model's random seed.")
    width: int = Field(640, ge=2, le=8192, description="Preprocess width, in pixels.")
    fps: float = Field(25.0, gt=0, le=MAX_FPS, description="Frames a second, in and out.")
    brightness: float = Field(0.0, description="Postprocess: added to every pixel value.")
    contrast: float = Field(1.0, description="Postprocess: every pixel value times this.")


ml_video = Pipeline(
    "ml_video",
    description="Stylise every frame of a video with a model.",
    inputs=MlVideoInputs,
    on_submit=pin_input,
)


def model_from_settings() -> ModelAdapter:
    """The model the inference step calls: :meth:`MlVideoSettings.adapter` of the settings
    :meth:`MlVideoSettings.load` reads from this process's environment and config file."""
    return MlVideoSettings.load().adapter()


def _limits(*, length: bool = True) -> dict[str, Any]:
    """The operator's media limits (``FRAMEPIPE_MEDIA_MAX_*``), read when a step runs."""
    return media.limits_from(load_section(MediaSettings), length=length)


def _inputs(ctx: StepContext) -> MlVideoInputs:
    return load_inputs(MlVideoInputs, ctx.inputs)


def _prefix(ctx: StepContext) -> str:
    return f"ml/{ctx.execution_id}"


@contextlib.contextmanager
def _stage(ctx: StepContext) -> Iterator[None]:
    """``Stage started`` / ``Stage completed in 1.67s`` (or failed, cancelled, stopped) lines
    for one step, as the original worker logged each stage, under ``[ml_video/<stage>:<id>]``."""
    log = get_logger(
        f"{ctx.pipeline.name}/{ctx.step_name}:{ctx.execution_id[:8]}", "framepipe.steps"
    )
    log.info("Stage started")
    started = time.monotonic()
    try:
        yield
    except StepCancelledError:
        log.warning("Stage cancelled after %.2fs", time.monotonic() - started)
        raise
    except asyncio.CancelledError:
        # the worker stopped the step (SIGTERM, a lost lease) and hands it back: not a failure
        log.warning(
            "Stage stopped after %.2fs: handed back, not failed; it runs again",
            time.monotonic() - started,
        )
        raise
    except BaseException as exc:
        log.warning("Stage failed after %.2fs: %s", time.monotonic() - started, type(exc).__name__)
        raise
    log.info("Stage completed in %.2fs", time.monotonic() - started)


class _Stopped(Exception):
    """Stops a thread of an ``async`` step whose task was cancelled."""


_THREAD_GRACE = 10.0
"""Seconds a cancelled ``async`` step waits for its thread to reach its next checkpoint."""


async def _in_thread(ctx: StepContext, work: Callable[[Callable[[], None]], T]) -> T:
    """``work(checkpoint)`` in a thread, off the event loop: a worker's loop also renews its
    leases, and a loop blocked for longer than a lease lets another worker take the step over
    (and this attempt's result is discarded). ``work`` calls ``checkpoint()`` between its
    pieces (a file uploaded): it raises once the step is cancelled. Cancelled, this waits for
    the thread to stop at its next checkpoint (at most :data:`_THREAD_GRACE` seconds: a hung
    request is not waited for), so the attempt's folders are not deleted under it, then
    raises :class:`asyncio.CancelledError`."""
    stop = threading.Event()

    def checkpoint() -> None:
        ctx.check_cancelled()
        if stop.is_set():
            raise _Stopped

    thread = asyncio.ensure_future(asyncio.to_thread(work, checkpoint))
    try:
        return await asyncio.shield(thread)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait({thread}, timeout=_THREAD_GRACE)
        if not thread.done():
            ctx.log.warning(
                "cancelled, but its thread is still busy after %gs; its folders are deleted",
                _THREAD_GRACE,
            )
        thread.add_done_callback(_retrieved)
        raise


def _retrieved(done: asyncio.Future[Any]) -> None:
    if not done.cancelled():
        done.exception()  # the cancellation's doing: not an error of its own


def _check_storage(ctx: StepContext) -> None:
    """Refuse to run where the original worker's MinIO or database variables are set but this
    process ignores them (it was not started by :mod:`framepipe.pipelines.ml_worker`, which
    maps them): the files would silently go to the local store instead of MinIO."""
    ignored = ignored_minio(ctx.objects)
    if ignored is not None:
        raise ignored
    ml = MlVideoSettings.load()
    wanted = ml.database_url()
    if (
        wanted is not None
        and not os.environ.get("FRAMEPIPE_DATABASE_URL")
        and ctx.store.url != wanted
    ):
        raise ConfigError(
            f"DATABASE_FILE={ml.database_file} is set but this process's state database is "
            f"another one: set FRAMEPIPE_DATABASE_URL={wanted}, or start the worker with "
            "python -m framepipe.pipelines.ml_worker, which maps it"
        )


@ml_video.step(weight=10, retries=2)
def fetch(ctx: StepContext) -> dict[str, Any]:
    """Take the job's own copy of the input, ``ml/<execution id>/input.<ext>``, which every
    later step reads (a new upload to the client's key changes nothing for this job): a local
    file (as the submit resolved and confined it) is copied without following links and
    uploaded; an object key is copied within the store, the version its submit pinned
    (:func:`~framepipe.pipelines.ml_input.take_object`): one replaced after the submit is
    refused naming the key. The
    copy is probed: an empty or non-video input is an
    :class:`~framepipe.errors.InvalidInputError`, refused for good (not retried)."""
    with _stage(ctx):
        _check_storage(ctx)
        source = _inputs(ctx).input
        path = local_input(ctx, source, where="inputs.input", declared=True)
        name = Path(source).name if path is None else path.name
        key = f"{_prefix(ctx)}/input{Path(name).suffix.lower() or '.mp4'}"
        if path is None:
            taken = take_object(ctx, source, key, _inputs(ctx).input_version)
            copy = fetch_object(ctx, key)
        else:
            copy = copy_local_file(path, ctx.tempdir() / path.name)
            taken = {"key": None, "size": copy.stat().st_size, "path": source}
        info = probed(source, copy, _limits(length=False))
        if path is not None:
            ctx.objects.put_file(key, copy)
        return {"input_key": key, "input_info": info, "input_source": taken}


@ml_video.step(depends_on=["fetch"], weight=5, retries=2)
def preprocess(ctx: StepContext) -> dict[str, Any]:
    """Validate and normalise: H.264, ``width`` wide, ``fps`` frames a second, yuv420p. An
    upload that fetch's probe took for a video but that cannot be decoded to its end (cut off
    or corrupt past its header), or one shorter than half a frame at ``fps`` (it would keep no
    frame), is an :class:`~framepipe.errors.InvalidInputError` naming the user's file: refused
    for good, since every retry would read the same copy."""
    with _stage(ctx):
        inputs = _inputs(ctx)
        seconds = ctx.data["input_info"].get("duration") or 0.0
        if 0 < seconds * inputs.fps < 0.5:  # normalising would keep no frame
            least = math.ceil(0.5 / seconds * 1000) / 1000  # rounded up: it keeps a frame
            advice = (
                f"submit it with an fps of at least {least:g}"
                if least <= MAX_FPS
                else f"no fps up to {MAX_FPS:g} keeps a frame of it"
            )
            raise InvalidInputError(
                f"{inputs.input}: lasts {seconds:g}s, less than half a frame at fps={inputs.fps:g}:"
                f" no frame to process; {advice}",
                where="inputs.fps",
            )
        try:
            out = media.run_media(
                ctx,
                "normalise",
                media.ObjectKey(ctx.data["input_key"]),  # the job's copy: never a local file
                key="ml/{execution_id}/preprocessed.mp4",
                width=inputs.width,
                fps=inputs.fps,
                preset="veryfast",
            )
        except MediaError as exc:
            if exc.path != Path(ctx.data["input_key"]):
                raise  # the output, not the upload: maybe not the same on a retry
            # The job's copy of the upload cannot be decoded to its end (data cut off or
            # corrupt past a readable header): its bytes are pinned, so a retry reads the same.
            raise InvalidInputError(
                f"{inputs.input}: {exc.reason} (a retry decodes this job's copy again: submit a "
                "new job for a replaced upload)",
                where="inputs.input",
            ) from exc
        return {"preprocessed_key": out["key"], "preprocessed_info": out["info"]}


@ml_video.step(depends_on=["preprocess"], weight=50, retries=1)
async def inference(ctx: StepContext) -> dict[str, Any]:
    """Run the model (any adapter) on the preprocessed video (the step's first 90 %); its
    frames go to the store (the rest, ``upload``). An ``async`` step, so that cancelling it
    stops the model at once; everything in it that blocks (the execution's data and the
    settings read, the download, the upload of every frame) runs in a thread
    (:func:`_in_thread`), never on the event loop that renews the worker's leases."""
    with _stage(ctx):

        def prepare(
            checkpoint: Callable[[], None],
        ) -> tuple[Path, MlVideoInputs, ModelAdapter, MlVideoSettings, Path]:
            src = fetch_object(ctx, ctx.data["preprocessed_key"])
            checkpoint()
            settings = MlVideoSettings.load()
            return src, _inputs(ctx), model_from_settings(), settings, ctx.tempdir()

        src, inputs, model, settings, out = await _in_thread(ctx, prepare)
        options = settings.infer_options()
        # A model server's refusal for good (ModelSetupError, ModelRefusedError) is a
        # ConfigError or InvalidInputError: the step's retry does not run it again.
        async with model:  # set up and torn down in a thread
            result = await model.infer(
                src,
                prompt=inputs.prompt,
                style=inputs.style,
                seed=inputs.seed,
                output_dir=out,
                progress=as_step_progress(ctx, 0, 90, "inference"),
                **options,
            )
        if not model.check_frames_path:  # else the adapter checked it
            problem = await asyncio.to_thread(model.frames_path_problem, result.frames_path)
            if problem is not None:  # a setup to fix: running the model again cannot help
                raise ConfigError(problem)
        prefix = f"{_prefix(ctx)}/frames"
        keys = await _in_thread(
            ctx,
            lambda checkpoint: upload_folder(
                ctx,
                Path(result.frames_path),
                prefix,
                checkpoint,
                lambda done, total: ctx.progress(90 + 10 * done / total, "upload"),
            ),
        )
        if not keys:
            raise ValueError(f"the model wrote no frames into {result.frames_path}")
        return {
            "frames_prefix": prefix,
            "frames": len(keys),
            "model": type(model).__name__,
            "batch_size": options.get("batch_size"),
        }


@ml_video.step(depends_on=["inference"], weight=10, retries=2)
def postprocess(ctx: StepContext) -> dict[str, Any]:
    """Colour correction of every frame (contrast and brightness, OpenCV). At contrast 1 and
    brightness 0 (the defaults) it changes nothing, so no frame is moved: the model's frames
    are the post-processed ones (``post_prefix`` names them)."""
    with _stage(ctx):
        inputs = _inputs(ctx)
        alpha, beta = inputs.contrast, inputs.brightness
        if alpha == 1 and beta == 0:
            return {"post_prefix": ctx.data["frames_prefix"], "post_frames": ctx.data["frames"]}
        folder = download_folder(ctx, ctx.data["frames_prefix"])
        out = ctx.tempdir()
        paths = images(folder)
        for n, path in enumerate(paths, 1):
            # read and written by Python, decoded and encoded in memory: OpenCV given a path
            # that is not valid UTF-8 (a model's file name) crashes the process
            try:
                image = read_image(path, 0)
            except MediaError as exc:
                reason = f"frame {path.name} from the model is not a readable image"
                raise ValueError(reason) from exc
            adjusted = cv2.convertScaleAbs(image, alpha=alpha, beta=beta)
            write_image(out / f"{path.stem}.png", adjusted)
            if n % 10 == 0 or n == len(paths):
                ctx.progress(100 * n / len(paths), "postprocess")
        keys = upload_folder(ctx, out, f"{_prefix(ctx)}/post")
        return {"post_prefix": f"{_prefix(ctx)}/post", "post_frames": len(keys)}


@ml_video.step(depends_on=["postprocess"], weight=10, retries=2)
def stitch(ctx: StepContext) -> dict[str, Any]:
    """Frames into an H.264 MP4, with the sound of the upload (its preprocessed video's
    track, on the frames' timeline; none if the upload had none, and then the preprocessed
    video is not downloaded)."""
    with _stage(ctx):
        folder = download_folder(ctx, ctx.data["post_prefix"])
        probed = ctx.data.get("preprocessed_info") or {}
        silent = "audio_codec" in probed and probed["audio_codec"] is None
        sound = None if silent else fetch_object(ctx, ctx.data["preprocessed_key"])
        dst = ctx.tempdir() / "output.mp4"
        media.stitch(
            folder,
            dst,
            fps=_inputs(ctx).fps,
            preset="veryfast",
            progress=ctx.progress,
            audio=sound,
            **_limits(),
        )
        key = f"{_prefix(ctx)}/output.mp4"
        ctx.objects.put_file(key, dst)
        info = media.probe(dst, **_limits(length=False)).as_dict()
        return {"video": key, "video_info": {**info, "path": key}}


@ml_video.step(depends_on=["stitch"], weight=10, retries=2)
def thumbnails(ctx: StepContext) -> dict[str, Any]:
    """A thumbnail (the step's first 30 %) and a contact sheet (the rest) of the result."""
    with _stage(ctx):
        video = media.ObjectKey(ctx.data["video"])
        thumb = media.run_media(
            ctx,
            "thumbnail",
            video,
            width=320,
            key="ml/{execution_id}/thumbnail.jpg",
            span=(0, 30),
        )
        grid = media.run_media(
            ctx,
            "thumbnail_grid",
            video,
            span=(30, 100),
            cols=3,
            rows=2,
            width=960,
            key="ml/{execution_id}/grid.jpg",
        )
        return {"thumbnail": thumb["key"], "grid": grid["key"]}


@ml_video.step(depends_on=["thumbnails"], weight=5, retries=2)
def finalize(ctx: StepContext) -> dict[str, Any]:
    """A manifest of the job next to its outputs
    (:func:`~framepipe.pipelines.ml_manifest.manifest`), then the intermediates deleted (unless
    ``keep_intermediates``): the last step, so they go only when the execution completes; a
    failed execution keeps them for its retry. Deleting is idempotent, so a retried finalize
    finishes the job."""
    with _stage(ctx):
        keep = MlVideoSettings.load().keep_intermediates
        key = f"{_prefix(ctx)}/manifest.json"
        written = manifest(ctx, _inputs(ctx), keep)
        ctx.objects.put(key, json.dumps(written, indent=2, default=str).encode())
        if keep:
            return {"manifest": key, "intermediates_deleted": 0}
        deleted = delete_intermediates(ctx, _prefix(ctx) + "/")
        return {"manifest": key, "intermediates_deleted": deleted}
