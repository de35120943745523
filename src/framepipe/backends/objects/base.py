"""The object store contract: keys, :class:`ObjectInfo`, :class:`ObjectStore`.

The base class owns the policy: it validates every key, refuses use after :meth:`close`, turns
"missing" into :class:`~framepipe.errors.ObjectNotFoundError` and makes :meth:`get_file` atomic.
A backend implements only the small primitives (``_put_bytes``, ``_put_file``, ``_get_bytes``,
``_get_file``, ``_stat``, ``_delete``, ``_list``), which receive keys already validated and
report a missing object by returning ``None`` / ``False``.

Guarantees every backend gives:

- atomic visibility: a reader sees the whole object or no object, never a partial one;
- ``put`` overwrites: the last completed write of a key wins;
- ``list`` yields objects in key order (Python ``str`` order, which is UTF-8 byte order);
- a version tag: ``stat``, ``list``, ``put`` and ``copy`` give each object's
  :attr:`ObjectInfo.version`, which changes whenever the object is replaced, and
  ``copy(..., if_version=)`` copies only that version (:class:`ObjectReplacedError` otherwise),
  so a caller can pin an object and later copy exactly what it pinned.
"""

from __future__ import annotations

import abc
import errno
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from framepipe.backends.objects.versions import check_pinned
from framepipe.errors import InvalidKeyError, ObjectNotFoundError, ObjectStoreError

__all__ = ["MAX_KEY_BYTES", "ObjectInfo", "ObjectStore", "validate_key"]

MAX_KEY_BYTES = 1024
"""Longest key, in bytes of UTF-8 (S3's limit)."""

TEMP_PREFIX = ".tmp-"
"""Name prefix of the temporary files writes go through before they are renamed into place."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DRIVE = re.compile(r"[A-Za-z]:")


def _show(text: str, limit: int = 80) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."


def _key_problem(key: object) -> str | None:
    """What is wrong with ``key``, or ``None`` if it is a valid key."""
    if not isinstance(key, str):
        return f"must be a str, not {type(key).__name__}"
    if not key:
        return "is empty"
    if key.startswith("/"):
        return "starts with '/' (keys are relative to the store)"
    if key.endswith("/"):
        return "ends with '/'"
    if "\\" in key:
        return "contains a backslash (separate segments with '/')"
    control = _CONTROL.search(key)
    if control:
        return f"contains the control character {control.group()!r}"
    if _DRIVE.match(key):
        return f"starts with a drive prefix {key[:2]!r}"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    if size > MAX_KEY_BYTES:
        return f"is {size} bytes of UTF-8, longer than {MAX_KEY_BYTES}"
    for segment in key.split("/"):
        if not segment:
            return "has an empty segment ('//')"
        if segment in (".", ".."):
            return f"has a {segment!r} segment"
    return None


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise :class:`InvalidKeyError`.

    A key is a non-empty, relative, ``/``-separated path of at most 1024 bytes of UTF-8: no
    leading or trailing ``/``, no empty, ``.`` or ``..`` segment, no backslash, no control
    character, no Windows drive prefix (``C:``).
    """
    problem = _key_problem(key)
    if problem is not None:
        shown = _show(key) if isinstance(key, str) else repr(key)
        raise InvalidKeyError(f"invalid object key {shown}: {problem}")
    return key


def _validate_prefix(prefix: str) -> str:
    """A list prefix is ``""`` or a valid key, optionally followed by ``/``."""
    if prefix == "":
        return prefix
    if not isinstance(prefix, str):
        problem: str | None = f"must be a str, not {type(prefix).__name__}"
    elif prefix.startswith("/"):
        problem = "starts with '/' (keys are relative to the store)"
    else:
        problem = _key_problem(prefix.removesuffix("/"))
    if problem is not None:
        raise InvalidKeyError(f"invalid list prefix {prefix!r}: {problem}")
    return prefix


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes, last modification (unix seconds) and
    ``version``, an opaque tag that changes whenever the object is replaced (what it is in each
    store: :mod:`framepipe.backends.objects.versions`), ``None`` from a backend that has none.
    Compare tags only for equality, and only tags of the same store."""

    key: str
    size: int
    modified: float
    version: str | None = None


def _create_temp(directory: Path) -> tuple[int, Path]:
    """Create a new empty file named ``.tmp-<random>`` in ``directory``; honours the umask."""
    path = directory / f"{TEMP_PREFIX}{secrets.token_hex(8)}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    return fd, path


class ObjectStore(abc.ABC):
    """A flat store of immutable-until-overwritten byte objects addressed by keys.

    Every public method validates its keys (:func:`validate_key`) and raises
    :class:`ObjectStoreError` once the store is closed. Writes are atomic (a reader sees the
    whole object or none) and ``put`` overwrites. Use as a context manager to close it.
    """

    _closed: bool = False

    # -- public API ---------------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """Where the store lives, as a URL ``open_object_store`` accepts."""

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` under ``key``, replacing any object there; atomic."""
        key = self._key(key)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"put({key!r}) needs bytes, not {type(data).__name__}")
        return self._put_bytes(key, data)

    def put_file(self, key: str, path: str | os.PathLike[str]) -> ObjectInfo:
        """Store the contents of the local file ``path`` under ``key``; atomic, overwrites."""
        key = self._key(key)
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(errno.ENOENT, f"put_file({key!r}): no such file", str(path))
        return self._put_file(key, source)

    def get(self, key: str) -> bytes:
        """The object's bytes; :class:`ObjectNotFoundError` if there is none."""
        key = self._key(key)
        data = self._get_bytes(key)
        if data is None:
            raise self._not_found(key)
        return data

    def get_file(self, key: str, dest: str | os.PathLike[str]) -> Path:
        """Download the object to the local file ``dest`` and return its path.

        Atomic: the object is written to a temporary file beside ``dest`` and renamed over it,
        so ``dest`` holds either its previous content or the whole object, never a partial
        download. ``dest``'s parent directories are created.
        """
        key = self._key(key)
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(target.parent)
        os.close(fd)
        replaced = False
        try:
            if self._get_file(key, tmp):
                fd = os.open(tmp, os.O_RDWR)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, target)
                replaced = True
        finally:
            if not replaced:
                tmp.unlink(missing_ok=True)
        if not replaced:
            raise self._not_found(key)
        return target

    def exists(self, key: str) -> bool:
        key = self._key(key)
        return self._stat(key) is not None

    def stat(self, key: str) -> ObjectInfo:
        """Size and modification time; :class:`ObjectNotFoundError` if there is no object."""
        key = self._key(key)
        info = self._stat(key)
        if info is None:
            raise self._not_found(key)
        return info

    def delete(self, key: str) -> bool:
        """Remove the object; ``True`` if it existed. Deleting a missing key is not an error."""
        key = self._key(key)
        return self._delete(key)

    def delete_many(self, keys: Iterable[str]) -> int:
        """Remove the objects named by ``keys`` (a missing one is not an error); how many keys
        were named. Every key is validated before anything is deleted
        (:class:`~framepipe.errors.InvalidKeyError` names the first bad one). S3 removes up to
        1,000 a request (``DeleteObjects``) where :meth:`delete` takes two each; a key the store
        refuses raises :class:`~framepipe.errors.ObjectStoreError` naming it, the keys of
        earlier requests being gone."""
        checked = [self._key(key) for key in keys]
        self._delete_many(checked)
        return len(checked)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix`` (a plain string prefix), in key order.

        ``prefix`` is ``""`` or a valid key optionally followed by ``/``: ``"frames/cam1/"``
        lists that "folder", ``"frames/cam"`` also matches ``frames/cam2/...``.
        """
        self._check_open()
        return self._list(_validate_prefix(prefix))

    def copy(self, src_key: str, dst_key: str, *, if_version: str | None = None) -> ObjectInfo:
        """Copy ``src_key`` to ``dst_key`` (overwriting it); :class:`ObjectNotFoundError` if
        ``src_key`` is missing.

        With ``if_version`` (an :attr:`ObjectInfo.version` of ``src_key``), only that version
        is copied: a source replaced since it was taken is :class:`ObjectReplacedError`
        naming the key, and ``dst_key`` is left as it was. The check and the copy are one
        (S3: ``CopySourceIfMatch``; local: the file checked is the file copied), so no
        replacement in between is copied."""
        src_key = self._key(src_key)
        dst_key = validate_key(dst_key)
        info = self._copy(src_key, dst_key, if_version)
        if info is None:
            raise self._not_found(src_key)
        return info

    def close(self) -> None:
        """Release the store's resources; further calls raise. Closing twice is fine."""
        if not self._closed:
            self._closed = True
            self._close()

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- helpers ------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ObjectStoreError(f"object store {self.url} is closed")

    def _key(self, key: str) -> str:
        self._check_open()
        return validate_key(key)

    def _not_found(self, key: str) -> ObjectNotFoundError:
        return ObjectNotFoundError(f"no object {key!r} in {self.url}", key=key)

    # -- primitives: keys are valid, the store is open ----------------------------------------

    @abc.abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Store ``data`` atomically under ``key``."""

    @abc.abstractmethod
    def _put_file(self, key: str, path: Path) -> ObjectInfo:
        """Store the contents of the existing local file ``path`` atomically under ``key``."""

    @abc.abstractmethod
    def _get_bytes(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` if there is no object."""

    @abc.abstractmethod
    def _get_file(self, key: str, path: Path) -> bool:
        """Write the object into ``path`` (an empty temp file the base renames into place);
        ``False`` if there is no object."""

    @abc.abstractmethod
    def _stat(self, key: str) -> ObjectInfo | None:
        """The object's info, or ``None`` if there is no object."""

    @abc.abstractmethod
    def _delete(self, key: str) -> bool:
        """Remove the object; ``True`` if it existed."""

    def _delete_many(self, keys: Sequence[str]) -> None:
        """Remove the objects (validated keys); one :meth:`_delete` each unless overridden."""
        for key in keys:
            self._delete(key)

    @abc.abstractmethod
    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in key order."""

    def _copy(self, src_key: str, dst_key: str, if_version: str | None = None) -> ObjectInfo | None:
        """Copy an object (only version ``if_version``, when given); ``None`` if ``src_key``
        is missing. Streams through a local temp file, the version checked before and after
        the download; backends with a server-side copy override this, with a check that
        leaves no window."""
        with tempfile.TemporaryDirectory(prefix="framepipe-copy-") as tmpdir:
            tmp = Path(tmpdir) / "object"
            tmp.touch()
            if not self._is_version(src_key, dst_key, if_version):
                return None
            if not self._get_file(src_key, tmp):
                return None
            if not self._is_version(src_key, dst_key, if_version):
                return None
            return self._put_file(dst_key, tmp)

    def _is_version(self, src_key: str, dst_key: str, version: str | None) -> bool:
        """Whether ``src_key`` exists, when it is ``version`` (any, for ``None``); else
        :class:`ObjectReplacedError`."""
        if version is None:
            return True
        info = self._stat(src_key)
        if info is None:
            return False
        check_pinned(self.url, src_key, dst_key, version, info.version)
        return True

    def _close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release backend resources (connections, clients)."""
