"""The steps of the shared folder's retention (the rules are in ``retention.py``): ``retention``
finds the copies due, ``release`` removes one once its upload is verified."""

from __future__ import annotations

import time
from typing import Any

from retention import REMOVED, RENDERED, Retention, due_copies, referenced_copies, release_copy
from sd_share import shared_dir_of

from framepipe import StepContext
from framepipe.confined import relative_parts

__all__ = ["release", "retention"]


def retention(ctx: StepContext) -> dict[str, Any]:
    """The shared folder's retention sweep (``retention.py``): one ``release`` step for every
    copy, of this import or an earlier one, that the execution's policy says may go now."""
    raw = ctx.inputs.get("retention")
    policy = Retention.model_validate(raw) if raw else Retention()
    if policy.keeps_all:
        return {"retention": {"policy": policy.describe(), "due": []}}
    shared_dir = shared_dir_of(ctx)
    due = due_copies(ctx.get_ledger(RENDERED).entries(), policy, shared_dir, time.time())
    for entry in due:
        ctx.spawn_step("release", params={"copy_path": entry.identity})
    ctx.log.info("retention (%s): %d copies due", policy.describe(), len(due))
    return {"retention": {"policy": policy.describe(), "due": [e.identity for e in due]}}


def release(ctx: StepContext, copy_path: str) -> dict[str, Any]:
    """Remove one copy from the shared folder once its upload is verified
    (:func:`retention.release_copy`); logged, and recorded in the ledger namespace
    ``sd_import.removed``. A copy that is not proven safe is kept, with the reason."""
    shared_dir = shared_dir_of(ctx)
    relative_parts(copy_path, "copy_path")
    referenced = referenced_copies(ctx)
    outcome = release_copy(
        shared_dir=shared_dir,
        dest=copy_path,
        entry=ctx.get_ledger(RENDERED).get(copy_path),
        objects=ctx.objects,
        referenced_by=referenced.get(copy_path),
        work=ctx.tempdir(),
    )
    if outcome["status"] == "removed":
        ctx.log.info(
            "removed %s from the shared folder: %s is in the object store (%d bytes, SHA-256 %s)",
            copy_path,
            outcome["object_key"],
            outcome["object_size"],
            outcome["sha256"],
        )
        ctx.get_ledger(REMOVED).record(
            copy_path, size=outcome["size"], meta={**outcome, "execution_id": ctx.execution_id}
        )
    elif outcome["status"] == "kept":
        ctx.log.warning("kept %s in the shared folder: %s", copy_path, outcome["reason"])
    return {f"released/{copy_path}": outcome}
