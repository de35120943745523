"""The tail of a worker process's own output, kept so a step that kills its worker is reported
with what the worker printed last (``framepipe worker`` stores it with its heartbeat)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

__all__ = ["OutputTail"]


class OutputTail:
    """Copies file descriptors 1 and 2 through pipes to where they went before, keeping the
    last ``limit`` bytes of both in memory. Python's ``sys.stdout``/``sys.stderr`` are switched
    to line buffering, so printed lines reach the pipe at once.

    :meth:`stop` puts descriptors 1 and 2 back and waits until what was written before it has
    been copied, so a last line (an error, a final log line) is never lost when the process
    exits right after; a step's child process that still holds the pipe keeps its output
    copied in the background, without holding up :meth:`stop` past ``drain``."""

    def __init__(self, limit: int = 4000) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._started = False
        self._restore: list[tuple[int, int]] = []
        self._pumps: list[threading.Thread] = []

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
            self._restore.append((fd, original))
            pump = threading.Thread(
                target=self._pump,
                args=(read_end, original),
                name=f"framepipe-tail-{fd}",
                daemon=True,
            )
            pump.start()
            self._pumps.append(pump)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        return self

    def stop(self, drain: float = 2.0) -> None:
        """Put descriptors 1 and 2 back where they went before :meth:`start` and wait (up to
        ``drain`` seconds in all) for the copies of what was written before. Idempotent."""
        restore, self._restore = self._restore, []
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        for fd, original in restore:
            os.dup2(original, fd)
        deadline = time.monotonic() + drain
        for pump in self._pumps:
            pump.join(max(0.0, deadline - time.monotonic()))
        self._pumps = []

    def _pump(self, read_end: int, original: int) -> None:
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                return
            if not chunk:
                os.close(read_end)
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
