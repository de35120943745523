"""The SD-card detector's copies: one file from a card into the shared folder.

A copy goes to a temporary name beside its target, is synced and checked against the listing
(size and fingerprint) and only then renamed to its final name: a final name is always a
whole, checked copy. Every folder is reached from an opened folder, never through a link.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sd_cards import Card, open_card_root
from sd_folders import OpenFolder
from shared_root import shared_problem

from framepipe.confined import (
    LinkRefusedError,
    RootChangedError,
    relative_parts,
)
from framepipe.errors import InvalidInputError

__all__ = ["CopyAborted", "copy_file"]

log = logging.getLogger("sd_detector")


class CopyAborted(Exception):
    """The connection the request came on closed: stop, the backend will ask again."""


def copy_file(
    card: Card,
    rel: str,
    shared: Path,
    dest_rel: str,
    *,
    size: int,
    fingerprint: str,
    abort: threading.Event | None = None,
    progress: Callable[[int], None] | None = None,
    max_rate: float | None = None,
    shared_mount: bool = False,
) -> dict[str, Any]:
    """Copy ``rel`` of ``card`` to ``dest_rel`` under ``shared`` (temp name created
    exclusively, fsync, check size and fingerprint, atomic rename), following no link on
    either side; the ``sd:file_copied`` fields.

    ``shared`` itself is never created: when it is missing, or not a mount point though
    ``shared_mount`` says the share is mounted there (:func:`shared_root.shared_problem`),
    nothing is copied and the answer is ``io_error`` naming the folder (an unmounted share's
    empty mount point is not written to)."""
    try:
        src_parts = relative_parts(rel, "path")
        dst_parts = relative_parts(dest_rel, "dest")
    except InvalidInputError as exc:
        return {
            "ok": False,
            "code": "refused",
            "error": f"{rel!r} -> {dest_rel!r} leaves the card or the shared folder ({exc})",
        }
    gone = {
        "ok": False,
        "code": "not_mounted",
        "error": f"card {card.card_id} is not mounted at {card.root} any more",
    }
    if card.removed:
        return gone
    try:  # the very folder the poll saw, never a link put in its place since
        top = open_card_root(card.root, identity=card.identity, watched=card.watched)
    except FileNotFoundError:
        return gone
    except RootChangedError:
        return {
            **gone,
            "error": f"{rel}: card {card.card_id} at {card.root} is not the folder that was "
            "listed any more (replaced or mounted again since); nothing is read from it",
        }
    except LinkRefusedError:
        return {
            "ok": False,
            "code": "refused",
            "error": f"{rel}: card {card.card_id}: its folder {card.root} was replaced by a "
            "symbolic link (or something that is not a folder) since it was listed; the "
            "link is not followed and nothing is read through it",
        }
    except OSError as exc:
        return {
            "ok": False,
            "code": "io_error",
            "error": f"{rel}: card {card.card_id}: {exc.strerror or exc}",
        }
    try:
        with OpenFolder(card.root, src_parts[:-1], where="on the card", top=top) as src_dir:
            fd_in = src_dir.open_file(src_parts[-1])
    except LinkRefusedError as exc:
        return {"ok": False, "code": "refused", "error": f"{rel}: {exc}"}
    except FileNotFoundError:
        return {"ok": False, "code": "vanished", "error": f"{rel} is no longer on the card"}
    except OSError as exc:
        return {"ok": False, "code": "io_error", "error": f"{rel}: {exc.strerror or exc}"}
    finally:
        if top is not None:
            os.close(top)
    try:
        with os.fdopen(fd_in, "rb") as fin:
            problem = shared_problem(shared, mount=shared_mount)
            if problem is not None:
                return {"ok": False, "code": "io_error", "error": f"{rel}: not copied: {problem}"}
            with OpenFolder(
                shared, dst_parts[:-1], where="in the shared folder", make=True
            ) as dst_dir:
                return _copy(
                    fin,
                    dst_dir,
                    dst_parts[-1],
                    rel,
                    dest_rel,
                    size=size,
                    fingerprint=fingerprint,
                    abort=abort,
                    progress=progress,
                    max_rate=max_rate,
                )
    except LinkRefusedError as exc:
        return {"ok": False, "code": "refused", "error": f"{rel}: {exc}"}
    except OSError as exc:  # the card's file is open: an error here is the shared folder's
        return {
            "ok": False,
            "code": "io_error",
            "error": f"{rel} -> {dest_rel}: {exc.strerror or exc}",
        }


def _copy(
    fin: Any,
    dst_dir: OpenFolder,
    name: str,
    rel: str,
    dest_rel: str,
    *,
    size: int,
    fingerprint: str,
    abort: threading.Event | None,
    progress: Callable[[int], None] | None,
    max_rate: float | None,
) -> dict[str, Any]:
    """The copy itself, into ``name`` of ``dst_dir`` (see :func:`copy_file`)."""
    try:
        existing = dst_dir.lstat(name)
    except FileNotFoundError:
        existing = None
    if existing is not None:
        if not stat.S_ISREG(existing.st_mode):
            raise LinkRefusedError(
                f"{dst_dir.shown(name)!r} is a symbolic link or not a "
                "regular file where the copy goes",
                where=dst_dir.where,
            )
        if existing.st_size == size:
            fd = dst_dir.open_file(name)
            try:
                same = dst_dir.fingerprint(fd, name) == fingerprint
            finally:
                os.close(fd)
            if same:
                return {
                    "ok": True,
                    "dest": dest_rel,
                    "size": size,
                    "fingerprint": fingerprint,
                    "already": True,
                }
    tmp = f".{name}.part"
    chunk = 1 << 20 if not max_rate else max(4096, min(1 << 20, int(max_rate / 10)))
    started = time.monotonic()
    copied = 0
    fd_out = dst_dir.create(tmp)
    try:
        with os.fdopen(fd_out, "r+b") as fout:
            while block := fin.read(chunk):
                if abort is not None and abort.is_set():
                    raise CopyAborted(rel)
                fout.write(block)
                copied += len(block)
                if progress is not None:
                    progress(copied)
                if max_rate:
                    ahead = copied / max_rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            fout.flush()
            os.fsync(fout.fileno())
            got = os.fstat(fout.fileno()).st_size
            if got != size or dst_dir.fingerprint(fout.fileno(), tmp) != fingerprint:
                return {
                    "ok": False,
                    "code": "changed",
                    "error": f"{rel} differs from the "
                    f"listing (size {got}, listed {size}, or another fingerprint): insert "
                    "the card again to list it anew",
                }
        dst_dir.replace(tmp, name)
        dst_dir.sync()
    finally:
        dst_dir.remove(tmp)  # ours (or nothing, once renamed); removing a link follows none
    return {"ok": True, "dest": dest_rel, "size": size, "fingerprint": fingerprint}


# -- the process -----------------------------------------------------------------------------
