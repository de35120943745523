"""Events: every state change of an execution or step, persisted and published.

:class:`EventBus` is the in-process publisher. Subscribers get events after they are committed
to the state store, in commit order. A subscription's queue is bounded: a subscriber that falls
behind loses the oldest events (counted in ``dropped``) rather than slowing the engine; events
carry increasing ``id`` values so a gap is visible and can be filled from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "EventBus", "Subscription"]


@dataclass(frozen=True)
class Event:
    """One state change. ``type`` is dotted: ``execution.completed``, ``step.progress`` ..."""

    type: str
    ts: float
    execution_id: str | None = None
    step_key: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    id: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the event."""
        return {
            "id": self.id,
            "type": self.type,
            "ts": self.ts,
            "execution_id": self.execution_id,
            "step_key": self.step_key,
            "data": self.data,
        }


class Subscription:
    """An async iterator of the events of one execution (of all when ``execution_id`` is None)."""

    def __init__(self, bus: EventBus, execution_id: str | None, maxsize: int) -> None:
        self._bus = bus
        self.execution_id = execution_id
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize)
        self.dropped = 0

    def _offer(self, event: Event) -> None:
        if self.execution_id is not None and event.execution_id != self.execution_id:
            return
        while True:
            try:
                self._queue.put_nowait(event)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()
                self.dropped += 1

    async def get(self) -> Event:
        """The next event; raises ``StopAsyncIteration`` once the subscription is closed."""
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    def close(self) -> None:
        """Stop receiving; a pending ``get`` ends the iteration."""
        self._bus._subscriptions.discard(self)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """In-process publish/subscribe of committed events; used on one event loop."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()
        self._listeners: list[Callable[[Event], None]] = []

    def subscribe(self, execution_id: str | None = None, *, maxsize: int = 10_000) -> Subscription:
        """Subscribe to the events of one execution, or of all with ``execution_id=None``."""
        sub = Subscription(self, execution_id, maxsize)
        self._subscriptions.add(sub)
        return sub

    def add_listener(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on the loop for each event; returns a function that removes
        it. A listener that raises is removed, so one bad listener cannot stop the engine."""
        self._listeners.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(callback)

        return remove

    @property
    def watched(self) -> bool:
        """True while anyone subscribes or listens (publishing to nobody can be skipped)."""
        return bool(self._subscriptions or self._listeners)

    def publish(self, events: Iterable[Event]) -> None:
        """Deliver committed events to every subscriber and listener."""
        for event in events:
            for sub in tuple(self._subscriptions):
                sub._offer(event)
            for listener in tuple(self._listeners):
                try:
                    listener(event)
                except Exception:
                    self._listeners.remove(listener)
                    from framepipe.logs import get_logger

                    get_logger("events").exception("event listener %r raised; removed", listener)
