"""The ML video pipeline (seed 003): fetch -> preprocess -> inference -> postprocess -> stitch
-> thumbnails -> finalize, with the seed's progress ranges.

Run it like any pipeline::

    MODEL_ADAPTER_TYPE=mock framepipe run framepipe.pipelines.ml_video:ml_video \\
        --input input=clip.mp4 --input prompt="turn into anime" --input style=studio

Inputs: ``input`` (a local file or an object key), ``prompt``, ``style`` (default
``"default"``), ``seed`` (default 0), ``width`` (preprocess width, default 640), ``fps``
(default 25), ``brightness``/``contrast`` (postprocess, default 0 / 1.0). The model is chosen by
the seed's settings (``MODEL_ADAPTER_TYPE=mock|python|http``, ``PYTHON_SCRIPT``,
``MODEL_API_URL``, ``MODEL_API_TIMEOUT``).

The media work is done by :func:`framepipe.media.run_media` (normalise, thumbnails). Every
step works in its own temporary folder (deleted afterwards, failed or not) and passes
its results on through the object store under ``ml/<execution id>/``, so steps can run on
different workers and a retry resumes at the failed step. The weights make the execution's
progress follow the seed's ranges: fetch 0-10 %, preprocess 10-15 %, inference 15-65 %,
postprocess 65-75 %, stitch 75-85 %, thumbnails 85-95 %, finalize 95-100 %. The result video
and thumbnail keys end up in the execution's data (``video``, ``thumbnail``, ``grid``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2

from framepipe import media
from framepipe.errors import InvalidKeyError, MediaError
from framepipe.jobs.context import StepContext
from framepipe.jobs.pipeline import Pipeline
from framepipe.processors.adapters import adapter_from_settings, as_step_progress

__all__ = ["ml_video"]

ml_video = Pipeline("ml_video", description="Stylise a video with a model (seed 003).")


def _prefix(ctx: StepContext) -> str:
    return f"ml/{ctx.execution_id}"


def _fetch(ctx: StepContext, key: str) -> Path:
    """Download ``key`` into this step's temp folder."""
    dest = ctx.tempdir() / key.rsplit("/", 1)[-1]
    return ctx.objects.get_file(key, dest)


_IMAGES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def _images(folder: Path) -> list[Path]:
    """The image files of ``folder``, sorted by name (a model may write other files too)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _IMAGES)


def _upload_folder(ctx: StepContext, folder: Path, prefix: str) -> list[str]:
    keys = []
    for path in _images(folder):
        key = f"{prefix}/{path.name}"
        ctx.objects.put_file(key, path)
        keys.append(key)
    return keys


def _download_folder(ctx: StepContext, prefix: str) -> Path:
    folder = ctx.tempdir()
    for info in ctx.objects.list(prefix + "/"):
        ctx.objects.get_file(info.key, folder / info.key.rsplit("/", 1)[-1])
    return folder


@ml_video.step(weight=10, retries=2)
def fetch(ctx: StepContext) -> dict[str, Any]:
    """Bring the input into the object store (a local file is uploaded; a key is checked)."""
    source = str(ctx.inputs["input"])
    path = Path(source)
    if not path.is_file():
        try:
            if ctx.objects.exists(source):
                return {"input_key": source}
        except InvalidKeyError:
            pass
        raise FileNotFoundError(f"input {source!r} is neither a file nor an object key in "
                                f"{ctx.objects.url}")
    info = media.probe(path)  # refuse a non-video before anything else runs
    key = f"{_prefix(ctx)}/input{path.suffix.lower() or '.mp4'}"
    ctx.objects.put_file(key, path)
    return {"input_key": key, "input_info": info.as_dict()}


@ml_video.step(depends_on=["fetch"], weight=5, retries=2)
def preprocess(ctx: StepContext) -> dict[str, Any]:
    """Validate and normalise: H.264, ``width`` wide, ``fps`` frames a second, yuv420p."""
    try:
        out = media.run_media(ctx, "normalise", ctx.data["input_key"],
                              key="ml/{execution_id}/preprocessed.mp4",
                              width=int(ctx.inputs.get("width", 640)),
                              fps=float(ctx.inputs.get("fps", 25)), preset="veryfast")
    except MediaError as exc:  # name the user's file, not this job's copy of it
        raise MediaError(str(ctx.inputs["input"]), exc.reason) from exc
    return {"preprocessed_key": out["key"], "preprocessed_info": out["info"]}


@ml_video.step(depends_on=["preprocess"], weight=50, retries=1)
async def inference(ctx: StepContext) -> dict[str, Any]:
    """Run the model (any adapter) on the preprocessed video; its frames go to the store."""
    src = _fetch(ctx, ctx.data["preprocessed_key"])
    model = adapter_from_settings()
    try:
        result = await model.infer(src, prompt=str(ctx.inputs.get("prompt", "")),
                                   style=str(ctx.inputs.get("style", "default")),
                                   seed=int(ctx.inputs.get("seed", 0)),
                                   output_dir=ctx.tempdir(),
                                   progress=as_step_progress(ctx, 0, 90, "inference"))
    finally:
        model.teardown()
    keys = _upload_folder(ctx, Path(result.frames_path), f"{_prefix(ctx)}/frames")
    if not keys:
        raise ValueError(f"the model wrote no frames into {result.frames_path}")
    return {"frames_prefix": f"{_prefix(ctx)}/frames", "frames": len(keys),
            "model": type(model).__name__}


@ml_video.step(depends_on=["inference"], weight=10, retries=2)
def postprocess(ctx: StepContext) -> dict[str, Any]:
    """Colour correction of every frame (contrast and brightness, OpenCV)."""
    folder = _download_folder(ctx, ctx.data["frames_prefix"])
    out = ctx.tempdir()
    alpha = float(ctx.inputs.get("contrast", 1.0))
    beta = float(ctx.inputs.get("brightness", 0.0))
    paths = _images(folder)
    for n, path in enumerate(paths, 1):
        image = cv2.imread(str(path))
        if image is None:
            raise ValueError(f"frame {path.name} from the model is not a readable image")
        cv2.imwrite(str(out / f"{path.stem}.png"), cv2.convertScaleAbs(image, alpha=alpha,
                                                                       beta=beta))
        if n % 10 == 0 or n == len(paths):
            ctx.progress(100 * n / len(paths), "postprocess")
    keys = _upload_folder(ctx, out, f"{_prefix(ctx)}/post")
    return {"post_prefix": f"{_prefix(ctx)}/post", "post_frames": len(keys)}


@ml_video.step(depends_on=["postprocess"], weight=10, retries=2)
def stitch(ctx: StepContext) -> dict[str, Any]:
    """Frames into an H.264 MP4."""
    folder = _download_folder(ctx, ctx.data["post_prefix"])
    dst = ctx.tempdir() / "output.mp4"
    media.stitch(folder, dst, fps=float(ctx.inputs.get("fps", 25)), preset="veryfast",
                 progress=ctx.progress)
    key = f"{_prefix(ctx)}/output.mp4"
    ctx.objects.put_file(key, dst)
    return {"video": key, "video_info": media.probe(dst).as_dict()}


@ml_video.step(depends_on=["stitch"], weight=10, retries=2)
def thumbnails(ctx: StepContext) -> dict[str, Any]:
    """A thumbnail and a contact sheet of the result."""
    thumb = media.run_media(ctx, "thumbnail", ctx.data["video"], width=320,
                            key="ml/{execution_id}/thumbnail.jpg")
    grid = media.run_media(ctx, "thumbnail_grid", ctx.data["video"], cols=3, rows=2, width=960,
                           key="ml/{execution_id}/grid.jpg")
    return {"thumbnail": thumb["key"], "grid": grid["key"]}


@ml_video.step(depends_on=["thumbnails"], weight=5)
def finalize(ctx: StepContext) -> dict[str, Any]:
    """A manifest of the job next to its outputs."""
    manifest = {k: ctx.data.get(k) for k in ("input_key", "video", "thumbnail", "grid",
                                            "frames", "model", "video_info")}
    manifest.update(prompt=ctx.inputs.get("prompt", ""), style=ctx.inputs.get("style",
                                                                               "default"))
    key = f"{_prefix(ctx)}/manifest.json"
    ctx.objects.put(key, json.dumps(manifest, indent=2, default=str).encode())
    return {"manifest": key}
