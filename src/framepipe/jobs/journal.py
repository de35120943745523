"""A per-engine start/end journal, so a step that kills its process is known by name.

The engine commits a step's ``running`` state together with later changes (group commit), so
a step that kills the process in its first milliseconds may still be ``ready`` in the store.
Before a step's code runs, the engine appends ``S <execution> <key>`` to a small local file
(one ``os.write`` on an ``O_APPEND`` descriptor: in the kernel at once, so it survives
``os._exit``, ``SIGKILL`` or a native crash) and ``E <execution> <key>`` when the code returns.
Recovery on the same host reads a dead engine's journal: a step started and never ended is the
one that was running when the process died.
"""

from __future__ import annotations

import os
import re
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
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def started(self, execution_id: str, key: str) -> None:
        """Record that the step's code is about to run."""
        os.write(self._fd, f"S {execution_id} {key}\n".encode())

    def ended(self, execution_id: str, key: str) -> None:
        """Record that the step's code returned or raised."""
        os.write(self._fd, f"E {execution_id} {key}\n".encode())

    def compact(self, running: list[tuple[str, str]]) -> None:
        """Rewrite the journal with only ``running`` steps once it grew past 1 MiB."""
        if os.fstat(self._fd).st_size < self._ROTATE_BYTES:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(f"S {e} {k}\n" for e, k in running))
        os.replace(tmp, self.path)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def close(self, *, remove: bool = True) -> None:
        """Close (and by default delete) the journal: a clean stop leaves nothing to recover."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            if remove:
                self.path.unlink(missing_ok=True)


def read_unfinished(directory: Path, owner: str) -> set[tuple[str, str]]:
    """(execution id, step key) of steps the dead engine ``owner`` started and never ended."""
    path = journal_path(directory, owner)
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return set()
    open_steps: set[tuple[str, str]] = set()
    for line in lines:
        kind, _, rest = line.partition(" ")
        execution_id, _, key = rest.partition(" ")
        if kind == "S":
            open_steps.add((execution_id, key))
        elif kind == "E":
            open_steps.discard((execution_id, key))
    return open_steps
