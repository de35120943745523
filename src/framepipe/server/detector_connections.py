"""The connected detectors of a :class:`~framepipe.server.detector.DetectorHub`, one connection
per detector id, and the waiting for a detector to connect.

Guarantees: :meth:`Connections.wait_for` returns an open connection of the detector owning the
session, waiting at most ``wait`` seconds for it to connect (woken by every change announced
with :meth:`Connections.changed`), else raises
:class:`~framepipe.errors.DetectorUnavailableError` naming the session, and the owner when the
session has one. :meth:`Connections.close_all` marks every connection closed and closes its
WebSocket (a socket that cannot be closed is left as it is), then forgets them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

from framepipe.errors import DetectorUnavailableError

__all__ = ["Connection", "Connections"]


class Connection(Protocol):
    """What this module uses of a detector's connection
    (:class:`~framepipe.server.detector_endpoint.DetectorConnection`)."""

    @property
    def detector_id(self) -> str: ...
    @property
    def closed(self) -> asyncio.Event: ...
    @property
    def websocket(self) -> Any: ...


DetectorConnection = TypeVar("DetectorConnection", bound=Connection)


class Connections(Generic[DetectorConnection]):
    """The connection of each connected detector (:attr:`by_id`), and a condition, made on the
    hub's loop by :meth:`bind`, that is notified at each change."""

    def __init__(self) -> None:
        self.by_id: dict[str, DetectorConnection] = {}
        self._changed: asyncio.Condition | None = None

    def bind(self) -> None:
        """Make the condition on the running loop (the hub's start)."""
        self._changed = asyncio.Condition()

    def get(self, detector_id: str | None) -> DetectorConnection | None:
        """The connection of ``detector_id``, or None (also for None)."""
        return self.by_id.get(detector_id) if detector_id is not None else None

    async def changed(self) -> None:
        """Wake whoever waits for a detector to connect: a connection or a session changed."""
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    async def wait_for(
        self, session_id: str, owner: Callable[[str], str | None], wait: float
    ) -> DetectorConnection:
        """The open connection of ``owner(session_id)``, waiting at most ``wait`` seconds."""
        assert self._changed is not None
        deadline = time.monotonic() + wait
        async with self._changed:
            while True:
                owned_by = owner(session_id)
                conn = self.get(owned_by)
                if conn is not None and not conn.closed.is_set():
                    return conn
                left = deadline - time.monotonic()
                if left <= 0:
                    if owned_by is None:
                        raise DetectorUnavailableError(
                            f"no connected detector owns session {session_id!r}",
                            session_id=session_id,
                        )
                    raise DetectorUnavailableError(
                        f"not connected (waited {wait:g}s for it to come back)",
                        detector_id=owned_by,
                        session_id=session_id,
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    async def close_all(self) -> None:
        """Close every connection and forget them (service shutdown)."""
        for conn in list(self.by_id.values()):
            conn.closed.set()
            with contextlib.suppress(Exception):
                await conn.websocket.close(code=1001)
        self.by_id.clear()
