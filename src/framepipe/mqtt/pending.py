"""The MQTT sink's queue of event messages not yet acknowledged: :class:`PendingEvents`.

Guarantees:

* Bounded: past ``max_pending`` messages the oldest is dropped and counted in ``dropped``, with
  one warning per connection (the writer calls :meth:`PendingEvents.connected`).
* Messages leave in the order they were queued; one put back (:meth:`PendingEvents.requeue`,
  its publish lost with the connection) goes first again, or is counted in ``dropped`` when
  the queue is full.
* Once closed (:meth:`PendingEvents.close`) nothing more is queued: the sink counts what comes
  as dropped, and :meth:`PendingEvents.drop_all` counts what was never published.
"""

from __future__ import annotations

from collections import deque

from framepipe.logs import ComponentLogger

__all__ = ["PendingEvents"]


class PendingEvents:
    """Queued ``(topic, payload)`` event messages; ``url`` (password masked) names the broker in
    the queue-full warning."""

    def __init__(self, max_pending: int, url: str, log: ComponentLogger) -> None:
        self.max_pending = max_pending
        self.dropped = 0
        """Messages dropped: the queue was full, or the sink closed before they were sent."""
        self.closed = False
        self._items: deque[tuple[str, bytes]] = deque()
        self._url = url
        self._log = log
        self._warned = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, topic: str, payload: bytes) -> None:
        """Queue one message, dropping the oldest when full."""
        if len(self._items) >= self.max_pending:
            self._items.popleft()
            self.dropped += 1
            if not self._warned:
                self._warned = True
                self._log.warning(
                    "MQTT queue full (%d): dropping the oldest events until %s takes them",
                    self.max_pending,
                    self._url,
                )
        self._items.append((topic, payload))

    def take(self) -> tuple[str, bytes]:
        """The oldest message, removed (the queue must not be empty)."""
        return self._items.popleft()

    def requeue(self, item: tuple[str, bytes]) -> None:
        """Put ``item`` back first, unless the queue is full (then it is dropped)."""
        if len(self._items) < self.max_pending:
            self._items.appendleft(item)
        else:
            self.dropped += 1

    def connected(self) -> None:
        """A new connection: the next overflow warns again."""
        self._warned = False

    def close(self) -> None:
        """Queue nothing more."""
        self.closed = True

    def drop_all(self) -> None:
        """Count every queued message as dropped and forget it."""
        self.dropped += len(self._items)
        self._items.clear()
