"""The local-directory object store: each object is a file under the root at its key's path.

Guarantees:

* atomic, overwriting writes: an object is written to a ``.tmp-*`` file created exclusively
  (``O_CREAT | O_EXCL | O_NOFOLLOW``) in its key's folder, fsynced, then renamed over the
  key's name (``os.replace``), so readers never see a partial object and a completed ``put``
  survives a crash (``durable=False`` drops the fsyncs of the file and its folder);
* confined to the root, whatever a neighbour sharing the folder does meanwhile: every
  operation reaches the key's folder by one walk from the root (:meth:`_walk`), each folder
  opened relative to its parent's descriptor with ``O_NOFOLLOW``, and then works by name
  inside that folder (``dir_fd=``), so the kernel never follows a link below the root. A
  symbolic link met on the way is read by the walk and followed only while it stays inside:
  an absolute target must lie under the root's resolved path or under the path the root was
  configured as (made absolute and normalised, ``//`` and ``.`` dropped; kept only when it
  resolved to the same folder at open, so a store configured as ``/srv/store``, a link to
  ``/mnt/data/store``, follows ``latest -> /srv/store/2024``), and is then walked from the
  root's descriptor, never looked up by path; ``..`` never climbs above the root, at most 40
  links per key; a key whose path leaves the root is refused with :class:`InvalidKeyError`.
  A link swapped in after any check is met by the same walk, never followed blindly;
* ``get``, ``stat`` and ``copy`` follow a link at the key's own name by the same rule; ``put``
  replaces the entry at the key's name and ``delete`` removes it, whatever it is, so a link
  there is never written through;
* ``delete`` prunes the folders of the key's path left empty, deepest first, so a later
  ``put`` of a parent key does not collide: up to the root (never the root itself), or for a
  key reached through links, only the folders entered after the last link from the key's own
  segments (they are the key's real path); a link and the folders its target names are never
  removed;
* only regular files are objects: a read opens ``O_NONBLOCK`` and checks the open file, so a
  FIFO, socket or device planted at a key is an :class:`ObjectStoreError` naming the key at
  once (never a reader blocked), and a folder is no object;
* ``list`` skips temporary files and symbolic links and never descends through a link (each
  folder is opened ``O_NOFOLLOW`` relative to its parent);
* an object's version (:attr:`ObjectInfo.version`) is its file's identity and state,
  without the device number (:func:`~framepipe.backends.objects.versions.file_version`);
  ``copy(..., if_version=)`` checks the very file it reads (the open descriptor, before and
  after the copy, ahead of the rename into place), so a replacement at any moment is
  either refused or not copied;
* errors name the key and the store's URL, never a filesystem path below it: the reason of an
  ``OSError`` is given without its file name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

from framepipe.backends.objects.base import TEMP_PREFIX, ObjectInfo, ObjectStore
from framepipe.backends.objects.versions import check_pinned, file_version
from framepipe.confined import LinkRefusedError, open_dir_beneath
from framepipe.errors import InvalidKeyError, ObjectKeyConflictError, ObjectStoreError

__all__ = ["LocalObjectStore"]

_T = TypeVar("_T")

_MAX_NAME_BYTES = 255  # longest file name on common filesystems
_MAX_LINKS = 40  # links followed for one key, as the kernel's own limit
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
_ROOT = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR = _ROOT | os.O_NOFOLLOW
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _reason(exc: OSError) -> str:
    """What went wrong, without the file name an ``OSError`` carries (a server path)."""
    return exc.strerror or str(exc)


def _loop() -> OSError:
    return OSError(errno.ELOOP, os.strerror(errno.ELOOP))


@dataclass
class _Folder:
    """A folder reached by :meth:`LocalObjectStore._walk`: the open descriptors from the root
    down to it, the names of its path below the root (one fewer), the links followed, and how
    many of ``fds`` were reached by the last link (the root, the link's folder, the folders
    its target names); those after it were entered from the key's own segments."""

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
        return os.open(name, _DIR, dir_fd=dir_fd)
    except FileNotFoundError:
        if not make:
            raise
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, dir_fd=dir_fd)
    return os.open(name, _DIR, dir_fd=dir_fd)


def _parts(path: str) -> list[str]:
    """The names of the absolute ``path``, without the empty and ``.`` ones (``..`` kept: it
    is not resolved by name)."""
    return [part for part in path.split("/") if part not in ("", ".")]


def _info(key: str, st: os.stat_result) -> ObjectInfo:
    return ObjectInfo(key, st.st_size, st.st_mtime, file_version(st))


def _write_bytes(fd: int, data: bytes) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


class LocalObjectStore(ObjectStore):
    """Objects as files under ``root``; ``root`` is created unless ``create=False``.

    ``durable=False`` skips the fsyncs: a ``put`` is still atomic and survives a crash of the
    process, but not of the machine (a power loss may lose the last writes). It roughly halves
    the cost of a small write, which matters for frame stores writing hundreds of JPEGs a
    second."""

    def __init__(
        self, root: str | os.PathLike[str], create: bool = True, *, durable: bool = True
    ) -> None:
        self.durable = durable
        path = Path(root).expanduser()
        try:
            if create:
                path.mkdir(parents=True, exist_ok=True)
            elif not path.is_dir():
                raise ObjectStoreError(f"object store directory {path} does not exist")
            self._root = path.resolve(strict=True)
        except OSError as exc:
            raise ObjectStoreError(f"cannot open object store directory {path}: {exc}") from exc
        self._url = self._root.as_uri()
        self._root_str = str(self._root)
        # absolute link targets inside: under the resolved root, or under the root's path as
        # configured when that is another name of the same folder (longest first)
        self._root_parts = [_parts(self._root_str)]
        configured = os.path.abspath(path)
        with contextlib.suppress(OSError):
            if configured != self._root_str and os.path.realpath(configured) == self._root_str:
                self._root_parts.append(_parts(configured))
        self._root_parts.sort(key=len, reverse=True)

    @property
    def url(self) -> str:
        return self._url

    @property
    def root(self) -> Path:
        return self._root

    # -- paths --------------------------------------------------------------------------------

    def _segments(self, key: str) -> list[str]:
        """The segments of ``key``: refuses names the store reserves or too long for the
        filesystem."""
        segments = key.split("/")
        for segment in segments:
            if segment.startswith(TEMP_PREFIX):
                raise InvalidKeyError(
                    f"invalid object key {key!r}: segments starting with {TEMP_PREFIX!r} are "
                    f"reserved by the local store"
                )
            if len(segment.encode("utf-8")) > _MAX_NAME_BYTES:
                raise InvalidKeyError(
                    f"invalid object key {key!r}: segment longer than {_MAX_NAME_BYTES} bytes"
                )
        return segments

    def _escape(self, key: str) -> InvalidKeyError:
        return InvalidKeyError(
            f"invalid object key {key!r}: its path leaves {self._url} through a symlink"
        )

    def _follow(self, key: str, folder: _Folder, target: str) -> list[str]:
        """The segments to walk next for a link to ``target`` found in ``folder``: relative to
        ``folder``, or for an absolute target under the root's resolved or configured path,
        relative to the root (``folder`` is taken back to the root's descriptor); any other
        absolute target is refused."""
        folder.links += 1
        if folder.links > _MAX_LINKS:
            raise _loop()
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

    def _climb(self, key: str, folder: _Folder) -> None:
        """Take ``folder`` to its parent (a link's ``..``), never above the root."""
        if not folder.names:
            raise self._escape(key)
        os.close(folder.fds.pop())
        folder.names.pop()

    def _walk(
        self, key: str, segments: list[str], *, make: bool = False, links: int = 0
    ) -> _Folder:
        """The folder holding ``segments[-1]``, reached from the root one segment at a time
        (see the module); missing folders are created with ``make``. ``OSError`` as
        ``os.open`` raises it (``FileNotFoundError``, ``NotADirectoryError`` for a file on
        the way), :class:`InvalidKeyError` when the path leaves the root. The caller closes
        the folder."""
        folder = _Folder([os.open(self._root_str, _ROOT)], links=links)
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
                    todo.extend(reversed(self._follow(key, folder, target)))
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

    def _find(self, key: str, act: Callable[[int, str], _T]) -> _T | None:
        """``act(folder_fd, name)`` for the key's file, following a link at its name as
        :meth:`_walk` does (``act`` raises ``ELOOP`` for a link); ``None`` when there is no
        such file or the key names a folder."""
        segments = self._segments(key)
        links = 0
        while True:
            try:
                folder = self._walk(key, segments, links=links)
            except _MISSING:
                return None
            try:
                name = segments[-1]
                if name in ("", ".", ".."):
                    return None
                try:
                    return act(folder.fd, name)
                except _MISSING:
                    return None
                except OSError as exc:
                    if exc.errno != errno.ELOOP:
                        raise
                parts = self._follow(key, folder, os.readlink(name, dir_fd=folder.fd))
                segments = folder.names + parts
                links = folder.links
            finally:
                folder.close()

    def _open(self, key: str, action: str) -> int | None:
        """A descriptor of the key's regular file, opened for reading (``None`` for no
        object); anything else there is an :class:`ObjectStoreError` naming the key."""

        def open_at(dir_fd: int, name: str) -> int:
            return os.open(name, _READ, dir_fd=dir_fd)

        try:
            fd = self._find(key, open_at)
            if fd is None:
                return None
            try:
                mode = os.fstat(fd).st_mode
                if stat.S_ISREG(mode):
                    os.set_blocking(fd, True)
                    return fd
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        except OSError as exc:
            raise self._error(action, key, exc) from exc
        if stat.S_ISDIR(mode):
            return None
        raise ObjectStoreError(f"cannot {action} {key!r} in {self._url}: not a regular file")

    def _error(self, action: str, key: str, exc: OSError) -> ObjectStoreError:
        return ObjectStoreError(f"cannot {action} {key!r} in {self._url}: {_reason(exc)}")

    # -- writes -------------------------------------------------------------------------------

    def _write(self, key: str, fill: Callable[[int], object]) -> ObjectInfo:
        """Write through a temp file in the key's folder, fsync, rename into place."""
        segments = self._segments(key)
        folder, tmp, fd = self._create_temp(key, segments)
        try:
            try:
                fill(fd)
                if self.durable:
                    os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            os.replace(tmp, segments[-1], src_dir_fd=folder.fd, dst_dir_fd=folder.fd)
            if self.durable:
                os.fsync(folder.fd)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=folder.fd)
            if isinstance(exc, IsADirectoryError):
                raise ObjectKeyConflictError(
                    f"cannot store {key!r}: other keys are stored under {key + '/'!r}, and a "
                    "key cannot be both an object and a folder of keys in this store",
                    key=key,
                ) from None
            if isinstance(exc, OSError):
                raise self._error("write", key, exc) from exc
            raise
        finally:
            folder.close()
        return _info(key, st)

    def _create_temp(self, key: str, segments: list[str]) -> tuple[_Folder, str, int]:
        """The key's folder (created if missing), and a new empty ``.tmp-*`` file in it. An
        object in the way of the key's folders is an :class:`ObjectKeyConflictError`; a store
        whose own folder is no folder any more (replaced, unmounted) is the store's failure
        (:class:`ObjectStoreError`), not the key's."""
        for attempt in range(3):
            folder: _Folder | None = None
            try:
                folder = self._walk(key, segments, make=True)
                tmp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
                return folder, tmp, os.open(tmp, _CREATE, 0o666, dir_fd=folder.fd)
            except FileNotFoundError as exc:  # a concurrent delete pruned a new folder
                if folder is not None:
                    folder.close()
                if attempt == 2:
                    raise self._error("write", key, exc) from exc
            except OSError as exc:
                if folder is not None:
                    folder.close()
                if isinstance(exc, NotADirectoryError) and os.path.isdir(self._root_str):
                    raise ObjectKeyConflictError(
                        f"cannot store {key!r}: a part of its path is an object, and an object "
                        "cannot also hold other keys in this store",
                        key=key,
                    ) from None
                raise self._error("write", key, exc) from exc
        raise AssertionError("unreachable")

    def _put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._write(key, lambda fd: _write_bytes(fd, data))

    def _put_file(self, key: str, path: Path) -> ObjectInfo:
        with path.open("rb") as source:
            return self._write(key, lambda fd: _copy_into(source, fd))

    def _copy(self, src_key: str, dst_key: str, if_version: str | None = None) -> ObjectInfo | None:
        fd = self._open(src_key, "read")
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as source:
            self._check_version(source.fileno(), src_key, dst_key, if_version)

            def fill(out: int) -> None:
                _copy_into(source, out)
                # written in place meanwhile: the temp file is dropped, the key left alone
                self._check_version(source.fileno(), src_key, dst_key, if_version)

            return self._write(dst_key, fill)

    def _check_version(self, fd: int, src_key: str, dst_key: str, version: str | None) -> None:
        """Refuse the open source ``fd`` unless it is ``version`` (any, for ``None``)."""
        if version is None:
            return
        try:
            now = file_version(os.fstat(fd))
        except OSError as exc:
            raise self._error("read", src_key, exc) from exc
        check_pinned(self._url, src_key, dst_key, version, now)

    # -- reads --------------------------------------------------------------------------------

    def _get_bytes(self, key: str) -> bytes | None:
        fd = self._open(key, "read")
        if fd is None:
            return None
        try:
            with os.fdopen(fd, "rb") as file:
                return file.read()
        except OSError as exc:
            raise self._error("read", key, exc) from exc

    def _get_file(self, key: str, path: Path) -> bool:
        fd = self._open(key, "read")
        if fd is None:
            return False
        try:
            with os.fdopen(fd, "rb") as source, path.open("wb") as dest:
                shutil.copyfileobj(source, dest)
        except OSError as exc:
            raise self._error("read", key, exc) from exc
        return True

    def _stat(self, key: str) -> ObjectInfo | None:
        def stat_at(dir_fd: int, name: str) -> os.stat_result:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise _loop()
            return st

        try:
            st = self._find(key, stat_at)
        except OSError as exc:
            raise self._error("stat", key, exc) from exc
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return _info(key, st)

    def _delete(self, key: str) -> bool:
        segments = self._segments(key)
        try:
            folder = self._walk(key, segments)
        except _MISSING:
            return False
        except OSError as exc:
            raise self._error("delete", key, exc) from exc
        try:
            try:
                os.unlink(segments[-1], dir_fd=folder.fd)
            except _MISSING:
                return False
            except OSError as exc:
                raise self._error("delete", key, exc) from exc
            # prune the key's folders left empty, so a later put of a parent key does not
            # collide: those entered after the last link (fds[keep:], named names[keep-1:]
            # in their parents), never the root, a link, or a folder a link's target names
            for depth in range(len(folder.names) - 1, folder.keep - 2, -1):
                try:
                    os.rmdir(folder.names[depth], dir_fd=folder.fds[depth])
                except OSError:
                    break
            return True
        finally:
            folder.close()

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        head, _, partial = prefix.rpartition("/")
        try:
            fd = open_dir_beneath(self._root, head.split("/") if head else [], where=prefix)
        except (FileNotFoundError, LinkRefusedError):  # nothing, a file, or a link: not listed
            return
        except OSError as exc:
            raise ObjectStoreError(
                f"cannot list {prefix!r} in {self._url}: {_reason(exc)}"
            ) from exc
        yield from self._list_folder(fd, f"{head}/" if head else "", partial)

    def _list_folder(self, fd: int, key_prefix: str, name_prefix: str) -> Iterator[ObjectInfo]:
        """The objects of the open folder ``fd`` (closed when done) and below, in key order."""
        try:
            try:
                with os.scandir(fd) as scan:
                    entries = [entry for entry in scan if entry.name.startswith(name_prefix)]
            except OSError as exc:
                raise ObjectStoreError(
                    f"cannot list {key_prefix + name_prefix!r} in {self._url}: {_reason(exc)}"
                ) from exc
            # a directory sorts as "name/", so keys come out in str order across levels
            ordered: list[tuple[str, os.DirEntry[str], bool]] = []
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        ordered.append((entry.name + "/", entry, True))
                    elif entry.is_file(follow_symlinks=False) and not entry.name.startswith(
                        TEMP_PREFIX
                    ):
                        ordered.append((entry.name, entry, False))
                except OSError:
                    continue
            ordered.sort(key=lambda item: item[0])
            for _, entry, is_dir in ordered:
                if is_dir:
                    try:  # a folder swapped for a link meanwhile is skipped, not followed
                        child = os.open(entry.name, _DIR, dir_fd=fd)
                    except OSError:
                        continue
                    yield from self._list_folder(child, f"{key_prefix}{entry.name}/", "")
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:  # deleted while listing
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield _info(f"{key_prefix}{entry.name}", st)
        finally:
            os.close(fd)


def _copy_into(source: IO[bytes], fd: int) -> None:
    """Copy the open binary file ``source`` into the descriptor ``fd`` (left open)."""
    with os.fdopen(fd, "wb", closefd=False) as dest:
        shutil.copyfileobj(source, dest)
