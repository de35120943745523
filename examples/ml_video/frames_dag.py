"""A batch system's per-video DAG on framepipe: ``probe`` -> ``score`` (one step per chunk of
frames, spawned by ``probe``) -> ``aggregate`` (after every chunk), with an incremental import
that submits each new upload once.

    framepipe run examples/ml_video/frames_dag.py:frames_dag --input input=uploads/clip.mp4
    python examples/ml_video/frames_dag.py uploads/     # submit every new upload, wait for them

The importer reads the settings a worker does, the team's ``MINIO_*``, ``DATABASE_FILE`` and
``RABBITMQ_URL`` mapped as :mod:`framepipe.pipelines.ml_worker` maps them; with a broker its
jobs run on the workers (``python -m framepipe.pipelines.ml_worker``), else in it.

Steps (each retried on its own; ``framepipe jobs retry <id>`` resumes at the failed one).
Their weights make the execution's progress: the chunks count once ``probe`` has spawned them
and progress never goes back, so ``probe`` weighs little (1) beside each chunk (10) and
``aggregate`` (10): otherwise the bar would stand still at ``probe``'s share until the chunks
caught up.

- ``probe`` takes the job's own copy of the upload (``frames/<execution id>/input.<ext>``, the
  version pinned when the job was submitted: :func:`~framepipe.pipelines.ml_input.take_object`)
  and probes it: an empty, non-video or audio-only upload, or one over the operator's media
  limits (``FRAMEPIPE_MEDIA_MAX_*``), fails here for good (not retried).
  It spawns one ``score`` step per ``chunk`` frames (``score:{"count":50,"start":0}`` ...).
- ``score(start, count)`` decodes its frames, runs :func:`score_frame` (the model: replace it
  with yours) on one frame in ``every`` and writes ``frames/<id>/scores/<start>.json``. A
  model that raises fails this chunk only: it is retried (``retries=2``), and a retry of the
  execution runs only the chunks that failed. A chunk that decodes no frame (an upload cut
  off past its header) is refused for good.
- ``aggregate`` reads every chunk's scores and writes ``frames/<id>/manifest.json`` (the
  upload, its media info, the frames scored, their mean) and deletes the copy.

:func:`import_new` is the incremental import: it lists a prefix and submits each object not
submitted before (known by ``<key>@<version>`` in the ledger namespace :data:`LEDGER`), so a
re-run, or the same upload listed twice, makes no second job; an object replaced by a new
upload is a new version, and a new job. Run one importer at a time (a cron job).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import av
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from framepipe import JobEngine, Pipeline, StepContext, media
from framepipe.backends.objects import ObjectStore
from framepipe.config import MediaSettings, load_section
from framepipe.errors import InvalidInputError, MediaError
from framepipe.jobs.inputs import LocalPathOrKey, copy_local_file, load_inputs, local_input
from framepipe.jobs.ledger import Ledger
from framepipe.media.limits import check_length, length_limit
from framepipe.pipelines.ml_input import pin_input, probed, take_object
from framepipe.pipelines.ml_worker import map_settings

__all__ = ["LEDGER", "FramesInputs", "frames_dag", "import_new", "score_frame"]

LEDGER = "frames_dag.imported"
"""The ledger namespace of the uploads :func:`import_new` submitted."""

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".ts")


class FramesInputs(BaseModel):
    """The inputs of :data:`frames_dag`; an unknown one is refused at submit."""

    model_config = ConfigDict(extra="forbid")

    input: LocalPathOrKey = Field(description="The video: an object key or a local file.")
    input_version: str | None = Field(None, description="The object's version (pinned).")
    every: int = Field(5, ge=1, description="Score one frame in this many.")
    chunk: int = Field(250, ge=1, description="Frames one score step decodes.")


frames_dag = Pipeline(
    "frames_dag",
    description="Score sampled frames of a video with a model, chunk by chunk.",
    inputs=FramesInputs,
    on_submit=pin_input,
)


def score_frame(image: np.ndarray) -> float:
    """The model: one BGR frame -> a score (here its mean brightness, 0-255)."""
    return float(image.mean())


def _inputs(ctx: StepContext) -> FramesInputs:
    return load_inputs(FramesInputs, ctx.inputs)


@frames_dag.step(weight=1, retries=2)
def probe(ctx: StepContext) -> dict[str, Any]:
    inputs = _inputs(ctx)
    path = local_input(ctx, inputs.input, where="inputs.input", declared=True)
    name = Path(inputs.input).name if path is None else path.name
    key = f"frames/{ctx.execution_id}/input{Path(name).suffix.lower() or '.mp4'}"
    if path is None:
        taken = take_object(ctx, inputs.input, key, inputs.input_version)
        copy = ctx.objects.get_file(key, ctx.tempdir() / "input")
    else:
        copy = copy_local_file(path, ctx.tempdir() / path.name)
        taken = {"path": inputs.input, "size": copy.stat().st_size}
    settings = load_section(MediaSettings)
    info = probed(inputs.input, copy, media.limits_from(settings, length=False))
    limit = length_limit(settings.media_max_duration, settings.media_max_frame_count)
    try:
        check_length(inputs.input, limit, seconds=info["duration"], frames=info["frames"] or 0)
    except MediaError as exc:
        raise InvalidInputError(str(exc), where="inputs.input") from exc
    if path is not None:
        ctx.objects.put_file(key, copy)
    frames = int(info.get("frames") or 0)
    if frames <= 0:  # length unknown: one chunk to the end
        ctx.spawn_step("score", {"start": 0, "count": 0})
    for start in range(0, frames, inputs.chunk):
        ctx.spawn_step("score", {"start": start, "count": min(inputs.chunk, frames - start)})
    return {"input_key": key, "input_info": info, "input_source": taken}


@frames_dag.step(depends_on=["probe"], weight=10, retries=2)
def score(ctx: StepContext, start: int, count: int) -> None:
    """Frames ``start`` .. ``start + count - 1`` (``count`` 0: to the end), one in ``every``
    scored. Decodes from the first frame (a real one seeks to the key frame before
    ``start``)."""
    inputs = _inputs(ctx)
    copy = ctx.objects.get_file(ctx.data["input_key"], ctx.tempdir() / "input")
    scores: dict[str, float] = {}
    end = start + count if count else None
    decoded = 0
    try:
        with av.open(str(copy)) as container:
            frames = enumerate(container.decode(video=0))
            for n, frame in itertools.islice(frames, start, end):
                ctx.check_cancelled()
                decoded += 1
                if n % inputs.every == 0:  # one in every over the whole video, not per chunk
                    scores[str(n)] = score_frame(frame.to_ndarray(format="bgr24"))
                if count and (n - start + 1) % 25 == 0:
                    ctx.progress(100 * (n - start + 1) / count)
        if decoded == 0:
            problem: str | None = "no frame there"
        elif count and decoded < count:  # the header promised more: cut off in this chunk
            problem = f"{decoded} of its {count} frames decoded"
        else:
            problem = None
    except av.error.InvalidDataError as exc:
        problem = str(exc)
    if problem is not None:  # the pinned copy: a retry would read the same bytes
        raise InvalidInputError(
            f"{inputs.input}: frames {start}.. cannot be decoded, cut off or corrupt ({problem})",
            where="inputs.input",
        )
    result = json.dumps({"start": start, "scores": scores}).encode()
    ctx.objects.put(f"frames/{ctx.execution_id}/scores/{start:09d}.json", result)


@frames_dag.step(depends_on=["probe", "score"], weight=10, retries=2)
def aggregate(ctx: StepContext) -> dict[str, Any]:
    prefix = f"frames/{ctx.execution_id}"
    scores: dict[str, float] = {}
    for info in ctx.objects.list(f"{prefix}/scores/"):
        scores.update(json.loads(ctx.objects.get(info.key))["scores"])
    manifest = {
        "execution_id": ctx.execution_id,
        "input": {**ctx.data["input_source"], "info": ctx.data["input_info"]},
        "frames_scored": len(scores),
        "mean_score": sum(scores.values()) / len(scores),
        "scores": dict(sorted(scores.items(), key=lambda item: int(item[0]))),
    }
    key = f"{prefix}/manifest.json"
    ctx.objects.put(key, json.dumps(manifest, indent=2).encode())
    ctx.objects.delete(ctx.data["input_key"])
    return {"manifest": key, "frames_scored": len(scores)}


async def import_new(engine: JobEngine, objects: ObjectStore, prefix: str) -> list[str]:
    """Submit a :data:`frames_dag` job for every video under ``prefix`` not submitted before
    (ledger :data:`LEDGER`, identity ``<key>@<version>``, recorded right after its submit);
    returns the new executions' ids. A crash between a submit and its record makes that
    video's job twice at the next run, never none."""
    ledger = Ledger(engine.store, LEDGER)
    found = {
        f"{info.key}@{info.version}": info
        for info in objects.list(prefix)
        if info.key.lower().endswith(VIDEO_SUFFIXES)
    }
    submitted = []
    for identity in ledger.filter_new(found):
        info = found[identity]
        inputs = {"input": info.key, "input_version": info.version}
        execution_id = await engine.submit(frames_dag, inputs, ref=f"{__file__}:frames_dag")
        ledger.record(identity, size=info.size, meta={"execution_id": execution_id})
        submitted.append(execution_id)
    return submitted


async def _main(prefix: str) -> int:
    os.environ.update(map_settings().environment)  # MINIO_*, DATABASE_FILE, RABBITMQ_URL
    async with JobEngine() as engine:
        ids = await import_new(engine, engine.objects, prefix)
        print(f"{len(ids)} new upload(s) under {prefix!r} submitted: {' '.join(ids)}", flush=True)
        failed = 0
        for execution_id in ids:
            info = await engine.wait(execution_id, raise_on_failure=False)
            print(f"{info.status.value:<11} {execution_id}  {info.inputs['input']}")
            failed += info.status.value != "completed"
        return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Submit every new upload under PREFIX once.")
    parser.add_argument("prefix", help="object-key prefix of the uploads (uploads/)")
    try:
        sys.exit(asyncio.run(_main(parser.parse_args().prefix)))
    except KeyboardInterrupt:  # the engine handed its running steps back
        print(
            "interrupted: the jobs that did not end are interrupted (framepipe jobs list); "
            "resume each with framepipe jobs retry <id>, the importer does not submit them again",
            file=sys.stderr,
        )
        sys.exit(130)
