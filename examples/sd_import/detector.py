#!/usr/bin/env python3
"""The SD-card detector: a small host process that sees cards and copies what the backend asks.

    python examples/sd_import/detector.py --watch /media \\
        --backend ws://127.0.0.1:8000/ws/detector --shared /shared-videos [--card E:\\ ...]

Cards: every subfolder of a ``--watch`` folder is a card (``/media/$USER/*`` on Linux), but
never a symbolic link there (it is not followed, wherever it points; a warning names it), and
every ``--card`` folder (``E:\\`` on Windows) is one while it exists and holds files. The
folders are polled (``--interval``, 1 s); a card counts once its listing is the same twice in a
row ``--settle`` seconds apart (a card still mounting is not announced half-listed). A card
that cannot be listed, for whatever reason, is logged and tried again at the next poll: it
never stops the detector or the other cards.

A card is the very folder the poll saw, not whatever has its name later: the poll notes its
identity (device and inode, of the folder itself, not of what a link there points to), and
each listing and each copy opens the card's root once
(:func:`framepipe.confined.open_root`): a ``--watch`` card relative to its watch folder with
``O_NOFOLLOW | O_DIRECTORY``, so a link put in its place (by whoever can write to a shared
watch folder, between the poll and the open) is refused and not followed, and checked to be
the folder the poll saw; everything below it is reached from that open folder. A card whose
folder became a link is refused (``code: refused``, naming the card), one that is another
folder now (replaced, mounted again) is ``not_mounted``; nothing is read from either, and the
next poll takes it as removed (and lists the new folder, a link never).

The listing (:func:`list_card`) holds only paths the backend accepts (the rule of
``card_paths.py``, which the backend checks ``sd:file_list`` with): a file whose path it would
refuse (a ``:`` or a backslash in a name, a name that is not UTF-8, a path over 1000
characters) is skipped with a warning naming it, so the rest of the card still imports.
Folders deeper than :data:`MAX_DEPTH` below the card are not looked into (warned about).

For each new card it sends ``detector:sd_inserted`` and ``sd:file_list`` (path relative to the
card with ``/``, size, mtime, and a cheap content fingerprint: BLAKE2b of the size and the
first and last 64 KiB), and ``detector:sd_removed`` when it goes. It answers every
``sd:copy_request`` by copying the file into the shared folder, one file at a time:

* to a temporary name beside the target (``.NAME.part``), in chunks (``--max-rate`` limits
  the speed), reporting ``sd:copy_progress``; then ``fsync``, then the copy's size and
  fingerprint are checked against the listing, and only then is it renamed to its final name
  (atomic on the same volume) and the folder synced: a final name is always a whole, checked
  file; an interrupted copy leaves at most a ``.part`` file, which the next attempt removes
  and creates anew;
* no symbolic link is followed, on the card or in the shared folder: each folder on the way is
  opened below its root without following links (:func:`framepipe.confined.open_dir_beneath`)
  and every name in it is opened, created, renamed and removed relative to that folder; the
  temporary file is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``), so a link or file
  planted under its name is never written through. A link (or anything but a regular file or
  folder, such as a fifo) where a file or folder is expected is refused, naming it relative
  to its root; a planted ``.part`` link is left in place for a person to look at. The card's
  listing skips links. (Windows has no ``dir_fd``: there each segment is checked not to be a
  link before the path is used, which a racing writer could defeat; the exclusive create
  still never writes through a link);
* ``sd:file_copied`` says ``ok: true`` with ``dest``, ``size`` and ``fingerprint``, or
  ``ok: false`` with ``code`` (``vanished``: the file is no longer on the card; ``changed``:
  its size or content differs from the listing; ``not_mounted``: the card is gone, or its
  folder is another folder now; ``refused``: a path outside the card or the shared folder, a
  link where a file or folder is expected, or the card's folder replaced by a link since it
  was listed (the error names the card); ``io_error``) and ``error``, which names the file and
  the reason;
* a file already at its destination with the right size and fingerprint is not copied again.

The backend never reads the card. The token goes in an ``Authorization: Bearer`` header, never
in the URL (which access logs and proxies record). The connection reconnects by itself with
exponential backoff and jitter (the ``websockets`` client's, from 1 s up to ``--max-backoff``,
30 s); after a reconnect the detector says which cards it still has (``detector:hello``), so
copies the backend retries reach it, and announces the cards the backend has not acknowledged
yet.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import inspect
import json
import logging
import os
import platform
import re
import signal
import socket
import stat
import sys
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from types import TracebackType
from typing import Any, NamedTuple

from card_paths import card_path
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import backoff
from websockets.exceptions import ConnectionClosed, InvalidStatus

from framepipe.confined import (
    FolderIdentity,
    LinkRefusedError,
    RootChangedError,
    fd_path,
    folder_identity,
    open_dir_beneath,
    open_root,
    relative_parts,
)
from framepipe.errors import InvalidInputError
from framepipe.jobs.ledger import file_fingerprint

__all__ = ["Card", "Detector", "copy_file", "list_card"]

log = logging.getLogger("sd_detector")

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mts", ".m2ts", ".m4v", ".mkv", ".insv", ".360")
_IGNORED_DIRS = {"system volume information", "$recycle.bin", "lost+found"}


# -- cards -----------------------------------------------------------------------------------


MAX_DEPTH = 32
"""The deepest folder below a card's root that :func:`list_card` looks into (camera cards use
two or three levels, ``DCIM/100GOPRO``)."""


def list_card(
    root: Path,
    suffixes: tuple[str, ...] = VIDEO_SUFFIXES,
    *,
    max_depth: int = MAX_DEPTH,
    identity: FolderIdentity | None = None,
    watched: bool = False,
) -> list[dict[str, Any]]:
    """The video files of a card: ``path`` (relative, ``/``), ``size``, ``mtime``, and
    ``fingerprint``; hidden files and system folders skipped; sorted by path.

    The root is opened once (:func:`_open_card_root`: with ``watched``, a subfolder of a
    ``--watch`` folder, without following a link in its place; with ``identity``, only if it
    is that folder) and every folder below is reached from it; a root that is not there, a
    link, or another folder raises (``FileNotFoundError``, :class:`LinkRefusedError`,
    :class:`RootChangedError`) and nothing is listed.

    Guarantees, whatever the card holds:

    * only regular files are listed, reached without following a link (a link on the card,
      to a file or a folder, is skipped: what it points to is not on the card);
    * every listed path is one the backend accepts (:func:`card_paths.card_path`, the rule
      its ``sd:file_list`` check uses), so the list is never refused as a whole: a file it
      would refuse (a ``:`` or a backslash in a name, a name that is not valid UTF-8, a path
      over 1000 characters) is skipped with a warning naming it, and so is a folder below
      which it would refuse every path;
    * folders more than ``max_depth`` levels below the root are not looked into (a warning
      names the first of them); the walk keeps its own stack, so no tree, however deep,
      raises :class:`RecursionError`;
    * a file or folder that vanishes or turns into a link while it is listed is left out
      (the next poll sees the truth)."""
    out: list[dict[str, Any]] = []
    stack: list[tuple[str, ...]] = [()]
    top = _open_card_root(root, identity=identity, watched=watched)
    try:
        while stack:
            rel = stack.pop()
            try:
                with _Folder(root, rel, where="the card", top=top) as here:
                    folders, files = here.entries()
                    stack.extend(_folders_to_walk(rel, folders, max_depth))
                    out.extend(_listed(here, rel, files, suffixes))
            except OSError:  # the folder vanished or was replaced by a link while listing
                continue
    finally:
        if top is not None:
            os.close(top)
    return sorted(out, key=lambda e: e["path"])


def _open_card_root(root: Path, *, identity: FolderIdentity | None, watched: bool) -> int | None:
    """The card's root folder, opened once for a listing or a copy: a descriptor every walk
    of the card starts from (the caller closes it), or None where the platform has no
    ``dir_fd`` (Windows: there the root is checked by path, a check a racing writer could
    defeat, and used by path).

    ``watched`` (a subfolder of a ``--watch`` folder, where others may write): its last
    segment is opened relative to the watch folder without following a link
    (:func:`framepipe.confined.open_root`), so a link put in its place is a
    :class:`LinkRefusedError`; otherwise (a ``--card`` folder, the operator's own path) the
    path is followed. ``identity``: the folder's ``(st_dev, st_ino)`` when the poll saw it;
    another folder there now is a :class:`RootChangedError`. ``FileNotFoundError`` when the
    card is gone."""
    where = f"the card {card_label(root)}"
    if _AT:
        return open_root(root, where=where, follow=not watched, identity=identity)
    if watched and (root.is_symlink() or getattr(root, "is_junction", lambda: False)()):
        raise LinkRefusedError(
            f"{root.name!r} is a symbolic link or not a folder; a link in its place is not "
            "followed",
            where=where,
        )
    if not root.is_dir():
        raise FileNotFoundError(errno.ENOENT, "no such folder", str(root))
    if identity is not None and folder_identity(os.stat(root)) != identity:
        raise RootChangedError(
            f"{root.name or str(root)!r} is not the folder it was when it was checked "
            "(replaced or mounted again since)",
            where=where,
        )
    return None


def _folders_to_walk(
    rel: tuple[str, ...], names: list[str], max_depth: int
) -> list[tuple[str, ...]]:
    """The subfolders ``names`` of the card's folder ``rel`` that :func:`list_card` walks."""
    wanted = []
    for name in names:
        if name.startswith(".") or name.lower() in _IGNORED_DIRS:
            continue
        shown = as_text("/".join((*rel, name)))
        # The shortest path below the folder: when the backend refuses it, it refuses all.
        try:
            card_path("/".join((*rel, name, "\u2026")))
        except ValueError as exc:
            log.warning("skipped folder %s: the backend accepts no path in it (%s)", shown, exc)
            continue
        if len(rel) + 1 > max_depth:
            log.warning(
                "skipped folder %s: it is more than %d folders below the card", shown, max_depth
            )
            continue
        wanted.append((*rel, name))
    return wanted


def _listed(
    here: _Folder, rel: tuple[str, ...], names: list[str], suffixes: tuple[str, ...]
) -> Iterator[dict[str, Any]]:
    """The entries of :func:`list_card` for the regular files ``names`` of folder ``here``."""
    for name in names:
        if name.startswith(".") or not name.lower().endswith(suffixes):
            continue
        path = "/".join((*rel, name))
        try:
            card_path(path)
        except ValueError as exc:
            log.warning("skipped %s: the backend would refuse its path (%s)", as_text(path), exc)
            continue
        try:
            fd = here.open_file(name)
        except OSError:  # a link, vanished: the next poll sees the truth
            continue
        try:
            st = os.fstat(fd)
            fingerprint = here.fingerprint(fd, name)
        except OSError:
            continue
        finally:
            os.close(fd)
        yield {"path": path, "size": st.st_size, "mtime": st.st_mtime, "fingerprint": fingerprint}


def as_text(text: str) -> str:
    """``text`` as valid Unicode: bytes of a name that are not UTF-8 (Python keeps them as
    lone surrogates, which the backend refuses) become U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def card_label(root: PurePath) -> str:
    """The folder's name, or the drive's letter for a drive root (``E:\\`` -> ``E``), as
    valid Unicode (see :func:`as_text`)."""
    return as_text(root.name or root.drive.rstrip(":\\/") or "card")


def card_id_of(label: str, files: list[dict[str, Any]]) -> str:
    """A stable id of a card: its label and the oldest file's identity (adding files to a card
    keeps its id; another card with the same label gets another)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("._") or "card"
    if not files:
        return f"{safe}-empty"
    first = min(files, key=lambda e: (e["mtime"], e["path"]))
    digest = hashlib.blake2b(
        f"{first['path']}|{first['size']}|{first['fingerprint']}".encode(), digest_size=6
    ).hexdigest()
    return f"{safe}-{digest}"


@dataclass
class Card:
    """One inserted card and its session (one per insertion).

    ``watched``: the card is a subfolder of a ``--watch`` folder (its root is never reached
    through a link); ``identity``: its root's ``(st_dev, st_ino)`` when the poll saw it, which
    every later open of the root checks (None: not checked)."""

    root: Path
    label: str
    card_id: str
    files: list[dict[str, Any]]
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    acknowledged: bool = False
    removed: bool = False
    watched: bool = False
    identity: FolderIdentity | None = None

    def inserted(self) -> dict[str, Any]:
        return {
            "type": "detector:sd_inserted",
            "session_id": self.session_id,
            "card_id": self.card_id,
            "label": self.label,
            "root": as_text(str(self.root)),
            "file_count": len(self.files),
        }

    def file_list(self) -> dict[str, Any]:
        return {
            "type": "sd:file_list",
            "session_id": self.session_id,
            "card_id": self.card_id,
            "label": self.label,
            "files": self.files,
        }


def _is_junction(entry: os.DirEntry[str]) -> bool:
    """A Windows junction (a link that ``is_symlink`` does not tell; Python 3.12+)."""
    return bool(getattr(entry, "is_junction", lambda: False)())


# -- copying -----------------------------------------------------------------------------------


class CopyAborted(Exception):
    """The connection the request came on closed: stop, the backend will ask again."""


_AT = {os.open, os.stat, os.unlink, os.rename} <= os.supports_dir_fd  # POSIX; not Windows
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # a fifo where a file is expected: no wait
_BINARY = getattr(os, "O_BINARY", 0)  # Windows
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


class _Folder:
    """A folder below ``root``, reached without following a link, in which names are opened,
    created, checked, renamed and removed relative to the folder itself (``dir_fd``), so
    nothing renamed or linked above it meanwhile can redirect them.

    Where the platform has no ``dir_fd`` (Windows), each segment is checked not to be a link
    before the path is used (a check a racing writer could defeat) and names are used by path.
    Raises :class:`LinkRefusedError` naming the first segment that is a link or not a folder
    (relative to ``root``; ``where`` names the root in messages), ``FileNotFoundError`` for
    a missing folder (created instead with ``make``). ``top``: the root already open (a
    card's, :func:`_open_card_root`); the walk then starts from that very folder, not from
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
        if _AT:
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

    def __enter__(self) -> _Folder:
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

    def entries(self) -> tuple[list[str], list[str]]:
        """The names here of folders and of regular files, neither a link (nothing is
        followed to tell); anything else (a link, a fifo) is in neither list."""
        folders: list[str] = []
        files: list[str] = []
        with os.scandir(self.fd if self.fd is not None else self.path) as found:
            for entry in found:
                with contextlib.suppress(OSError):  # vanished meanwhile: not listed
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.name)
                    elif entry.is_file(follow_symlinks=False):
                        files.append(entry.name)
        return folders, files


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
) -> dict[str, Any]:
    """Copy ``rel`` of ``card`` to ``dest_rel`` under ``shared`` (temp name created
    exclusively, fsync, check size and fingerprint, atomic rename), following no link on
    either side; the ``sd:file_copied`` fields."""
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
        top = _open_card_root(card.root, identity=card.identity, watched=card.watched)
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
        with _Folder(card.root, src_parts[:-1], where="on the card", top=top) as src_dir:
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
            shared.mkdir(parents=True, exist_ok=True)  # the root itself: the operator's choice
            with _Folder(
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
    dst_dir: _Folder,
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


class _Seen(NamedTuple):
    """A card's root as a poll saw it: its identity and whether it is in a ``--watch``
    folder (see :class:`Card`)."""

    identity: FolderIdentity
    watched: bool


class Detector:
    """Watches folders for cards, talks to the backend, copies on request."""

    def __init__(
        self,
        *,
        backend: str,
        shared: Path,
        token: str | None,
        watch: list[Path],
        cards: list[Path],
        detector_id: str,
        interval: float = 1.0,
        settle: float = 1.0,
        max_rate: float | None = None,
        max_backoff: float = 30.0,
    ) -> None:
        self.backend = backend
        self.shared = shared
        self.token = token
        self.watch = watch
        self.card_dirs = cards
        self.detector_id = detector_id
        self.interval = interval
        self.settle = settle
        self.max_rate = max_rate
        self.max_backoff = max_backoff
        self.cards: dict[Path, Card] = {}
        self.ws: ClientConnection | None = None
        self.copies: asyncio.Queue[tuple[ClientConnection, dict[str, Any]]] = asyncio.Queue()
        self._abort = threading.Event()
        self._warned: dict[Path, str] = {}  # what was last said about a root or a link
        self._links: set[Path] = set()  # links in the --watch folders at the last poll

    # watching

    def _roots(self) -> dict[Path, _Seen]:
        """The cards now, each with its folder's identity: each subfolder of a ``--watch``
        folder that is a folder itself, not a link to one (checked without following it: a
        link planted in the watch folder is never a card, wherever it points; it is named in
        a warning once), and each ``--card`` folder (the operator's own path, a link or not)
        while it holds files."""
        roots: dict[Path, _Seen] = {}
        links: set[Path] = set()
        for folder in self.watch:
            with contextlib.suppress(OSError), os.scandir(folder) as found:
                for entry in found:
                    if entry.name.startswith("."):
                        continue
                    with contextlib.suppress(OSError):
                        path = folder / entry.name
                        if entry.is_symlink() or _is_junction(entry):
                            links.add(path)
                        elif entry.is_dir(follow_symlinks=False):
                            st = os.stat(path, follow_symlinks=False)
                            if stat.S_ISDIR(st.st_mode):  # still a folder, not a link now
                                roots[path] = _Seen(folder_identity(st), watched=True)
        for link in links:
            self._warn_once(
                link,
                f"{as_text(str(link))} is a link, not a card: links in a --watch folder are "
                "not followed",
            )
        self._links = links
        for card in self.card_dirs:
            with contextlib.suppress(OSError):
                if card.is_dir() and any(card.iterdir()):
                    roots[card] = _Seen(folder_identity(os.stat(card)), watched=False)
        return roots

    def _warn_once(self, about: Path, message: str) -> None:
        """Log ``message`` about ``about`` unless it was the last said about it (a poll every
        second must not repeat it)."""
        if self._warned.get(about) != message:
            self._warned[about] = message
            log.warning("%s", message)

    async def _list(self, root: Path, seen: _Seen) -> list[dict[str, Any]] | None:
        """:func:`list_card` of ``root``, the folder the poll saw (``seen``), or None when
        listing it failed in any way (also when its folder became a link or another folder
        since the poll): the failure is logged (with its traceback once) and that card is
        tried again at the next poll, so one card can never stop the detector or the other
        cards."""
        try:
            files = await asyncio.to_thread(
                list_card, root, identity=seen.identity, watched=seen.watched
            )
        except Exception as exc:
            message = f"card at {as_text(str(root))} could not be listed: {exc!r}"
            if self._warned.get(root) != message:
                self._warned[root] = message
                log.exception("%s; trying again at the next poll", message)
            return None
        self._warned.pop(root, None)
        return files

    async def watch_cards(self) -> None:
        """Poll for cards until cancelled: announce each new card once its listing settled,
        and the removal of each card that is gone. A card that cannot be listed is skipped
        (see :meth:`_list`); nothing about one card ends this loop."""
        pending: dict[Path, tuple[_Seen, list[dict[str, Any]]]] = {}
        while True:
            roots = await asyncio.to_thread(self._roots)
            for root in list(self.cards):
                card = self.cards[root]
                if roots.get(root) != (card.identity, card.watched):
                    del self.cards[root]
                    card.removed = True
                    if root in roots:  # another folder there now: removed, listed anew
                        log.warning(
                            "card %s at %s is another folder now: taken as removed",
                            card.card_id,
                            root,
                        )
                    else:
                        log.info("card %s removed from %s", card.card_id, root)
                    await self._send(
                        {
                            "type": "detector:sd_removed",
                            "session_id": card.session_id,
                            "card_id": card.card_id,
                        }
                    )
            for root in roots.keys() - self.cards.keys():
                seen = roots[root]
                files = await self._list(root, seen)
                if files is None:
                    pending.pop(root, None)
                    continue
                if self.settle > 0 and pending.get(root) != (seen, files):
                    pending[root] = (seen, files)  # listed again after --settle to count
                    continue
                pending.pop(root, None)
                label = card_label(root)
                card = Card(
                    root,
                    label,
                    card_id_of(label, files),
                    files,
                    watched=seen.watched,
                    identity=seen.identity,
                )
                self.cards[root] = card
                log.info("card %s inserted at %s: %d files", card.card_id, root, len(files))
                await self._announce(card)
            for root in list(pending):
                if root not in roots:
                    del pending[root]
            for gone in [p for p in self._warned if p not in roots and p not in self._links]:
                del self._warned[gone]  # said again if it comes back
            await asyncio.sleep(self.settle if pending else self.interval)

    async def _send(self, message: dict[str, Any], ws: ClientConnection | None = None) -> bool:
        ws = ws or self.ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed:
            return False
        return True

    async def _announce(self, card: Card) -> None:
        if await self._send(card.inserted()):
            await self._send(card.file_list())

    # the connection

    async def connection(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

        def delays() -> Generator[float]:
            return backoff(
                initial_delay=min(1.0, self.max_backoff),
                min_delay=min(1.0, self.max_backoff),
                max_delay=self.max_backoff,
            )

        options: dict[str, Any] = {}
        if "reconnect_delays" in inspect.signature(connect.__init__).parameters:
            options["reconnect_delays"] = delays  # older websockets: WEBSOCKETS_BACKOFF_* env
        async for ws in connect(
            self.backend, additional_headers=headers, max_size=2**26, open_timeout=10, **options
        ):
            try:
                hello = {
                    "type": "detector:hello",
                    "detector_id": self.detector_id,
                    "hostname": socket.gethostname(),
                    "platform": platform.system(),
                    "sessions": [
                        {"session_id": c.session_id, "card_id": c.card_id, "label": c.label}
                        for c in self.cards.values()
                    ],
                }
                await ws.send(json.dumps(hello))
                self.ws = ws
                self._abort = threading.Event()
                log.info("connected to %s as %s", self.backend, self.detector_id)
                for card in list(self.cards.values()):
                    if not card.acknowledged:
                        await self._announce(card)
                async for raw in ws:
                    await self._on_message(ws, raw)
            except ConnectionClosed as exc:
                log.warning("connection to the backend closed (%s); reconnecting", exc)
            finally:
                self._abort.set()  # a copy for this connection: the backend will ask again
                self.ws = None

    async def _on_message(self, ws: ClientConnection, raw: str | bytes) -> None:
        try:
            message = json.loads(raw)
            kind = message["type"]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable message from the backend: %r", raw[:200])
            return
        if kind == "sd:copy_request":
            await self.copies.put((ws, message))
        elif kind == "sd:status":
            for card in self.cards.values():
                if card.session_id == message.get("session_id"):
                    card.acknowledged = True
            log.info(
                "status of %s: %s %s",
                message.get("card_id") or message.get("session_id"),
                message.get("state"),
                message.get("execution_id", ""),
            )
        elif kind == "error":
            log.warning("backend: %s", message.get("detail"))
        elif kind != "detector:welcome":
            log.info("ignored %s from the backend", kind)

    async def copier(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ws, request = await self.copies.get()
            if ws is not self.ws:
                continue  # asked on a connection that is gone: the backend asks again
            await self._copy(loop, ws, request)

    async def _copy(
        self, loop: asyncio.AbstractEventLoop, ws: ClientConnection, request: dict[str, Any]
    ) -> None:
        reply: dict[str, Any] = {
            "type": "sd:file_copied",
            "request_id": request.get("request_id"),
            "session_id": request.get("session_id"),
            "path": request.get("path"),
        }
        # By card id too: after a restart of this process the card has a new session, and the
        # backend's retried copy still names the old one.
        card = next(
            (
                c
                for c in self.cards.values()
                if c.session_id == request.get("session_id") or c.card_id == request.get("card_id")
            ),
            None,
        )
        if card is None:
            await self._send(
                {
                    **reply,
                    "ok": False,
                    "code": "not_mounted",
                    "error": f"no card with session {request.get('session_id')} is inserted",
                },
                ws,
            )
            return
        last = [0.0]

        def progress(done: int) -> None:
            now = time.monotonic()
            if now - last[0] >= 0.2:
                last[0] = now
                message = {
                    "type": "sd:copy_progress",
                    "request_id": request.get("request_id"),
                    "session_id": card.session_id,
                    "bytes": done,
                    "total": request.get("size"),
                }
                asyncio.run_coroutine_threadsafe(self._send(message, ws), loop)

        log.info("copying %s of %s", request.get("path"), card.card_id)
        try:
            result = await asyncio.to_thread(
                copy_file,
                card,
                str(request.get("path")),
                self.shared,
                str(request.get("dest")),
                size=int(request.get("size", -1)),
                fingerprint=str(request.get("fingerprint")),
                abort=self._abort,
                progress=progress,
                max_rate=self.max_rate,
            )
        except CopyAborted:
            log.warning("copy of %s stopped: the connection closed", request.get("path"))
            return
        await self._send({**reply, **result}, ws)
        log.info("copied %s: %s", request.get("path"), "ok" if result["ok"] else result["error"])

    async def run(self) -> None:
        self.shared.mkdir(parents=True, exist_ok=True)
        tasks = [
            asyncio.create_task(self.watch_cards(), name="watch"),
            asyncio.create_task(self.connection(), name="connection"),
            asyncio.create_task(self.copier(), name="copier"),
        ]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            task.cancel()
        for task in done:
            task.result()  # a failed task fails the detector loudly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--watch",
        type=Path,
        action="append",
        default=[],
        help="a folder whose subfolders are cards (repeatable)",
    )
    parser.add_argument(
        "--card",
        type=Path,
        action="append",
        default=[],
        help="a folder that is a card while it exists, e.g. E:\\ (repeatable)",
    )
    parser.add_argument("--backend", required=True, help="ws://HOST:PORT/ws/detector")
    parser.add_argument(
        "--shared", type=Path, required=True, help="the shared folder as this machine sees it"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("FRAMEPIPE_API_TOKEN"),
        help="the service's bearer token (default: FRAMEPIPE_API_TOKEN)",
    )
    parser.add_argument("--detector-id", default=socket.gethostname())
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval (s)")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="a new card's listing must be unchanged this long (s); 0: at once",
    )
    parser.add_argument(
        "--max-rate", type=float, default=None, help="copy at most this many bytes per second"
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=30.0,
        help="longest wait between reconnection attempts (s)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.watch and not args.card:
        parser.error("give --watch DIR and/or --card DIR")
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s detector %(levelname)s %(message)s",
    )
    detector = Detector(
        backend=args.backend,
        shared=args.shared,
        token=args.token,
        watch=args.watch,
        cards=args.card,
        detector_id=args.detector_id,
        interval=args.interval,
        settle=args.settle,
        max_rate=args.max_rate,
        max_backoff=args.max_backoff,
    )

    async def run() -> None:
        task = asyncio.create_task(detector.run())
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C only
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except InvalidStatus as exc:
        log.error("the backend refused the connection: %s", exc)  # noqa: TRY400
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
