"""The local-directory object store: each object is a file under the root at its key's path.

Guarantees:

* atomic, overwriting writes: an object is written to a ``.tmp-*`` file created exclusively
  (``O_CREAT | O_EXCL | O_NOFOLLOW``) in its key's folder, fsynced, then renamed over the
  key's name (``os.replace``), so readers never see a partial object and a completed ``put``
  survives a crash (``durable=False`` drops the fsyncs of the file and its folder);
* confined to the root, whatever a neighbour sharing the folder does meanwhile: every
  operation reaches the key's folder by one walk from the root, each folder opened relative
  to its parent's descriptor with ``O_NOFOLLOW``, and then works by name inside that folder
  (``dir_fd=``); a symbolic link on the way is followed only while it stays inside, and a
  key whose path leaves the root is refused with :class:`InvalidKeyError`
  (:mod:`~framepipe.backends.objects.local_walk` says how);
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
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from framepipe.backends.objects.base import TEMP_PREFIX, ObjectInfo, ObjectStore
from framepipe.backends.objects.local_walk import DIR, MISSING, Folder, Walker, loop
from framepipe.backends.objects.versions import check_pinned, file_version
from framepipe.confined import LinkRefusedError, open_dir_beneath
from framepipe.errors import InvalidKeyError, ObjectKeyConflictError, ObjectStoreError

__all__ = ["LocalObjectStore"]

_MAX_NAME_BYTES = 255  # longest file name on common filesystems
_READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _reason(exc: OSError) -> str:
    """What went wrong, without the file name an ``OSError`` carries (a server path)."""
    return exc.strerror or str(exc)


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
        self._walker = Walker(self._root_str, str(path), self._url)

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

    def _open(self, key: str, action: str) -> int | None:
        """A descriptor of the key's regular file, opened for reading (``None`` for no
        object); anything else there is an :class:`ObjectStoreError` naming the key."""

        def open_at(dir_fd: int, name: str) -> int:
            return os.open(name, _READ, dir_fd=dir_fd)

        try:
            fd = self._walker.find(key, self._segments(key), open_at)
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

    def _create_temp(self, key: str, segments: list[str]) -> tuple[Folder, str, int]:
        """The key's folder (created if missing), and a new empty ``.tmp-*`` file in it. An
        object in the way of the key's folders is an :class:`ObjectKeyConflictError`; a store
        whose own folder is no folder any more (replaced, unmounted) is the store's failure
        (:class:`ObjectStoreError`), not the key's."""
        for attempt in range(3):
            folder: Folder | None = None
            try:
                folder = self._walker.walk(key, segments, make=True)
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
                raise loop()
            return st

        try:
            st = self._walker.find(key, self._segments(key), stat_at)
        except OSError as exc:
            raise self._error("stat", key, exc) from exc
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return _info(key, st)

    def _delete(self, key: str) -> bool:
        segments = self._segments(key)
        try:
            folder = self._walker.walk(key, segments)
        except MISSING:
            return False
        except OSError as exc:
            raise self._error("delete", key, exc) from exc
        try:
            try:
                os.unlink(segments[-1], dir_fd=folder.fd)
            except MISSING:
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
            raise self._error("list", prefix, exc) from exc
        yield from self._list_folder(fd, f"{head}/" if head else "", partial)

    def _list_folder(self, fd: int, key_prefix: str, name_prefix: str) -> Iterator[ObjectInfo]:
        """The objects of the open folder ``fd`` (closed when done) and below, in key order."""
        try:
            try:
                with os.scandir(fd) as scan:
                    entries = [entry for entry in scan if entry.name.startswith(name_prefix)]
            except OSError as exc:
                raise self._error("list", key_prefix + name_prefix, exc) from exc
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
                        child = os.open(entry.name, DIR, dir_fd=fd)
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
