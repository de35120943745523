"""The one rule for the shared folder's root (``--shared``), for the detector and the backend.

The shared folder is usually another machine's or a volume's (an SMB or NFS share, a Docker
volume) seen through a mount point. A mount point whose share is not mounted is an ordinary,
empty local folder: copies written there never reach the other side, and the backend waits for
them in vain. So neither side creates ``--shared`` or writes into a folder it cannot trust:

* a missing ``--shared`` is refused at start, naming it, unless ``--create-shared`` says it is
  a local folder to create (a single machine, a fresh volume);
* with ``--shared-is-mount`` (the share is mounted at ``--shared``), a ``--shared`` that is not
  a mount point now (:func:`os.path.ismount`: nothing mounted there, only the empty folder
  under it) is refused at start, and the detector checks it again before each copy, so a share
  unmounted while it runs fails that copy at once, naming the folder, instead of filling the
  local disk;
* something there that is not a folder is refused; the detector, which writes there, also
  refuses a folder it may not write to.

Every refusal is a :class:`SharedFolderError` whose text names the folder and what to do.
This module imports nothing of the backend, so the detector can use it as it is.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["SharedFolderError", "add_shared_options", "check_shared", "shared_problem"]


class SharedFolderError(Exception):
    """``--shared`` cannot be used as it is; the text names the folder and what to do."""


def shared_problem(path: Path, *, mount: bool, writable: bool = False) -> str | None:
    """Why ``path`` cannot be the shared folder now (a sentence naming it), or None if it can:
    it is missing, not a folder, not a mount point though ``mount`` says it is one, or (with
    ``writable``) not writable by this process. Creates nothing."""
    shown = str(path)
    try:
        exists = path.exists()
        is_dir = path.is_dir()
    except OSError as exc:  # a stale network mount, permissions on the way
        return f"the shared folder {shown} cannot be reached: {exc.strerror or exc}"
    if not exists:
        return (
            f"the shared folder {shown} does not exist (is the share mounted?); mount it, "
            "or give --create-shared to create it as a local folder"
        )
    if not is_dir:
        return f"the shared folder {shown} is not a folder"
    if mount and not os.path.ismount(path):
        return (
            f"the shared folder {shown} is not a mount point: nothing is mounted there, so "
            "copies would stay on this machine's disk; mount the share there (or drop "
            "--shared-is-mount if it is a local folder)"
        )
    if writable and not os.access(path, os.W_OK | os.X_OK):
        return f"the shared folder {shown} is not writable by this process"
    return None


def check_shared(path: Path, *, create: bool, mount: bool, writable: bool = False) -> Path:
    """``path``, checked at start by :func:`shared_problem` (created first when missing and
    ``create`` is set, never when ``mount`` is: a mount point is not made here). Raises
    :class:`SharedFolderError` naming the folder when it cannot be used."""
    if create and not mount and not path.exists():
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SharedFolderError(
                f"the shared folder {path} could not be created: {exc.strerror or exc}"
            ) from None
    problem = shared_problem(path, mount=mount, writable=writable)
    if problem is not None:
        raise SharedFolderError(problem)
    return path


def add_shared_options(parser: argparse.ArgumentParser, *, when: str = "") -> None:
    """``--shared``, ``--create-shared`` and ``--shared-is-mount``, the same on each side of
    the share; ``when`` says when a mount is checked (" (at start and before each copy)")."""
    parser.add_argument(
        "--shared", type=Path, required=True, help="the shared folder as this machine sees it"
    )
    parser.add_argument(
        "--create-shared",
        action="store_true",
        help="create --shared when it is missing (a local folder); without it a missing "
        "--shared is refused: an unmounted share must not be written to",
    )
    parser.add_argument(
        "--shared-is-mount",
        action="store_true",
        help=f"--shared is where the share is mounted: refuse it{when} while nothing is "
        "mounted there",
    )
