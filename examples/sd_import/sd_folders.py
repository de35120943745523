"""Folders reached without following a link: the SD-card detector reads cards and writes
the shared folder only through them.

An :class:`OpenFolder` is opened from its root segment by segment with ``O_NOFOLLOW`` and every
name in it is used relative to the open folder (``dir_fd``), so a link put in place of a folder
(by whoever can write there) is refused, never followed, and nothing renamed above it can
redirect a name. Where the platform has no ``dir_fd`` (Windows) each segment is checked instead.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from framepipe.confined import (
    LinkRefusedError,
    fd_path,
    open_dir_beneath,
)
from framepipe.jobs.ledger import file_fingerprint

__all__ = ["AT", "OpenFolder"]

AT = {os.open, os.stat, os.unlink, os.rename} <= os.supports_dir_fd
"""Names are used relative to open folders (POSIX; not Windows, where paths are checked)."""
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a fifo where a file is expected: no wait
_BINARY = getattr(os, "O_BINARY", 0)  # Windows
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class OpenFolder:
    """A folder below ``root``, reached without following a link, in which names are opened,
    created, checked, renamed and removed relative to the folder itself (``dir_fd``), so
    nothing renamed or linked above it meanwhile can redirect them.

    Where the platform has no ``dir_fd`` (Windows), each segment is checked not to be a link
    before the path is used (a check a racing writer could defeat) and names are used by path.
    Raises :class:`LinkRefusedError` naming the first segment that is a link or not a folder
    (relative to ``root``; ``where`` names the root in messages), ``FileNotFoundError`` for
    a missing folder (created instead with ``make``). ``top``: the root already open (a
    card's, :func:`open_card_root`); the walk then starts from that very folder, not from
    whatever is at ``root`` by name now (``root`` only names it)."""

    def __init__(
        self,
        root: Path,
        parts: Sequence[str],
        *,
        where: str,
        make: bool = False,
        top: int | None = None,
    ) -> None:
        self.where = where
        self.parts = tuple(parts)
        self.fd: int | None = None
        self.path = root.joinpath(*self.parts)
        if AT:
            start = root if top is None else top
            self.fd = open_dir_beneath(start, self.parts, where=where, make_dirs=make)
            return
        path = root
        for i, part in enumerate(self.parts):
            path = path / part
            if (
                path.is_symlink()
                or getattr(path, "is_junction", lambda: False)()
                or (path.exists() and not path.is_dir())
            ):
                raise LinkRefusedError(
                    f"{'/'.join(self.parts[: i + 1])!r} is a symbolic link "
                    "or not a folder; links are not followed below the "
                    "root",
                    where=where,
                )
            if make:
                path.mkdir(exist_ok=True)
        if not path.is_dir():
            raise FileNotFoundError(errno.ENOENT, "no such folder", "/".join(self.parts))

    def __enter__(self) -> OpenFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def shown(self, name: str) -> str:
        """``name`` as a path relative to the root (for messages: no absolute paths)."""
        return "/".join((*self.parts, name))

    def _name(self, name: str) -> str:
        return name if self.fd is not None else str(self.path / name)

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(self._name(name), dir_fd=self.fd, follow_symlinks=False)

    def open(self, name: str, flags: int, mode: int = 0o644) -> int:
        """``os.open`` of ``name`` here with ``O_NOFOLLOW``; a link is a LinkRefusedError."""
        if self.fd is None and os.path.islink(self._name(name)):
            raise LinkRefusedError(
                f"{self.shown(name)!r} is a symbolic link; links are not followed", where=self.where
            )
        try:
            return os.open(
                self._name(name), flags | _NOFOLLOW | _CLOEXEC | _BINARY, mode, dir_fd=self.fd
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise LinkRefusedError(
                    f"{self.shown(name)!r} is a symbolic link; links are not followed",
                    where=self.where,
                ) from None
            raise

    def open_file(self, name: str) -> int:
        """``name`` opened for reading, if it is a regular file (not a link, folder, fifo)."""
        fd = self.open(name, os.O_RDONLY | _NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise LinkRefusedError(f"{self.shown(name)!r} is not a regular file", where=self.where)
        return fd

    def create(self, name: str) -> int:
        """``name`` created anew, exclusively, for reading and writing. A regular file of
        that name (a stale temporary file of an interrupted copy) is removed first; anything
        else there (a link, a folder) is a LinkRefusedError and is left as it is."""
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        try:
            return self.open(name, flags)
        except FileExistsError:
            pass
        if not stat.S_ISREG(self.lstat(name).st_mode):
            raise LinkRefusedError(
                f"{self.shown(name)!r} is a symbolic link or not a regular file where the "
                "temporary copy goes; it is not written through (remove it)",
                where=self.where,
            )
        os.unlink(self._name(name), dir_fd=self.fd)
        return self.open(name, flags)

    def fingerprint(self, fd: int, name: str) -> str:
        """The content fingerprint of the file open as ``fd`` (``name`` here)."""
        try:
            path = fd_path(fd)
        except OSError:  # Windows: by name, checked when it was opened
            path = self._name(name)
        return file_fingerprint(path)

    def replace(self, src: str, dst: str) -> None:
        os.replace(self._name(src), self._name(dst), src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._name(name), dir_fd=self.fd)

    def sync(self) -> None:
        """Make the folder's entries durable (POSIX; Windows's rename is durable)."""
        if self.fd is not None:
            os.fsync(self.fd)

    def entries(self, links: list[str] | None = None) -> tuple[list[str], list[str]]:
        """The names here of folders and of regular files, neither a link (nothing is
        followed to tell); anything else (a link, a fifo) is in neither list. The names of
        links (symbolic links, Windows junctions) are added to ``links`` when it is given,
        unfollowed."""
        folders: list[str] = []
        files: list[str] = []
        with os.scandir(self.fd if self.fd is not None else self.path) as found:
            for entry in found:
                with contextlib.suppress(OSError):  # vanished meanwhile: not listed
                    if entry.is_symlink() or getattr(entry, "is_junction", lambda: False)():
                        if links is not None:
                            links.append(entry.name)
                    elif entry.is_dir(follow_symlinks=False):
                        folders.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        files.append(entry.name)
        return folders, files
