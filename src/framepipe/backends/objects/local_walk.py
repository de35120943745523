"""The local object store's way from its root to a key's folder (:class:`Walker`), confined
to the root whatever a neighbour sharing the folder does meanwhile.

Guarantees: every folder is opened relative to its parent's descriptor with ``O_NOFOLLOW``,
from the root down, so the kernel never follows a link below the root; the store then works
by name inside the folder reached (``dir_fd=``). A symbolic link met on the way is read by
the walk and followed only while it stays inside: an absolute target must lie under the
root's resolved path or under the path the root was configured as (made absolute and
normalised, ``//`` and ``.`` dropped; kept only when it resolved to the same folder at open,
so a store configured as ``/srv/store``, a link to ``/mnt/data/store``, follows
``latest -> /srv/store/2024``), and is then walked from the root's descriptor, never looked
up by path; ``..`` never climbs above the root, at most 40 links per key; a key whose path
leaves the root is refused with :class:`~framepipe.errors.InvalidKeyError` naming the key and
the store. A link swapped in after any check is met by the same walk, never followed blindly.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from framepipe.errors import InvalidKeyError

__all__ = ["DIR", "MISSING", "Folder", "Walker", "loop"]

_T = TypeVar("_T")

_MAX_LINKS = 40  # links followed for one key, as the kernel's own limit
MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
"""What ``os`` raises for a key with no object on its path."""
_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
DIR = _ROOT | os.O_NOFOLLOW
"""The flags a folder below the root is opened with (never through a link)."""


def loop() -> OSError:
    """The error of a path with too many links (``ELOOP``)."""
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP))


@dataclass
class Folder:
    """A folder reached by :meth:`Walker.walk`: the open descriptors from the root down to
    it, the names of its path below the root (one fewer), the links followed, and how many
    of ``fds`` were reached by the last link (the root, the link's folder, the folders its
    target names); those after it were entered from the key's own segments."""

    fds: list[int]
    names: list[str] = field(default_factory=list)
    links: int = 0
    keep: int = 1

    @property
    def fd(self) -> int:
        return self.fds[-1]

    def close(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def _enter(dir_fd: int, name: str, make: bool) -> int:
    """The folder ``name`` of ``dir_fd``, opened without following a link (created first
    with ``make``); ``NotADirectoryError`` for a link or a file there."""
    try:
        return os.open(name, DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        if not make:
            raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_fd=dir_fd)
    return os.open(name, DIR, dir_fd=dir_fd)


def _parts(path: str) -> list[str]:
    """The names of the absolute ``path``, without the empty and ``.`` ones (``..`` kept: it
    is not resolved by name)."""
    return [part for part in path.split("/") if part not in ("", ".")]


class Walker:
    """Walks from the folder ``root`` (resolved) to keys' folders; ``configured`` is the path
    the root was given as, ``url`` the store's, for the errors."""

    def __init__(self, root: str, configured: str, url: str) -> None:
        self._root = root
        self._url = url
        # absolute link targets inside: under the resolved root, or under the root's path as
        # configured when that is another name of the same folder (longest first)
        self._root_parts = [_parts(root)]
        configured = os.path.abspath(configured)
        with contextlib.suppress(OSError):
            if configured != root and os.path.realpath(configured) == root:
                self._root_parts.append(_parts(configured))
        self._root_parts.sort(key=len, reverse=True)

    def _escape(self, key: str) -> InvalidKeyError:
        return InvalidKeyError(
            f"invalid object key {key!r}: its path leaves {self._url} through a symlink"
        )

    def follow(self, key: str, folder: Folder, target: str) -> list[str]:
        """The segments to walk next for a link to ``target`` found in ``folder``: relative to
        ``folder``, or for an absolute target under the root's resolved or configured path,
        relative to the root (``folder`` is taken back to the root's descriptor); any other
        absolute target is refused."""
        folder.links += 1
        if folder.links > _MAX_LINKS:
            raise loop()
        if target.startswith("/"):
            parts = _parts(target)
            for root in self._root_parts:
                if parts[: len(root)] == root:
                    break
            else:
                raise self._escape(key)
            while len(folder.fds) > 1:
                os.close(folder.fds.pop())
            folder.names.clear()
            rest = parts[len(root) :]
            if not rest or target.endswith("/"):  # the root itself, or a folder: as split does
                rest.append("")
            return rest
        return target.split("/")

    def _climb(self, key: str, folder: Folder) -> None:
        """Take ``folder`` to its parent (a link's ``..``), never above the root."""
        if not folder.names:
            raise self._escape(key)
        os.close(folder.fds.pop())
        folder.names.pop()

    def walk(self, key: str, segments: list[str], *, make: bool = False, links: int = 0) -> Folder:
        """The folder holding ``segments[-1]``, reached from the root one segment at a time
        (see the module); missing folders are created with ``make``. ``OSError`` as
        ``os.open`` raises it (``FileNotFoundError``, ``NotADirectoryError`` for a file on
        the way), :class:`InvalidKeyError` when the path leaves the root. The caller closes
        the folder."""
        folder = Folder([os.open(self._root, _ROOT)], links=links)
        todo = segments[-2::-1]  # the folders to enter, the next one last
        own = len(todo)  # todo[:own] are the key's own segments, above them a link's target
        try:
            while todo:
                name = todo.pop()
                from_key = len(todo) < own
                own = min(own, len(todo))
                if name in ("", "."):
                    continue
                if name == "..":  # only from a link's target
                    self._climb(key, folder)
                    folder.keep = len(folder.fds)
                    continue
                try:
                    fd = _enter(folder.fd, name, make)
                except NotADirectoryError as exc:  # a link, or a file where a folder should be
                    try:
                        target = os.readlink(name, dir_fd=folder.fd)
                    except OSError:
                        raise exc from None
                    todo.extend(reversed(self.follow(key, folder, target)))
                    folder.keep = len(folder.fds)
                    continue
                folder.fds.append(fd)
                folder.names.append(name)
                if not from_key:
                    folder.keep = len(folder.fds)
        except BaseException:
            folder.close()
            raise
        return folder

    def find(self, key: str, segments: list[str], act: Callable[[int, str], _T]) -> _T | None:
        """``act(folder_fd, name)`` for the file of ``key`` (its ``segments``), following a
        link at its name as :meth:`walk` does (``act`` raises ``ELOOP`` for a link); ``None``
        when there is no such file or the key names a folder."""
        links = 0
        while True:
            try:
                folder = self.walk(key, segments, links=links)
            except MISSING:
                return None
            try:
                name = segments[-1]
                if name in ("", ".", ".."):
                    return None
                try:
                    return act(folder.fd, name)
                except MISSING:
                    return None
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                parts = self.follow(key, folder, os.readlink(name, dir_fd=folder.fd))
                segments = folder.names + parts
                links = folder.links
            finally:
                folder.close()
