"""The ML video pipeline's input as its fetch step takes it: the job's own copy of an object
key (:func:`take_object`), refused when the object was replaced after the submit, and the
probe that refuses an empty or non-video input for good (:func:`probed`).

Guarantees: an object modified more than :data:`CLOCK_SLACK` seconds after the job was
submitted (or after its latest ``framepipe jobs retry``), or while it was copied, is an
:class:`~framepipe.errors.InvalidInputError` naming the key, and no copy is left; a missing
one is a ``FileNotFoundError``; errors name the user's file or key, never the step's copy.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from framepipe import media
from framepipe.errors import InvalidInputError, MediaError, ObjectNotFoundError
from framepipe.jobs.context import StepContext
from framepipe.jobs.records import get_execution, last_event_at

__all__ = ["CLOCK_SLACK", "pinned_since", "probed", "take_object"]

CLOCK_SLACK = 2.0
"""Seconds an object may seem modified after its job was submitted and still count as the
one submitted: the object store's clock and the submitter's may differ by that much."""


def pinned_since(ctx: StepContext) -> float:
    """When the inputs were last confirmed: the submit, or the latest ``framepipe jobs
    retry`` (whoever resumes a job after replacing its input means the new one)."""
    info = get_execution(ctx.store, ctx.execution_id, with_steps=False)
    if info.runs <= 1:
        return info.created_at
    retried = last_event_at(ctx.store, ctx.execution_id, event_type="execution.retried")
    return info.created_at if retried is None else max(info.created_at, retried)


def probed(source: str, copy: Path, limits: Mapping[str, Any]) -> dict[str, Any]:
    """``copy``'s media info, probed within ``limits`` (the operator's media limits). An
    empty file, or one that is no video or over the limits, is an :class:`InvalidInputError`
    naming ``source``: refused for good, since a retry would read the same bytes
    (``framepipe jobs retry`` once it is replaced, or the limit raised)."""
    if copy.stat().st_size == 0:
        raise InvalidInputError(f"{source}: is empty (0 bytes), not a video", where="inputs.input")
    try:
        info = media.probe(copy, **limits).as_dict()
    except MediaError as exc:  # name the user's file, not this step's copy of it
        reason = exc.reason.replace(str(copy), source)
        raise InvalidInputError(f"{source}: {reason}", where="inputs.input") from exc
    return {**info, "path": source}


def take_object(ctx: StepContext, source: str, key: str) -> dict[str, Any]:
    """Copy the object ``source`` to this job's ``key``, refusing it when it was replaced
    after the job was submitted (:func:`pinned_since`; a replacement within
    :data:`CLOCK_SLACK` seconds of the submit cannot be told apart) or while it was copied:
    the job is then not run on a video its submitter never saw. Returns what was taken."""
    try:
        before = ctx.objects.stat(source)
    except ObjectNotFoundError:
        raise FileNotFoundError(f"input {source!r}: no such object in the object store") from None
    since = pinned_since(ctx)
    if before.modified > since + CLOCK_SLACK:
        raise InvalidInputError(
            f"{source!r} was replaced after this job was submitted (modified "
            f"{_when(before.modified)}, submitted {_when(since)}): not run on a video its "
            "submitter did not send; submit a new job for it, and give each upload a key of "
            "its own",
            where="inputs.input",
        )
    ctx.objects.copy(source, key)
    after = ctx.objects.stat(source)
    if (after.size, after.modified) != (before.size, before.modified):
        ctx.objects.delete(key)
        raise InvalidInputError(
            f"{source!r} was replaced while this job copied it: submit a new job for it, and "
            "give each upload a key of its own",
            where="inputs.input",
        )
    return {"key": source, "size": before.size, "modified": before.modified}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
