"""Step folders that a killed process does not leave behind.

A step's folders (``ctx.tempdir()``, :class:`~framepipe.jobs.context.StepContext`) are deleted
when its attempt ends, failed or not; a process that is killed (SIGKILL, the OOM killer)
cannot delete them, and a step's media are often tens of megabytes per attempt.
:class:`HeldFolders` marks each folder it makes as held by its attempt: a file :data:`MARKER`
in it, locked (``flock``) until the attempt ends. The kernel releases the locks of a process
however it ends, so :func:`remove_abandoned`, run when an attempt makes its first folder,
deletes every marked folder in the temporary folder (``tempfile.gettempdir()``) that nobody
holds, whatever execution it was made for: a killed attempt's folders last until the next
step making a folder starts on that machine (its retry, or another execution's step), as
:mod:`framepipe.media.atomic` does for a killed writer's temp file.

Never removed: a folder without the marker (made by anything else), one whose marker is held
(an attempt running in this process or another: a ``flock`` belongs to an open file, so two
attempts of one worker do not share it), a symbolic link, and a folder of another user. On a
file system without locks nothing is marked, so nothing is removed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from framepipe.locks import try_lock

__all__ = ["MARKER", "HeldFolders", "remove_abandoned"]

MARKER = ".framepipe-held"
"""The file, locked while its attempt runs, that marks a folder as removable once it is not."""

_PREFIX = "framepipe-"  # the names StepContext.tempdir gives its folders
_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

log = logging.getLogger("framepipe.steps")


def _hold(folder: Path) -> int | None:
    """Mark ``folder`` as held: its locked marker's descriptor (None: no locks here). The
    marker gets its name only once locked, so a sweep never sees it free while its attempt
    runs."""
    new = folder / f"{MARKER}.new"
    fd = os.open(new, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FLAGS, 0o600)
    try:
        if not try_lock(fd):
            os.close(fd)
            new.unlink()
            return None
        os.write(fd, f"{os.getpid()}\n".encode())
        new.rename(folder / MARKER)
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_abandoned(root: Path | str | None = None) -> int:
    """Delete the marked folders of ``root`` (default: the temporary folder) that nobody
    holds; how many went. Never raises for a folder it cannot read or delete."""
    base = Path(tempfile.gettempdir() if root is None else root)
    removed = 0
    try:
        candidates = [p for p in base.iterdir() if p.name.startswith(_PREFIX)]
    except OSError:
        return 0
    uid = os.getuid()
    for folder in candidates:
        try:
            info = folder.lstat()
            fd = os.open(folder / MARKER, os.O_RDONLY | os.O_NONBLOCK | _FLAGS)
        except OSError:
            continue  # gone, not a folder, not ours to read, or not marked
        try:
            if info.st_uid != uid or folder.is_symlink() or not try_lock(fd):
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed += 1
        except OSError:
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("Removed %d folder(s) that killed step attempts left in %s", removed, base)
    return removed


class HeldFolders:
    """The folders of one attempt, each made by ``make`` (``ctx.tempdir``, which deletes them
    when the attempt ends) and held until :meth:`release` (or the ``with`` block's end). The
    first :meth:`new` first runs :func:`remove_abandoned`. Thread-safe: an ``async`` step may
    make its folders in a thread."""

    def __init__(self, make: Callable[[], Path]) -> None:
        self._make = make
        self._fds: list[int] = []
        self._swept = False
        self._lock = threading.Lock()

    def new(self) -> Path:
        """A new empty folder, held by this attempt."""
        with self._lock:
            if not self._swept:
                self._swept = True
                remove_abandoned()
        folder = self._make()
        fd = _hold(folder)
        if fd is not None:
            with self._lock:
                self._fds.append(fd)
        return folder

    def release(self) -> None:
        """Stop holding the folders (the attempt is over): a sweep may delete them now."""
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> HeldFolders:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
