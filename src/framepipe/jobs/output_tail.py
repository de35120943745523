"""The tail of a worker process's own output, kept so a step that kills its worker is reported
with what the worker printed last (``framepipe worker`` stores it with its heartbeat)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading

__all__ = ["OutputTail"]


class OutputTail:
    """Copies file descriptors 1 and 2 through pipes to where they went before, keeping the
    last ``limit`` bytes of both in memory. Python's ``sys.stdout``/``sys.stderr`` are switched
    to line buffering, so printed lines reach the pipe at once. Not undone: for a process that
    keeps it for its whole life."""

    def __init__(self, limit: int = 4000) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> OutputTail:
        """Start copying (idempotent)."""
        if self._started:
            return self
        self._started = True
        for fd in (1, 2):
            original = os.dup(fd)
            read_end, write_end = os.pipe()
            os.dup2(write_end, fd)
            os.close(write_end)
            threading.Thread(
                target=self._pump,
                args=(read_end, original),
                name=f"framepipe-tail-{fd}",
                daemon=True,
            ).start()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        return self

    def _pump(self, read_end: int, original: int) -> None:
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                return
            if not chunk:
                return
            with contextlib.suppress(OSError):
                os.write(original, chunk)
            with self._lock:
                self._buf += chunk
                if len(self._buf) > 2 * self.limit:
                    del self._buf[: -self.limit]

    def text(self) -> str:
        """The last ``limit`` bytes, decoded (a partial first line is dropped)."""
        with self._lock:
            data = bytes(self._buf[-self.limit :])
        text = data.decode("utf-8", "replace")
        if len(self._buf) > self.limit and "\n" in text:
            text = text.split("\n", 1)[1]
        return text
