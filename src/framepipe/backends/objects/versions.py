"""Object versions: what :attr:`~framepipe.backends.objects.base.ObjectInfo.version` is in
each store, and the rule a copy pinned to one keeps.

A version is an opaque tag that changes whenever the object is replaced. Compare versions
only for equality, and only versions of the same store.

* S3 (and S3-compatible servers): the object's ETag as S3 gives it, quotes included. It
  changes whenever other bytes are stored under the key, within the same second too; the same
  bytes stored again keep it.
* The local store: its file's identity and state, ``<inode>.<mtime in ns>.<size>`` in hex
  (:func:`file_version`). Every ``put`` writes a new file (a new inode) renamed over the key,
  so a replacement changes it even within the same second and at the same size; so does a
  write to the file in place that moves its modification time. The device number is not part
  of it: the same files seen through another mount (an NFS share from another machine, an
  overlay or btrfs volume mounted again after a restart) keep their versions.

A copy pinned to a version (``copy(..., if_version=)``) copies that version or nothing: a
source found to be another version, or no object, is refused with
:class:`~framepipe.errors.ObjectReplacedError` naming the key (:func:`check_pinned`), the
destination left as it was. Each store checks where no replacement slips in between the
check and the copy: S3 sends the version as ``CopySourceIfMatch`` (and checks the source
again after a copy on a server that ignores it), the local store checks the open file it
copies, the generic copy checks before and after its download.
"""

from __future__ import annotations

import os

from framepipe.errors import ObjectReplacedError

__all__ = ["check_pinned", "file_version", "replaced"]


def file_version(st: os.stat_result) -> str:
    """The version of the local store's file that ``st`` describes (see the module)."""
    return f"{st.st_ino:x}.{st.st_mtime_ns:x}.{st.st_size:x}"


def replaced(
    url: str, src_key: str, dst_key: str, pinned: str, now: str | None
) -> ObjectReplacedError:
    """The refusal of a copy from ``src_key`` to ``dst_key`` in the store at ``url``, pinned
    to version ``pinned`` of ``src_key``, which is ``now`` (``None``: not known, or gone)."""
    found = f" (now {now})" if now is not None else ""
    return ObjectReplacedError(
        f"cannot copy {src_key!r} to {dst_key!r} in {url}: {src_key!r} was replaced, "
        f"it is no longer version {pinned}{found}",
        key=src_key,
        version=pinned,
    )


def check_pinned(url: str, src_key: str, dst_key: str, pinned: str | None, now: str | None) -> None:
    """Refuse (:func:`replaced`) a copy pinned to version ``pinned`` of a source found to be
    ``now`` (``None``: no object); a copy pinned to no version (``None``) takes any."""
    if pinned is not None and now != pinned:
        raise replaced(url, src_key, dst_key, pinned, now)
