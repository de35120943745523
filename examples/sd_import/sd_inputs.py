"""The inputs of one import: declared, so checked when it is submitted, and read by its steps.

Whoever submits an execution, the backend's detector handler or a client of ``POST
/api/executions``, is checked before it exists (:class:`SdImportInputs`): a malformed file
list, card id or limit is refused naming the field, and ``shared_dir`` (a
:data:`~framepipe.jobs.inputs.LocalPath`) and a local ``intro`` or ``splash`` must lie inside
the submitter's ``input_roots``. Over HTTP those are the setting ``FRAMEPIPE_INPUT_ROOTS``
(none by default), so a client cannot point an import at a folder of its choice and have it
read; the backend's own submissions are confined to its shared folder (and the folders of the
intro and splash it was configured with). Every step reads those paths through
:func:`framepipe.jobs.inputs.local_input`, which checks them against the execution's recorded
roots again (:func:`asset` here, :func:`sd_share.shared_dir_of`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from retention import Retention
from sd_messages import CARD_ID_PATTERN, FileEntry, SkippedFile

from framepipe import StepContext
from framepipe.jobs.inputs import LocalPath, LocalPathOrKey, copy_local_file, local_input

__all__ = ["SdImportInputs", "asset", "card_file"]


class SdImportInputs(BaseModel):
    """The inputs of one import (see the module): checked at submit, whoever submits."""

    model_config = ConfigDict(extra="forbid")
    hub: str = Field(min_length=1, max_length=200, description="The detector hub's id.")
    session_id: str = Field(min_length=1, max_length=200)
    detector_id: str | None = Field(None, max_length=200)
    card_id: str = Field(min_length=1, max_length=200, pattern=CARD_ID_PATTERN)
    label: str = Field("", max_length=1000)
    shared_dir: LocalPath = Field(
        description="The shared folder as the backend sees it; inside the submitter's input_roots."
    )
    small_limit: int = Field(
        50 * 1024 * 1024, ge=0, description="Files smaller than this (bytes) are QR candidates."
    )
    files: list[FileEntry] = Field(max_length=100_000)
    skipped: list[SkippedFile] = Field(
        default_factory=list,
        max_length=100_000,
        description="Files on the card the detector left out (not UTF-8, too deep ...): "
        "reported by the summary, never imported.",
    )
    intro: LocalPathOrKey | None = None
    splash: LocalPathOrKey | None = None
    retention: Retention | None = Field(
        None, description="When copies leave the shared folder (retention.py); None keeps them."
    )


def card_file(ctx: StepContext, path: str) -> dict[str, Any]:
    """The entry of the card file ``path`` in the ``files`` input (``KeyError`` if none)."""
    for entry in ctx.inputs["files"]:
        if entry["path"] == path:
            return dict(entry)
    raise KeyError(f"{path!r} is not in the card's file list")


def asset(ctx: StepContext, name: str, work: Path) -> Path | None:
    """The ``intro`` or ``splash`` input in ``work``: a local file allowed by the execution's
    roots (copied without following links) or an object; None when not given."""
    value = ctx.inputs.get(name)
    if not value:
        return None
    local = local_input(ctx, value, where=f"inputs.{name}", declared=True)
    if local is None:
        return ctx.objects.get_file(value, work / f"{name}-{PurePosixPath(value).name}")
    return copy_local_file(local, work / f"{name}-{local.name}")
