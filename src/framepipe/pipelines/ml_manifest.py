"""What the ML video pipeline's finalize step leaves behind: the job's manifest
(:func:`manifest`) and, unless they are kept, no intermediates (:func:`delete_intermediates`)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from framepipe.jobs.context import StepContext

__all__ = ["INTERMEDIATES", "delete_intermediates", "manifest"]

INTERMEDIATES = ("input.", "preprocessed.mp4", "frames/", "post/")
"""What finalize deletes under ``ml/<execution id>/`` once everything else is stored (unless
``keep_intermediates``): the input's copy (never an object key the user gave), the
preprocessed video, the model's frames and the post-processed ones."""


def manifest(ctx: StepContext, inputs: BaseModel, keep: bool) -> dict[str, Any]:
    """What the job used and what it keeps: every input (``prompt``, ``seed`` ...), the upload
    it took (``input``: the client's ``key`` and its ``version``, or ``path``, its size, its
    media info), the model,
    the results and their info; the intermediates' keys only when they are kept (``keep``)."""
    data = ctx.data
    source = {k: v for k, v in (data.get("input_source") or {}).items() if v is not None}
    given = inputs.model_dump(mode="json", exclude={"input", "input_version"})
    out: dict[str, Any] = {
        "execution_id": ctx.execution_id,
        **given,
        "input": {**source, "info": data.get("input_info")},
        "model": data.get("model"),
        "batch_size": data.get("batch_size"),
        "frames": data.get("frames"),
        "video": data.get("video"),
        "video_info": data.get("video_info"),
        "thumbnail": data.get("thumbnail"),
        "grid": data.get("grid"),
    }
    if keep:
        out["intermediates"] = {
            "input": data.get("input_key"),
            "preprocessed": data.get("preprocessed_key"),
            "frames": data.get("frames_prefix"),
            "post": data.get("post_prefix"),
        }
    return out


def delete_intermediates(ctx: StepContext, prefix: str) -> int:
    """Delete :data:`INTERMEDIATES` under ``prefix`` (this execution's folder, ``/`` at its
    end); how many objects went."""
    doomed = [
        info.key
        for info in ctx.objects.list(prefix)
        if info.key.removeprefix(prefix).startswith(INTERMEDIATES)
    ]
    return ctx.objects.delete_many(doomed)
