"""The ``plan`` step: what of the card is new, and every step the import will run for it.

The ledger drops what was imported, and what another import that has not ended lists (it
renders those: :data:`sd_imports.UNENDED`). Every step plan can know of exists from the start
(a copy and a scan for each new small file, a copy, a probe and a render for each new video),
so the progress bar does not stand still while work is added.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from qr_bookings import QR_NAMESPACE
from sd_imports import UNENDED
from sd_keys import identity
from sd_share import shared_dir_of

from framepipe import StepContext
from framepipe.confined import relative_parts
from framepipe.jobs.models import ExecutionInfo

__all__ = ["plan", "spawn_processing"]


def spawn_processing(ctx: StepContext, path: str, after: str | None) -> None:
    """``extract_metadata`` -> ``render`` of the video ``path`` (after the step ``after``)."""
    meta = ctx.spawn_step(
        "extract_metadata", params={"path": path}, depends_on=[after] if after else None
    )
    ctx.spawn_step("render", params={"path": path}, depends_on=[meta])


def _taken(ctx: StepContext, identities: Mapping[str, str]) -> dict[str, str]:
    """Paths (of ``identities``: path -> identity) that another import lists too, each with
    that import's id: it renders them, not this one. That import is one of this card that has
    not ended (:data:`~sd_imports.UNENDED`), or one of another card, started before this one
    and pending or running: a card holding the same clips (a camera writing both its card
    slots, a cloned card) in the other reader at once has each video copied and rendered
    once, by the import that came first. A read of the state store."""
    wanted = {ident: path for path, ident in identities.items()}
    found: dict[str, str] = {}
    unended = ctx.executions(status=UNENDED, limit=1_000_000)
    mine = next((info for info in unended if info.id == ctx.execution_id), None)

    def first(info: ExecutionInfo) -> bool:
        return mine is None or (info.created_at, info.id) < (mine.created_at, mine.id)

    for info in unended:
        if (
            info.id == ctx.execution_id
            or not isinstance(info.inputs.get("files"), list)
            or (
                info.inputs.get("card_id") != ctx.inputs.get("card_id")
                and (info.status.value not in ("pending", "running") or not first(info))
            )
        ):
            continue
        for entry in info.inputs["files"]:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                path = wanted.get(identity(entry))
                if path is not None:
                    found.setdefault(path, info.id)
    return found


def plan(ctx: StepContext) -> dict[str, Any]:
    """Drop what the ledger holds and what another unfinished import renders; copy the new
    small files first (QR candidates, each then scanned), then, once ``assign`` has told their
    bookings, each new video: every step the import will run that plan can know of exists
    from here on, so its progress does not stand still while work is added."""
    shared_dir_of(ctx)  # an import that may not read its shared folder stops here
    files = ctx.inputs.get("files")
    if not isinstance(files, list):
        raise TypeError("input 'files' must be the card's file list")
    for n, entry in enumerate(files):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("fingerprint"), str)
        ):
            raise TypeError(f"file list entry {n} ({entry!r}) needs path, size, fingerprint")
        relative_parts(entry["path"], f"inputs.files[{n}].path")
    limit = int(ctx.inputs.get("small_limit", 50 * 1024 * 1024))
    ids = {e["path"]: identity(e) for e in files}
    new_ids = set(ctx.ledger.filter_new(ids.values()))
    qr_ledger = ctx.get_ledger(QR_NAMESPACE)
    known_qr: dict[str, dict[str, Any]] = {}
    for path, ident in ids.items():
        if ident not in new_ids:
            entry = qr_ledger.get(ident)
            if entry is not None:
                known_qr[path] = dict(entry.meta)
    fresh = [e for e in files if ids[e["path"]] in new_ids]
    taken = _taken(ctx, {e["path"]: ids[e["path"]] for e in fresh})
    new = [e for e in fresh if e["path"] not in taken]
    # Every QR candidate is scanned, also one another import lists: the bookings of the
    # videos after it depend on it, and a scan is cheap.
    small = [e for e in fresh if e["size"] < limit]
    previous: str | None = None
    for e in small:  # one after another: the card reader copies one file at a time anyway
        previous = ctx.spawn_step(
            "copy", params={"path": e["path"]}, depends_on=[previous] if previous else None
        )
        ctx.spawn_step("scan_qr", params={"path": e["path"]}, depends_on=[previous])
    previous = None
    for e in sorted(new, key=lambda e: (float(e.get("mtime", 0)), e["path"])):
        if e["size"] < limit:
            continue  # a small video's processing is spawned by assign
        previous = ctx.spawn_step(
            "copy",
            params={"path": e["path"], "video": True},
            depends_on=[previous] if previous else ["assign"],
        )
        spawn_processing(ctx, e["path"], previous)
    ctx.progress(100, f"{len(new)} new of {len(files)} files, {len(small)} small")
    return {
        "plan": {
            "card_id": ctx.inputs.get("card_id"),
            "files": len(files),
            "new": [e["path"] for e in new],
            "small": [e["path"] for e in small],
            "known_qr": known_qr,
            "taken": taken,
        }
    }
