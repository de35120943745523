"""A per-engine start/end journal, so a step that kills its process is known by name.

The engine commits a step's ``running`` state together with later changes (group commit), so
a step that kills the process in its first milliseconds may still be ``ready`` in the store.
Before a step's code runs, the engine appends ``S <execution> <key>`` to a small local file
(one ``os.write`` on an ``O_APPEND`` descriptor: in the kernel at once, so it survives
``os._exit``, ``SIGKILL`` or a native crash) and ``E <execution> <key>`` when the code returns.
Recovery on the same host reads a dead engine's journal: a step started and never ended is the
one that was running when the process died.

Step threads write to it while the engine's heartbeat compacts it: every write and the
compaction take one lock, and the compaction keeps what the journal itself says is open, so no
start or end is lost and no write goes to a closed (or reused) descriptor.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

__all__ = ["Journal", "journal_path", "read_unfinished"]


def journal_path(directory: Path, owner: str) -> Path:
    """Where the engine ``owner`` keeps its journal."""
    return directory / (re.sub(r"[^A-Za-z0-9_.-]", "_", owner) + ".journal")


class Journal:
    """Append-only record of step starts and ends of one engine."""

    _ROTATE_BYTES = 1 << 20

    def __init__(self, directory: Path, owner: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = journal_path(directory, owner)
        self._lock = threading.Lock()
        self._fd = self._open()

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _write(self, line: str) -> None:
        with self._lock:
            os.write(self._fd, line.encode())

    def started(self, execution_id: str, key: str) -> None:
        """Record that the step's code is about to run (from any thread)."""
        self._write(f"S {execution_id} {key}\n")

    def ended(self, execution_id: str, key: str) -> None:
        """Record that the step's code returned or raised (from any thread)."""
        self._write(f"E {execution_id} {key}\n")

    def compact(self) -> None:
        """Once the journal grew past 1 MiB, rewrite it with only the steps it records as
        started and not ended; writes wait meanwhile, and none is lost."""
        with self._lock:
            if os.fstat(self._fd).st_size < self._ROTATE_BYTES:
                return
            still_open = _unfinished(self.path.read_text(errors="replace"))
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(f"S {e} {k}\n" for e, k in sorted(still_open)))
            os.replace(tmp, self.path)
            old, self._fd = self._fd, self._open()
            os.close(old)

    def close(self, *, remove: bool = True) -> None:
        """Close (and by default delete) the journal: a clean stop leaves nothing to recover."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
                if remove:
                    self.path.unlink(missing_ok=True)


def read_unfinished(directory: Path, owner: str) -> set[tuple[str, str]]:
    """(execution id, step key) of steps the dead engine ``owner`` started and never ended."""
    path = journal_path(directory, owner)
    try:
        return _unfinished(path.read_text(errors="replace"))
    except FileNotFoundError:
        return set()


def _unfinished(text: str) -> set[tuple[str, str]]:
    open_steps: set[tuple[str, str]] = set()
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        execution_id, _, key = rest.partition(" ")
        if kind == "S":
            open_steps.add((execution_id, key))
        elif kind == "E":
            open_steps.discard((execution_id, key))
    return open_steps
