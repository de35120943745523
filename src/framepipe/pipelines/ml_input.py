"""The ML video pipeline's input as its submit pins it (:func:`pin_input`) and its fetch step
takes it: the job's own copy of an object key (:func:`take_object`), refused when the object
was replaced after the submit, and the probe that refuses an empty or non-video input for good
(:func:`probed`).

Guarantees: an object key is pinned when the job is submitted: the object's version tag (its
ETag on S3; on the local store its file's identity, see
:class:`~framepipe.backends.objects.local.LocalObjectStore`) is stored with the job as its
``input_version`` (or the one the submitter gave is checked against the object), and a key
with no object is refused at the submit. Fetch copies that version only
(``copy(..., if_version=)``, one check with the copy): an object replaced at any moment after
the submit, within the same second too, is an :class:`~framepipe.errors.InvalidInputError`
naming the key, and no copy is left. Only where no version was taken (a job submitted before
versions were pinned, a store without them) or after a ``framepipe jobs retry`` (whoever
resumes a job after replacing its input means the new one) is a replacement told by its
modification time, which cannot tell one within :data:`CLOCK_SLACK` seconds of the submit or
retry. A missing object at fetch is a ``FileNotFoundError``; errors name the user's file or
key, never the step's copy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from framepipe import media
from framepipe.backends.objects import ObjectStore
from framepipe.errors import (
    ConfigError,
    InvalidInputError,
    MediaError,
    ObjectNotFoundError,
    ObjectReplacedError,
)
from framepipe.jobs.context import StepContext
from framepipe.jobs.inputs import local_path
from framepipe.jobs.records import get_execution, last_event_at
from framepipe.pipelines.ml_settings import MlVideoSettings

__all__ = ["CLOCK_SLACK", "ignored_minio", "pin_input", "pinned_since", "probed", "take_object"]

CLOCK_SLACK = 2.0
"""Seconds an object may seem modified after its job was submitted and still count as the
one submitted, where no version was pinned: the object store's clock and the submitter's may
differ by that much (and S3 keeps whole seconds)."""

_REPLACED_HINT = (
    "not run on a video its submitter did not send; submit a new job for it, and give each "
    "upload a key of its own"
)


def pin_input(inputs: dict[str, Any], objects: ObjectStore) -> dict[str, Any]:
    """The ML video pipeline's ``on_submit``: ``inputs`` with the version of the object their
    ``input`` names as ``input_version``, taken from ``objects`` now, or the one the submitter
    gave, checked against the object (an ETag with or without its quotes), and stored as the
    store gives it. A local file is copied by fetch and pinned by nothing.
    Refuses (:class:`InvalidInputError`, no job made) a key with no object, a given version
    the object no longer is, and a version given for a local file; and a key where the
    MinIO variables are set but ignored (:func:`ignored_minio`: a :class:`ConfigError` naming
    the setting, not a missing object)."""
    source, given = inputs["input"], inputs.get("input_version")
    if local_path(source) is None and (ignored := ignored_minio(objects)) is not None:
        raise ignored  # the upload is in MinIO, not in the store this process would look in
    if local_path(source) is not None:
        if given is not None:
            raise InvalidInputError(
                "is the version of an object key, and input is a local file",
                where="inputs.input_version",
            )
        return inputs
    try:
        info = objects.stat(source)
    except ObjectNotFoundError:
        raise InvalidInputError(
            f"{source!r}: no such object in the object store ({objects.url}); upload it first",
            where="inputs.input",
        ) from None
    # an S3 ETag is quoted; MinIO's clients and others give it without: the same version
    if given is not None and (info.version is None or given.strip('"') != info.version.strip('"')):
        raise InvalidInputError(
            f"{source!r} is no longer version {given} (it is {info.version}): it was replaced "
            "since; submit the version it holds, or upload yours again",
            where="inputs.input_version",
        )
    return {**inputs, "input_version": info.version}


def ignored_minio(objects: ObjectStore) -> ConfigError | None:
    """The refusal where the original worker's MinIO variables are set but this process
    ignores them and stores ``objects`` locally (it was not started by
    :mod:`framepipe.pipelines.ml_worker`, which maps them), else None: the files would go to
    the local store instead of MinIO, and an upload there would not be found."""
    ml = MlVideoSettings.load()
    if (
        ml.uses_minio
        and objects.url.startswith("file:")
        and not os.environ.get("FRAMEPIPE_OBJECTS_URL")
    ):
        return ConfigError(
            "MINIO_ENDPOINT/MINIO_BUCKET ... are set but this process stores objects locally "
            f"({objects.url}): set FRAMEPIPE_OBJECTS_URL={ml.objects_url()} with "
            "FRAMEPIPE_S3_ACCESS_KEY and FRAMEPIPE_S3_SECRET_KEY, or start the worker with "
            "python -m framepipe.pipelines.ml_worker, which maps them"
        )
    return None


def pinned_since(ctx: StepContext) -> tuple[float, bool]:
    """When the inputs were last confirmed, and whether by a retry: the submit, or the latest
    ``framepipe jobs retry`` (whoever resumes a job after replacing its input means the new
    one)."""
    info = get_execution(ctx.store, ctx.execution_id, with_steps=False)
    if info.runs <= 1:
        return info.created_at, False
    retried = last_event_at(ctx.store, ctx.execution_id, event_type="execution.retried")
    if retried is None or retried <= info.created_at:
        return info.created_at, False
    return retried, True


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


def take_object(
    ctx: StepContext, source: str, key: str, pinned: str | None = None
) -> dict[str, Any]:
    """Copy the object ``source`` to this job's ``key``: the version ``pinned`` at the submit
    (:func:`pin_input`), or the job is refused naming the key (see the module for the rule
    where there is none, or after a retry). Returns what was taken."""
    try:
        before = ctx.objects.stat(source)
    except ObjectNotFoundError:
        raise FileNotFoundError(f"input {source!r}: no such object in the object store") from None
    version = pinned
    if pinned is None or before.version != pinned:
        since, retried = pinned_since(ctx)
        if pinned is not None and not retried:
            raise InvalidInputError(
                f"{source!r} was replaced after this job was submitted (it is no longer the "
                f"version submitted, {pinned}): {_REPLACED_HINT}",
                where="inputs.input",
            )
        if before.modified > since + CLOCK_SLACK:
            raise InvalidInputError(
                f"{source!r} was replaced after this job was submitted (modified "
                f"{_when(before.modified)}, {'retried' if retried else 'submitted'} "
                f"{_when(since)}): {_REPLACED_HINT}",
                where="inputs.input",
            )
        version = before.version  # as it was confirmed: no other is copied
    try:
        ctx.objects.copy(source, key, if_version=version)
    except ObjectReplacedError:
        raise InvalidInputError(
            f"{source!r} was replaced while this job copied it: {_REPLACED_HINT}",
            where="inputs.input",
        ) from None
    except ObjectNotFoundError:
        raise FileNotFoundError(f"input {source!r}: no such object in the object store") from None
    if version is None:  # a store without versions: compare what stat shows
        after = ctx.objects.stat(source)
        if (after.size, after.modified) != (before.size, before.modified):
            ctx.objects.delete(key)
            raise InvalidInputError(
                f"{source!r} was replaced while this job copied it: {_REPLACED_HINT}",
                where="inputs.input",
            )
    return {"key": source, "size": before.size, "modified": before.modified, "version": version}


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))
