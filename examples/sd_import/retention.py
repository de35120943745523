"""Retention of the shared folder: when a copy of a card's video may be removed from it.

The detector copies each video into the shared folder; rendering reads the copy and uploads
the booking's video to the object store. Without retention the copies stay for ever. The
operator's policy (:class:`Retention`, from the settings ``SHARED_VIDEOS_DELETE_AFTER_UPLOAD``
and ``SHARED_VIDEOS_RETENTION_DAYS``, or the backend's ``--delete-after-upload`` and
``--retention-days``) says when a copy becomes *due*: at once once its render is uploaded,
and/or when its upload is that many days old. Neither set: copies are kept (the default).

A due copy is removed only when all of this holds, checked by :func:`release_copy` just
before the removal, else it is kept and the reason told:

* its render was recorded as uploaded (the ledger namespace :data:`RENDERED`, written with the
  render step's completion: a failed render or upload records nothing);
* the object is in the store now with the recorded size, and its SHA-256 (read back from the
  store) is the one of the file that was uploaded;
* no execution of the import that has not completed (pending, running, failed, cancelled,
  interrupted: each may still run and read it) lists the copy's card file;
* the copy is a regular file reached below the shared folder without following a link
  (:func:`framepipe.confined.open_dir_beneath`), with the size and fingerprint the card's file
  had: a link planted in its place, or another file put there since, is not removed (the
  removal unlinks that name in that folder, never what a link points to).

Every removal is logged, recorded in the ledger namespace :data:`REMOVED` (the copy, its
object, size, SHA-256, the execution and when) and is its own step (``release:<file>-<hash>``)
whose events (``step.spawned``, ``step.completed``) and output say what happened, so an
operator can audit it. QR clips and held videos are never uploaded, so they are never removed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from card_paths import copy_dests
from env_numbers import non_negative_number
from pydantic import BaseModel, ConfigDict, Field

from framepipe.backends.objects import ObjectStore
from framepipe.confined import (
    LinkRefusedError,
    fd_path,
    open_beneath,
    open_dir_beneath,
    relative_parts,
)
from framepipe.errors import ConfigError, FramepipeError, ObjectNotFoundError
from framepipe.jobs.context import StepContext
from framepipe.jobs.ledger import LedgerEntry, content_hash, file_fingerprint

__all__ = [
    "DAY",
    "REMOVED",
    "RENDERED",
    "Retention",
    "due_copies",
    "referenced_copies",
    "release_copy",
    "retention_from_env",
]

RENDERED = "sd_import.rendered"
"""Ledger namespace: a copy (identity: its path in the shared folder) whose render is uploaded;
meta: ``object_key``, ``object_size``, ``sha256``, ``size`` and ``fingerprint`` of the copy, and
``uploaded_at`` when the object was uploaded before the copy was recorded (a video another
import rendered: the copy is due from that upload; else from the record's own time)."""
REMOVED = "sd_import.removed"
"""Ledger namespace: a copy removed from the shared folder, with what proved it safe."""
DAY = 86_400.0
UNFINISHED = ("pending", "running", "failed", "cancelled", "interrupted")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class Retention(BaseModel):
    """When copies in the shared folder are removed; the default keeps them."""

    model_config = ConfigDict(extra="forbid", strict=True)
    after_upload: bool = Field(
        default=False, description="Remove a copy once its rendered video is verified in the store."
    )
    days: float | None = Field(
        default=None, ge=0, description="Remove a copy this many days after its video was uploaded."
    )

    @property
    def keeps_all(self) -> bool:
        """True when no copy is ever removed."""
        return not self.after_upload and self.days is None

    def is_due(self, uploaded_at: float, now: float) -> bool:
        """Whether a copy whose render was uploaded at ``uploaded_at`` may go at ``now``."""
        if self.after_upload:
            return True
        return self.days is not None and now - uploaded_at >= self.days * DAY

    def describe(self) -> str:
        if self.keeps_all:
            return "keep copies"
        parts = ["after upload"] if self.after_upload else []
        if self.days is not None:
            parts.append(f"after {self.days:g} days")
        return "remove copies " + " or ".join(parts)


def retention_from_env(environ: Mapping[str, str] | None = None) -> Retention:
    """The policy of ``SHARED_VIDEOS_DELETE_AFTER_UPLOAD`` (``true``/``false``, also
    ``1``/``0``, ``yes``/``no``) and ``SHARED_VIDEOS_RETENTION_DAYS`` (a number of days >= 0,
    fractions allowed; empty or unset: no age limit). A malformed value is a
    :class:`~framepipe.errors.ConfigError` naming the variable."""
    env = os.environ if environ is None else environ
    raw_flag = env.get("SHARED_VIDEOS_DELETE_AFTER_UPLOAD", "").strip().lower()
    if raw_flag not in _TRUE | _FALSE:
        raise ConfigError(f"SHARED_VIDEOS_DELETE_AFTER_UPLOAD={raw_flag!r}: use true or false")
    days = non_negative_number(
        env,
        "SHARED_VIDEOS_RETENTION_DAYS",
        "use a number of days >= 0 (e.g. 7, or 0.5 for twelve hours), or leave it unset to "
        "keep copies",
    )
    return Retention(after_upload=raw_flag in _TRUE, days=days)


def referenced_copies(ctx: StepContext) -> dict[str, str]:
    """Copies (path in the shared folder -> execution id) that an execution of this step's
    pipeline other than its own lists and that has not completed, so may still read them:
    each listed file's copy by :func:`card_paths.copy_dest`, and by the plain
    ``<card_id>/<path>`` of imports made before copies were named by their content."""
    found: dict[str, str] = {}
    but = ctx.execution_id
    for info in ctx.executions(status=UNFINISHED, limit=1_000_000):
        if info.id == but:
            continue
        card = info.inputs.get("card_id")
        files = info.inputs.get("files")
        if not isinstance(card, str) or not isinstance(files, list):
            continue
        for entry in files:
            for dest in copy_dests(card, entry):
                found.setdefault(dest, info.id)
    return found


def _exists(shared_dir: Path, dest: str) -> bool:
    """Whether something (a file, a link, anything) is at ``dest`` below ``shared_dir``."""
    parts = relative_parts(dest, "dest")
    try:
        folder = open_dir_beneath(shared_dir, parts[:-1])
    except (OSError, FramepipeError):
        return False
    try:
        os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
    except OSError:
        return False
    finally:
        os.close(folder)
    return True


def due_copies(
    rendered: Iterable[LedgerEntry], policy: Retention, shared_dir: Path, now: float
) -> list[LedgerEntry]:
    """The rendered copies the policy says may go now and that are still in the folder."""
    if policy.keeps_all:
        return []
    return [
        e
        for e in rendered
        if policy.is_due(float(e.meta.get("uploaded_at", e.imported_at)), now)
        and _exists(shared_dir, e.identity)
    ]


def _object_problem(objects: ObjectStore, meta: Mapping[str, Any], work: Path) -> str | None:
    """Why the uploaded object does not prove the render safe, or None when it does."""
    key = str(meta["object_key"])
    try:
        info = objects.stat(key)
    except ObjectNotFoundError:
        return f"{key} is not in the object store"
    except FramepipeError as exc:
        return f"the object store could not be read: {exc}"
    if info.size != meta["object_size"]:
        return (
            f"{key} in the object store has {info.size} bytes, the upload had {meta['object_size']}"
        )
    try:
        local = objects.get_file(key, work / "uploaded")
    except FramepipeError as exc:
        return f"{key} could not be read back from the object store: {exc}"
    got = content_hash(local)
    if got != meta["sha256"]:
        return f"{key} in the object store is not the uploaded file (SHA-256 {got[:16]}...)"
    return None


def release_copy(
    *,
    shared_dir: Path,
    dest: str,
    entry: LedgerEntry | None,
    objects: ObjectStore,
    referenced_by: str | None,
    work: Path,
) -> dict[str, Any]:
    """Remove the copy ``dest`` from ``shared_dir`` if it is proven safe (see the module):
    ``{"status": "removed", ...}`` with the proof, ``{"status": "kept", "reason": ...}``, or
    ``{"status": "gone"}`` when there is no copy any more (removed by an earlier attempt)."""
    if entry is None:
        return {"status": "kept", "reason": "its render was never recorded as uploaded"}
    meta = entry.meta
    if referenced_by is not None:
        return {
            "status": "kept",
            "reason": f"execution {referenced_by[:12]}, which has not completed, lists it",
        }
    problem = _object_problem(objects, meta, work)
    if problem is not None:
        return {"status": "kept", "reason": problem}
    parts = relative_parts(dest, "dest")
    try:
        folder = open_dir_beneath(shared_dir, parts[:-1], where="in the shared folder")
    except FileNotFoundError:
        return {"status": "gone"}
    except (LinkRefusedError, OSError) as exc:
        return {"status": "kept", "reason": f"its folder is not reached: {exc}"}
    try:
        try:
            st = os.stat(parts[-1], dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            return {"status": "gone"}
        if not stat.S_ISREG(st.st_mode):
            return {"status": "kept", "reason": "it is not a regular file (a link?); not followed"}
        fd = open_beneath(shared_dir, parts, where="in the shared folder")
        try:
            size = os.fstat(fd).st_size
            fingerprint = file_fingerprint(fd_path(fd))
        finally:
            os.close(fd)
        if size != meta["size"] or fingerprint != meta["fingerprint"]:
            return {"status": "kept", "reason": "it is not the file that was rendered any more"}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(parts[-1], dir_fd=folder)
    except LinkRefusedError as exc:
        return {"status": "kept", "reason": str(exc)}
    finally:
        os.close(folder)
    return {
        "status": "removed",
        "object_key": meta["object_key"],
        "object_size": meta["object_size"],
        "sha256": meta["sha256"],
        "size": meta["size"],
    }
