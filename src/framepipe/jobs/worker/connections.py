"""A worker's connections (:class:`Connections`): its state store and its broker, and the one
thread (``framepipe-db``) its event loop runs their blocking calls on, so the loop never waits
on a socket and its calls reach the store one at a time.

A lost connection (:func:`is_transient`) is retried with backoff until it works
(:meth:`Connections.retrying`); once the worker is stopping, only for a bounded time, then the
error is raised: nothing is acknowledged before it is committed, and what was not committed is
redone elsewhere when its leases lapse.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from framepipe.backends.state import StateStore
from framepipe.backoff import Backoff
from framepipe.errors import BrokerError
from framepipe.jobs.delivery import StepDelivery
from framepipe.jobs.rounds import Delivery
from framepipe.jobs.transient import is_transient_store_error
from framepipe.logs import get_logger

__all__ = ["Connections", "is_transient"]

T = TypeVar("T")
_log = get_logger("jobs.worker")


def is_transient(exc: BaseException) -> bool:
    """A lost broker connection, or transient store trouble by the rule the engine shares
    (:func:`~framepipe.jobs.transient.is_transient_store_error`): retried, never a refusal."""
    return isinstance(exc, BrokerError) or is_transient_store_error(exc)


class Connections:
    """The worker's ``store`` and ``broker`` (the store closed with them only if ``own_store``),
    called from the event loop on their thread once :meth:`open`."""

    def __init__(
        self,
        store: StateStore,
        broker: StepDelivery,
        *,
        own_store: bool,
        worker_id: str,
        stopping: threading.Event,
    ) -> None:
        self.store = store
        self.broker = broker
        self._own_store = own_store
        self._id = worker_id
        self._stopping = stopping
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: ThreadPoolExecutor | None = None

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the thread the calls from ``loop`` run on."""
        self._loop = loop
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="framepipe-db")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the connections' thread."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._thread, fn, *args)

    async def retrying(
        self, fn: Callable[..., T], *args: Any, what: str, while_stopping: float | None = 30.0
    ) -> T:
        """Retry on a lost database or broker connection, with backoff, until it works.

        Once the worker is stopping, retries go on for ``while_stopping`` seconds more (None:
        not at all), then the error is raised: what was not committed is redone elsewhere
        when the leases lapse."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        failures = 0
        stop_deadline: float | None = None
        while True:
            try:
                return await self.call(fn, *args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self._stopping.is_set():
                    if stop_deadline is None:
                        stop_deadline = time.monotonic() + (while_stopping or 0.0)
                    if while_stopping is None or time.monotonic() >= stop_deadline:
                        raise
                failures += 1
                delay = backoff.delay(min(failures, 8))
                _log.warning(
                    "Worker %s: %s failed (%s); retrying in %.1fs",
                    self._id,
                    what,
                    str(exc).splitlines()[0],
                    delay,
                )
                await asyncio.sleep(delay)

    async def publish(self, ready: list[Delivery]) -> None:
        """Publish ready steps; on a broker failure the sweep publishes them later."""
        try:
            await self.call(self.broker.publish, ready)
        except BrokerError as exc:
            _log.warning(
                "Worker %s: %s; the %d step(s) stay ready in the store and are "
                "published again by the sweep",
                self._id,
                exc,
                len(ready),
            )

    async def close_behind(self) -> None:
        """Close the broker and the store after the call still in flight (a connect, bounded
        by the broker's timeout), not under it; returns once they are closed."""
        assert self._thread is not None
        self._thread.submit(self._close)
        await asyncio.to_thread(self._thread.shutdown, wait=True)

    def close(self) -> None:
        """Wait for the call in flight, then close the broker and the store."""
        assert self._thread is not None
        self._thread.shutdown(wait=True)
        self._close()

    def _close(self) -> None:
        self.broker.close()
        if self._own_store:
            self.store.close()
