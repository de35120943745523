"""The import ledger: what was already imported, so a re-run does only the new inputs.

Entries are keyed by ``(namespace, identity)``; ``identity`` is whatever is stable for the
input (see :func:`file_identity`), and ``content_hash`` lets a renamed copy be recognised too.
Inside a step, ``ctx.ledger.record(...)`` is committed together with the step's completion: if
the step fails, nothing it recorded is taken as imported.

Namespaces, identities and content hashes are stored as
:func:`~framepipe.jobs.storable.storable_text` makes them (a file name that ``os.listdir``
returned with a lone surrogate is stored with ``\\udcXX`` in its place), and every look-up
applies the same rule, so an identity is found by the very text it was recorded with. An entry
read back (:meth:`Ledger.get`, :meth:`Ledger.entries`) holds the stored, escaped text. A
namespace, identity or hash longer than its column (:data:`MAX_NAMESPACE`,
:data:`MAX_IDENTITY`, :data:`MAX_HASH` characters) is refused when it is recorded, with
:class:`ValueError` (:class:`~framepipe.errors.StepParamsError` inside a step), never by the
commit.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore, ledger
from framepipe.jobs.keys import canonical_json
from framepipe.untrusted import storable_text

__all__ = [
    "MAX_HASH",
    "MAX_IDENTITY",
    "MAX_NAMESPACE",
    "Ledger",
    "LedgerEntry",
    "content_hash",
    "file_fingerprint",
    "file_identity",
]

MAX_NAMESPACE = 200
"""The longest namespace, in characters (the ledger table's column)."""
MAX_IDENTITY = 500
"""The longest identity, in characters (the ledger table's column)."""
MAX_HASH = 128
"""The longest content hash, in characters (the ledger table's column)."""
_MAX_SIZE = 2**63 - 1
_CHUNK = 500
_SAMPLE = 64 * 1024


@dataclass(frozen=True)
class LedgerEntry:
    """One imported item."""

    namespace: str
    identity: str
    content_hash: str | None
    size: int | None
    meta: dict[str, Any]
    execution_id: str | None
    step_key: str | None
    imported_at: float


def file_identity(path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None) -> str:
    """A stable identity of a file: its path (relative to ``root``, with ``/``), size and
    modification time in nanoseconds. Cheap: reads only the file's metadata."""
    p = Path(path)
    st = p.stat()
    rel = p.relative_to(root).as_posix() if root is not None else p.as_posix()
    return f"{rel}|{st.st_size}|{st.st_mtime_ns}"


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A cheap content fingerprint: BLAKE2b of the size, the first and the last 64 KiB.

    Reads at most 128 KiB, so it suits listing a whole SD card; two files with equal
    fingerprints are very likely, not certainly, equal (see :func:`content_hash`).

    What it does not see: bytes changed between the first and the last 64 KiB of a file
    whose size stays the same (a file patched in place). A ledger keyed by the fingerprint
    (the SD-card import's identity is the size and the fingerprint) takes such a file for the
    one it already imported, and skips it. That is the trade-off for camera files, where it
    does not arise: a camera writes each recording whole (as a new file, or over the whole of
    a reused, preallocated one in loop recording), never patching an old recording's middle,
    and two recordings differ in their first 64 KiB (the container's header and the first
    frames) and their last (the index, with its times and sample sizes, or the last frames).
    Where files may be edited in place, key the ledger by :func:`content_hash`, which reads
    all of the file."""
    p = Path(path)
    size = p.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with p.open("rb") as fh:
        digest.update(fh.read(_SAMPLE))
        if size > 2 * _SAMPLE:
            fh.seek(-_SAMPLE, os.SEEK_END)
            digest.update(fh.read(_SAMPLE))
    return digest.hexdigest()


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of the whole file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def ledger_row(
    namespace: str,
    identity: str,
    *,
    content_hash: str | None,
    size: int | None,
    meta: dict[str, Any] | None,
    execution_id: str | None,
    step_key: str | None,
) -> dict[str, Any]:
    """A ledger row as stored, its texts made storable (see the module); raises TypeError if
    ``meta`` is not JSON-serialisable or a field is of the wrong type, ValueError if a text is
    longer than its column or ``size`` is negative or too large to store."""
    meta = dict(meta or {})
    canonical_json(meta)
    if size is not None and (
        isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= _MAX_SIZE
    ):
        raise ValueError(f"size must be a whole number of bytes from 0 to {_MAX_SIZE}: {size!r}")
    return {
        "namespace": _stored(namespace, "namespace", MAX_NAMESPACE),
        "identity": _stored(identity, "identity", MAX_IDENTITY),
        "content_hash": None
        if content_hash is None
        else _stored(content_hash, "content_hash", MAX_HASH),
        "size": size,
        "meta": meta,
        "execution_id": execution_id,
        "step_key": step_key,
        "imported_at": time.time(),
    }


def _stored(value: str, field: str, limit: int) -> str:
    """``value`` as the ledger stores and looks it up; TypeError/ValueError if it cannot be."""
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a string, not {type(value).__name__}")
    text = storable_text(value)
    if len(text) > limit:
        raise ValueError(f"{field} is {len(text)} characters long; at most {limit} are stored")
    return text


def _key(value: str) -> str:
    """A looked-up text as the ledger stores it (the same rule as :func:`ledger_row`)."""
    return storable_text(value) if isinstance(value, str) else value


class Ledger:
    """Answers "already imported?" for one namespace of a state store."""

    def __init__(self, store: StateStore, namespace: str = "default") -> None:
        self.store = store
        self.namespace = _key(namespace)

    def is_imported(self, identity: str | None = None, *, content_hash: str | None = None) -> bool:
        """True if an entry has this identity, or (when given) this content hash."""
        if identity is None and content_hash is None:
            raise ValueError("give an identity or a content_hash")
        cond = []
        if identity is not None:
            cond.append(ledger.c.identity == _key(identity))
        if content_hash is not None:
            cond.append(ledger.c.content_hash == _key(content_hash))
        query = (
            sa.select(ledger.c.identity)
            .where(ledger.c.namespace == self.namespace, sa.or_(*cond))
            .limit(1)
        )
        with self.store.read() as conn:
            return conn.execute(query).first() is not None

    def filter_new(self, identities: Iterable[str]) -> list[str]:
        """The identities not imported yet, in the order given (duplicates removed), as
        given (not escaped)."""
        wanted = list(dict.fromkeys(identities))
        stored = list(dict.fromkeys(_key(i) for i in wanted))
        known: set[str] = set()
        with self.store.read() as conn:
            for i in range(0, len(stored), _CHUNK):
                chunk = stored[i : i + _CHUNK]
                known.update(
                    conn.execute(
                        sa.select(ledger.c.identity).where(
                            ledger.c.namespace == self.namespace, ledger.c.identity.in_(chunk)
                        )
                    ).scalars()
                )
        return [i for i in wanted if _key(i) not in known]

    def get(self, identity: str) -> LedgerEntry | None:
        """The entry for ``identity``, or None."""
        with self.store.read() as conn:
            row = conn.execute(
                sa.select(ledger).where(
                    ledger.c.namespace == self.namespace, ledger.c.identity == _key(identity)
                )
            ).first()
        return LedgerEntry(**row._mapping) if row is not None else None

    def entries(self) -> list[LedgerEntry]:
        """Every entry of the namespace, oldest first."""
        with self.store.read() as conn:
            rows = conn.execute(
                sa.select(ledger)
                .where(ledger.c.namespace == self.namespace)
                .order_by(ledger.c.imported_at)
            ).all()
        return [LedgerEntry(**r._mapping) for r in rows]

    def record(
        self,
        identity: str,
        *,
        content_hash: str | None = None,
        size: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> None:
        """Record ``identity`` as imported now (outside a step: committed at once)."""
        from framepipe.jobs.batches import Batch, write_batch

        write_batch(
            self.store,
            Batch(
                ledger=[
                    ledger_row(
                        self.namespace,
                        identity,
                        content_hash=content_hash,
                        size=size,
                        meta=meta,
                        execution_id=None,
                        step_key=None,
                    )
                ]
            ),
        )
