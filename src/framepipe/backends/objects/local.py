"""The local-directory object store: each object is a file under the root at its key's path.

Writes go to a ``.tmp-*`` file in the target's directory, are fsynced, then renamed over the
target (``os.replace``), so readers never see a partial object and a completed ``put`` survives
a crash. ``list`` skips temporary files and symlinks; a key whose path resolves outside the
root (through a symlink) is refused with :class:`InvalidKeyError`.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from framepipe.backends.objects.base import (
    TEMP_PREFIX,
    ObjectInfo,
    ObjectStore,
    _create_temp,
)
from framepipe.errors import InvalidKeyError, ObjectStoreError

__all__ = ["LocalObjectStore"]

_MAX_NAME_BYTES = 255  # longest file name on common filesystems
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._root_str = str(self._root).rstrip("/")

    @property
    def url(self) -> str:
        return self._url

    @property
    def root(self) -> Path:
        return self._root

    # -- paths --------------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The file for ``key``: refuses names the store reserves, too long for the
        filesystem, or resolving outside the root."""
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
        path = self._root.joinpath(*segments)
        if self._leaves_root(segments):
            raise InvalidKeyError(
                f"invalid object key {key!r}: its path leaves {self._url} through a symlink"
            )
        return path

    def _leaves_root(self, segments: list[str]) -> bool:
        """Whether the path of ``segments`` under the root resolves outside it. Walks the
        existing part of the path with ``lstat`` (the root itself is resolved once, at open);
        only a symlink met on the way is resolved in full."""
        current = self._root_str
        for segment in segments:
            current = f"{current}/{segment}"
            try:
                mode = os.lstat(current).st_mode
            except (FileNotFoundError, NotADirectoryError):
                return False  # nothing further exists, so no link can lead out
            if stat.S_ISLNK(mode):
                resolved = Path(os.path.realpath(self._root.joinpath(*segments)))
                return resolved == self._root or not resolved.is_relative_to(self._root)
        return False

    def _error(self, action: str, key: str, exc: OSError) -> ObjectStoreError:
        return ObjectStoreError(f"cannot {action} {key!r} in {self._url}: {exc}")

    # -- writes -------------------------------------------------------------------------------

    def _write(self, key: str, path: Path, fill: Callable[[BinaryIO], object]) -> ObjectInfo:
        """Write through a temp file beside ``path``, fsync, rename into place."""
        fd, tmp = self._create_temp(key, path.parent)
        try:
            with os.fdopen(fd, "wb") as file:
                fill(file)
                file.flush()
                if self.durable:
                    os.fsync(file.fileno())
                st = os.fstat(file.fileno())
            os.replace(tmp, path)
            if self.durable:
                _fsync_dir(path.parent)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise self._error("write", key, exc) from exc
            raise
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _create_temp(self, key: str, directory: Path) -> tuple[int, Path]:
        for attempt in range(3):
            try:
                return _create_temp(directory)
            except FileNotFoundError as exc:  # a new directory, or a concurrent delete pruned it
                if attempt == 2:
                    raise self._error("write", key, exc) from exc
            except OSError as exc:
                raise self._error("write", key, exc) from exc
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._error("write", key, exc) from exc
        raise AssertionError("unreachable")

    def _put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return self._write(key, self._path(key), lambda file: file.write(data))

    def _put_file(self, key: str, path: Path) -> ObjectInfo:
        target = self._path(key)
        with path.open("rb") as source:
            return self._write(key, target, lambda file: shutil.copyfileobj(source, file))

    def _copy(self, src_key: str, dst_key: str) -> ObjectInfo | None:
        src, dst = self._path(src_key), self._path(dst_key)
        try:
            source = src.open("rb")
        except _MISSING:
            return None
        except OSError as exc:
            raise self._error("read", src_key, exc) from exc
        with source:
            return self._write(dst_key, dst, lambda file: shutil.copyfileobj(source, file))

    # -- reads --------------------------------------------------------------------------------

    def _get_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except _MISSING:
            return None
        except OSError as exc:
            raise self._error("read", key, exc) from exc

    def _get_file(self, key: str, path: Path) -> bool:
        try:
            shutil.copyfile(self._path(key), path)
        except _MISSING:
            return False
        except OSError as exc:
            raise self._error("read", key, exc) from exc
        return True

    def _stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except _MISSING:
            return None
        except OSError as exc:
            raise self._error("stat", key, exc) from exc
        if not stat.S_ISREG(st.st_mode):
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def _delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except _MISSING:
            return False
        except OSError as exc:
            raise self._error("delete", key, exc) from exc
        # prune directories left empty, so a later put of a parent key does not collide
        parent = path.parent
        while parent != self._root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
        return True

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        head, _, partial = prefix.rpartition("/")
        start = self._root.joinpath(*head.split("/")) if head else self._root
        if os.path.realpath(start) != str(start):  # never list through a symlink
            return iter(())
        return self._walk(start, f"{head}/" if head else "", partial)

    def _walk(
        self, directory: Path | str, key_prefix: str, name_prefix: str
    ) -> Iterator[ObjectInfo]:
        try:
            with os.scandir(directory) as scan:
                entries = [entry for entry in scan if entry.name.startswith(name_prefix)]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            raise ObjectStoreError(f"cannot list {directory} in {self._url}: {exc}") from exc
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
                yield from self._walk(entry.path, f"{key_prefix}{entry.name}/", "")
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # deleted while listing
                continue
            yield ObjectInfo(f"{key_prefix}{entry.name}", st.st_size, st.st_mtime)
