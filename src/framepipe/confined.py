"""Paths named by untrusted input, confined to a root: no ``..``, no symlink out, no guessing.

Guarantees:

* :func:`relative_parts` turns a relative path from outside (a file list, a request) into its
  segments, or refuses it with :class:`~framepipe.errors.InvalidInputError` naming ``where``:
  empty, ``.``, ``..``, absolute (``/x``, ``C:``, ``\\\\host``), a backslash, a NUL or invalid
  Unicode are refused, never "normalised" into something else;
* :func:`open_beneath` opens a file below a root directory without following a symbolic link
  at any level below the root (each directory is opened with ``O_NOFOLLOW`` relative to its
  parent), so a link planted anywhere in a shared folder is an error naming it, not a way
  out; it can create
  the file exclusively (``O_CREAT | O_EXCL``), so a planted file or link is never written
  through; a read-only open finds a regular file or fails at once (opened ``O_NONBLOCK``, so
  a planted FIFO never blocks the reader);
* :func:`open_dir_beneath` opens a folder below a root the same way, to work by name inside it
  (``dir_fd=``): a rename, a removal or an exclusive create there stays in that folder,
  whatever is renamed or linked above it meanwhile; :func:`fd_path` names an open file by a
  path (``/proc/self/fd/N``) for libraries that only take paths, so they read the very file
  that was opened without following links;
* the two open functions walk with one loop (``_walk``) and refuse segments that are empty,
  ``.``, ``..`` or hold ``/`` or NUL, so a segment never leaves its folder;
* the root they start from is either a path (the operator's choice: a link there is
  followed, and the path is opened anew at each call) or the descriptor of a folder opened
  once with :func:`open_root`: its last segment is opened relative to its parent with
  ``O_NOFOLLOW | O_DIRECTORY``, so a root that a neighbour with write access to its parent
  (a shared ``/media`` folder) swapped for a link is refused, not followed, and with the
  ``identity`` (``st_dev``, ``st_ino``, :func:`folder_identity`) seen when the root was
  checked, a root that is another folder now is refused too (:class:`RootChangedError`); every
  walk from that descriptor stays below that very folder, whatever is renamed or linked in
  its place later;
* :func:`confine` accepts a local path only inside one of the allowed roots (after resolving
  every link); the refusal says the same thing whether or not the path exists, so errors do
  not reveal what is on the machine outside the roots.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath

from framepipe.errors import InvalidInputError, PathNotAllowedError
from framepipe.untrusted import check_text

__all__ = [
    "FolderIdentity",
    "LinkRefusedError",
    "RootChangedError",
    "confine",
    "fd_path",
    "folder_identity",
    "keep_if_regular",
    "open_beneath",
    "open_dir_beneath",
    "open_for_reading",
    "open_root",
    "relative_parts",
]

FolderIdentity = tuple[int, int]
"""A folder's ``(st_dev, st_ino)``: which folder a path named when it was checked."""

Root = str | os.PathLike[str] | int
"""Where a walk starts: a folder's path (a link there is followed: the operator's choice), or
an open folder's descriptor (:func:`open_root`; the walk never closes it)."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)


class LinkRefusedError(InvalidInputError, OSError):
    """A symbolic link (or something that is not a regular file or folder) was found where
    a file or folder was expected below a root; the message names it."""


class RootChangedError(InvalidInputError, OSError):
    """A root opened by :func:`open_root` is not the folder (``st_dev``, ``st_ino``) it was
    when it was checked: replaced, or mounted again, since; the message names it."""


def relative_parts(value: object, where: str, *, max_length: int = 4096) -> tuple[str, ...]:
    """The segments of the relative POSIX path ``value`` (see the module for what is
    refused)."""
    text = check_text(value, where, max_length=max_length)
    if not text.strip():
        raise InvalidInputError("is an empty path", where=where)
    if "\\" in text:
        raise InvalidInputError(f"{text!r} holds a backslash; use '/' between folders", where=where)
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise InvalidInputError(
            f"{text!r} is absolute; a path relative to the root is needed", where=where
        )
    parts = tuple(p for p in text.split("/") if p != "")
    for part in parts:
        if part in (".", ".."):
            raise InvalidInputError(f"{text!r} holds a {part!r} segment", where=where)
    if not parts:
        raise InvalidInputError(f"{text!r} names no file", where=where)
    return parts


def _open_dir_fd(root: Root) -> int:
    """A new descriptor of the folder ``root`` (a path, or an open folder's descriptor: the
    same folder opened anew, so the caller may close it independently)."""
    if isinstance(root, int):
        return os.open(".", os.O_RDONLY | _DIRECTORY | _CLOEXEC, dir_fd=root)
    return os.open(root, os.O_RDONLY | _DIRECTORY | _CLOEXEC)


def folder_identity(st: os.stat_result) -> FolderIdentity:
    """The ``(st_dev, st_ino)`` of a stat result: which folder (or file) it describes."""
    return (st.st_dev, st.st_ino)


def open_root(
    path: str | os.PathLike[str],
    *,
    where: str | None = None,
    follow: bool = False,
    identity: FolderIdentity | None = None,
) -> int:
    """A descriptor of the folder ``path``, to start :func:`open_beneath` and
    :func:`open_dir_beneath` from (``root=`` the descriptor); the caller closes it.

    The folders above the last segment of ``path`` are the operator's (a link among them is
    followed); the last segment is opened relative to its parent with
    ``O_NOFOLLOW | O_DIRECTORY``, so a link (or a file) put in its place is refused with
    :class:`LinkRefusedError` instead of being followed. ``follow`` opens ``path`` as it is,
    links followed (a root the operator named itself, which may be a link; also used for a
    path with no last segment such as ``/``). With ``identity`` (``st_dev``, ``st_ino`` as
    :func:`folder_identity` gave it when the folder was checked, from an ``lstat`` for a
    root opened without ``follow``), a folder that is another one now is refused with
    :class:`RootChangedError`. ``where`` names the root in messages (default: its last
    segment). ``FileNotFoundError`` when there is no such folder (any more)."""
    root = Path(path)
    name = root.name
    label = where or name or str(root)
    if follow or name in ("", ".", ".."):
        fd = _open_dir_fd(root)
    else:
        parent = _open_dir_fd(root.parent)
        try:
            fd = os.open(name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=parent)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise LinkRefusedError(
                    f"{name!r} is a symbolic link or not a folder; a link in its place is "
                    "not followed",
                    where=label,
                ) from None
            raise
        finally:
            os.close(parent)
    if identity is not None:
        try:
            found = folder_identity(os.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        if found != tuple(identity):
            os.close(fd)
            raise RootChangedError(
                f"{name or str(root)!r} is not the folder it was when it was checked "
                "(replaced or mounted again since)",
                where=label,
            )
    return fd


def _check_parts(parts: Sequence[str], label: str) -> None:
    """Refuse a segment that would not name one entry of its folder (``..`` would leave it)."""
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\x00" in part:
            raise InvalidInputError(f"{part!r} is not a file or folder name", where=label)


def _enter_dir(dir_fd: int, part: str, shown: str, label: str, make: bool) -> int:
    """The folder ``part`` of the open folder ``dir_fd``, opened without following a link
    (created first with ``make``)."""
    flags = os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC
    try:
        try:
            return os.open(part, flags, dir_fd=dir_fd)
        except FileNotFoundError:
            if not make:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=dir_fd)
            return os.open(part, flags, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise LinkRefusedError(
                f"{shown!r} is a symbolic link or not a folder; links are "
                "not followed below the root",
                where=label,
            ) from None
        raise


def _walk(root: Root, parts: Sequence[str], label: str, make_dirs: bool) -> int:
    """The one walk of :func:`open_beneath` and :func:`open_dir_beneath`: a descriptor of the
    folder ``root/parts...``, each segment opened relative to its parent without following
    a link (a ``root`` path itself may be one; a descriptor ``root`` is left open). The
    caller closes it."""
    _check_parts(parts, label)
    dir_fd = _open_dir_fd(root)
    try:
        for i, part in enumerate(parts):
            next_fd = _enter_dir(dir_fd, part, "/".join(parts[: i + 1]), label, make_dirs)
            os.close(dir_fd)
            dir_fd = next_fd
    except BaseException:
        os.close(dir_fd)
        raise
    return dir_fd


def open_beneath(
    root: Root,
    parts: Sequence[str],
    flags: int = os.O_RDONLY,
    mode: int = 0o600,
    *,
    where: str | None = None,
    make_dirs: bool = False,
) -> int:
    """A file descriptor of ``root/parts...`` opened with ``flags``, following no link.

    ``root`` itself may be a link (the operator chose it); nothing below it may be. ``root``
    may also be an open folder's descriptor (:func:`open_root`), which is left open: the walk
    then stays below that very folder, whatever is in its place by name. With
    ``make_dirs`` missing folders are created (mode 0o755). A read-only open must find a
    regular file: it is opened with ``O_NONBLOCK`` (cleared again on the regular file), so a
    FIFO or device planted where a file is expected is refused at once instead of blocking
    the reader. Raises :class:`LinkRefusedError` naming the first segment that is a link or
    not a folder, or the last one when a read finds no regular file there,
    :class:`InvalidInputError` for a segment that is empty, ``.``, ``..`` or holds ``/`` or
    NUL, and :class:`OSError` (e.g. ``FileNotFoundError``, ``FileExistsError`` for
    ``O_EXCL``) as ``os.open`` does."""
    if not parts:
        raise InvalidInputError("names no file", where=where)
    label = where or "/".join(parts)
    reading = not (flags & (os.O_WRONLY | os.O_RDWR))
    if reading:
        flags |= _NONBLOCK
    dir_fd = _walk(root, parts[:-1], label, make_dirs)
    try:
        _check_parts(parts[-1:], label)
        fd = os.open(parts[-1], flags | _NOFOLLOW | _CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LinkRefusedError(
                f"{'/'.join(parts)!r} is a symbolic link; links are not followed below the root",
                where=label,
            ) from None
        raise
    finally:
        os.close(dir_fd)
    if reading and not keep_if_regular(fd):
        raise LinkRefusedError(f"{'/'.join(parts)!r} is not a regular file", where=label)
    return fd


def open_for_reading(path: str | os.PathLike[str]) -> int:
    """A descriptor of ``path`` opened for reading without blocking (``O_NONBLOCK``, then
    :func:`keep_if_regular`): a FIFO or device is never waited on. Raises :class:`OSError`
    as ``os.open`` does, and an :class:`OSError` with ``errno.EINVAL`` naming ``path`` when it
    is no regular file."""
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    if not keep_if_regular(fd):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, a device or a folder)", path)
    return fd


def keep_if_regular(fd: int) -> bool:
    """True, with ``fd`` made blocking again, when it is a regular file (opened with
    ``O_NONBLOCK`` so that a FIFO or device never blocked the open); else ``fd`` is closed and
    False: the one rule of every read that must find a file."""
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        if regular:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
    return regular


def open_dir_beneath(
    root: Root,
    parts: Sequence[str],
    *,
    where: str | None = None,
    make_dirs: bool = False,
) -> int:
    """A file descriptor of the folder ``root/parts...`` (``root`` itself for no parts),
    following no link below ``root``; the caller closes it. ``root`` is a path or an open
    folder's descriptor (:func:`open_root`, left open), as for :func:`open_beneath`.

    Work by name inside it with ``dir_fd=`` (``os.open`` with ``O_NOFOLLOW`` and ``O_EXCL``,
    ``os.replace``, ``os.unlink``, ``os.stat(..., follow_symlinks=False)``): those stay in this
    very folder whatever is renamed or linked above it later. With ``make_dirs`` missing
    folders are created (mode 0o755). Raises :class:`LinkRefusedError` naming the first
    segment that is a link or not a folder, :class:`InvalidInputError` for a segment that is
    empty, ``.``, ``..`` or holds ``/`` or NUL (use :func:`relative_parts`), and
    :class:`OSError` as ``os.open`` does."""
    return _walk(root, parts, where or "/".join(parts) or ".", make_dirs)


def fd_path(fd: int) -> str:
    """A path naming the open file ``fd`` itself: ``/proc/self/fd/N`` on Linux, ``/dev/fd/N``
    on macOS and the BSDs. Opening it reaches the file that ``fd`` is, whatever was renamed,
    replaced or linked since, so a library that only takes paths (FFmpeg, a fingerprint)
    reads what was opened with :func:`open_beneath` and nothing else. On macOS opening it
    duplicates ``fd`` (shared offset, same access mode). :class:`OSError` where the platform
    cannot name open files (Windows)."""
    for base in ("/proc/self/fd", "/dev/fd"):
        if os.path.isdir(base):
            return f"{base}/{fd}"
    raise OSError(errno.ENOTSUP, "this platform cannot name an open file by a path")


def confine(
    path: str | os.PathLike[str],
    roots: Iterable[str | os.PathLike[str]],
    *,
    where: str,
    setting: str = "FRAMEPIPE_INPUT_ROOTS",
) -> Path:
    """``path`` resolved (links followed), if it lies inside one of ``roots``; else
    :class:`PathNotAllowedError`. The error is the same whether the path exists or not."""
    roots = [Path(os.path.realpath(r)) for r in roots]
    text = os.fspath(path)
    check_text(text, where)
    if not roots:
        raise PathNotAllowedError(
            f"local paths are not accepted here (no roots are configured: {setting})", where=where
        )
    candidate = Path(os.path.realpath(text))
    for root in roots:
        if candidate == root or candidate.is_relative_to(root):
            return candidate
    raise PathNotAllowedError(
        f"{PurePosixPath(text).name!r} is not inside an allowed root ({setting})", where=where
    )
