"""The import ledger: what was already imported, so a re-run does only the new inputs.

Entries are keyed by ``(namespace, identity)``; ``identity`` is whatever is stable for the
input (see :func:`file_identity`), and ``content_hash`` lets a renamed copy be recognised too.
Inside a step, ``ctx.ledger.record(...)`` is committed together with the step's completion: if
the step fails, nothing it recorded is taken as imported.
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

__all__ = ["Ledger", "LedgerEntry", "content_hash", "file_fingerprint", "file_identity"]

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
    fingerprints are very likely, not certainly, equal (see :func:`content_hash`)."""
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
    """A ledger row as stored; raises TypeError if ``meta`` is not JSON-serialisable."""
    meta = dict(meta or {})
    canonical_json(meta)
    return {
        "namespace": namespace,
        "identity": identity,
        "content_hash": content_hash,
        "size": size,
        "meta": meta,
        "execution_id": execution_id,
        "step_key": step_key,
        "imported_at": time.time(),
    }


class Ledger:
    """Answers "already imported?" for one namespace of a state store."""

    def __init__(self, store: StateStore, namespace: str = "default") -> None:
        self.store = store
        self.namespace = namespace

    def is_imported(self, identity: str | None = None, *, content_hash: str | None = None) -> bool:
        """True if an entry has this identity, or (when given) this content hash."""
        if identity is None and content_hash is None:
            raise ValueError("give an identity or a content_hash")
        cond = []
        if identity is not None:
            cond.append(ledger.c.identity == identity)
        if content_hash is not None:
            cond.append(ledger.c.content_hash == content_hash)
        query = (
            sa.select(ledger.c.identity)
            .where(ledger.c.namespace == self.namespace, sa.or_(*cond))
            .limit(1)
        )
        with self.store.read() as conn:
            return conn.execute(query).first() is not None

    def filter_new(self, identities: Iterable[str]) -> list[str]:
        """The identities not imported yet, in the order given (duplicates removed)."""
        wanted = list(dict.fromkeys(identities))
        known: set[str] = set()
        with self.store.read() as conn:
            for i in range(0, len(wanted), _CHUNK):
                chunk = wanted[i : i + _CHUNK]
                known.update(
                    conn.execute(
                        sa.select(ledger.c.identity).where(
                            ledger.c.namespace == self.namespace, ledger.c.identity.in_(chunk)
                        )
                    ).scalars()
                )
        return [i for i in wanted if i not in known]

    def get(self, identity: str) -> LedgerEntry | None:
        """The entry for ``identity``, or None."""
        with self.store.read() as conn:
            row = conn.execute(
                sa.select(ledger).where(
                    ledger.c.namespace == self.namespace, ledger.c.identity == identity
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
        from framepipe.jobs.records import Batch, write_batch

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
