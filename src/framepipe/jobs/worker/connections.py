"""A worker's connections (:class:`Connections`): its state store and its broker, and the
threads its event loop runs their blocking calls on, so the loop never waits on a socket: one
for the store (``framepipe-db``), so its calls reach the store one at a time, and one for
publishing to the broker (``framepipe-publish``), so a broker that does not answer (frozen, cut
off by the network: each call waits for its timeout) never holds up the lease renewals and
commits queued behind it on the store's thread.

A lost connection (:func:`is_transient`) is retried with backoff until it works
(:meth:`Connections.retrying`); once the worker is stopping, only for a bounded time, then the
error is raised: nothing is acknowledged before it is committed, and what was not committed is
redone elsewhere when its leases lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from framepipe.outage import Outage

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
        self._publish_thread: ThreadPoolExecutor | None = None
        self._unpublished: dict[Delivery, None] = {}  # in order, each once
        self._publisher: asyncio.Task[None] | None = None
        self._publish_outage = Outage()

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the threads the calls from ``loop`` run on."""
        self._loop = loop
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="framepipe-db")
        self._publish_thread = ThreadPoolExecutor(1, thread_name_prefix="framepipe-publish")

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the connections' thread."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._thread, fn, *args)

    async def retrying(
        self, fn: Callable[..., T], *args: Any, what: str, while_stopping: float | None = 30.0
    ) -> T:
        """Retry on a lost database or broker connection, with backoff, until it works.

        The first failure is said once (a warning naming ``what`` and the error), and the
        end of the outage once (how long it lasted, how many tries failed), not every retry.
        Once the worker is stopping, retries go on for ``while_stopping`` seconds more (None:
        not at all), then the error is raised: what was not committed is redone elsewhere
        when the leases lapse."""
        backoff = Backoff(initial=0.2, maximum=5.0)
        failures = 0
        since = time.monotonic()
        stop_deadline: float | None = None
        while True:
            try:
                result = await self.call(fn, *args)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if self._stopping.is_set():
                    if stop_deadline is None:
                        stop_deadline = time.monotonic() + (while_stopping or 0.0)
                    if while_stopping is None or time.monotonic() >= stop_deadline:
                        raise
                failures += 1
                if failures == 1:
                    since = time.monotonic()
                    _log.warning(
                        "Worker %s: %s failed (%s); retrying every %g s at most, said again "
                        "when it works",
                        self._id,
                        what,
                        str(exc).splitlines()[0],
                        backoff.maximum,
                    )
                await asyncio.sleep(backoff.delay(min(failures, 8)))
                continue
            if failures:
                _log.info(
                    "Worker %s: %s works again after %.0f s (%d tr%s failed)",
                    self._id,
                    what,
                    time.monotonic() - since,
                    failures,
                    "y" if failures == 1 else "ies",
                )
            return result

    def publish(self, ready: list[Delivery]) -> None:
        """Publish ready steps on the publishing thread; returns at once (call it on the loop).

        Steps queued while a publication is under way go together in the next one. A broker
        that fails is said once when it starts failing and once when it works again; the
        steps of a failed publication stay ready in the store and the sweep publishes them
        again."""
        if not ready:
            return
        self._unpublished.update(dict.fromkeys(ready))
        if self._publisher is None or self._publisher.done():
            assert self._loop is not None
            self._publisher = self._loop.create_task(
                self._publish_queued(), name="framepipe-publish"
            )

    async def published(self) -> None:
        """Return once what :meth:`publish` queued was published (or failed to be)."""
        while self._publisher is not None and not self._publisher.done():
            await asyncio.wait([self._publisher])

    async def _publish_queued(self) -> None:
        assert self._loop is not None
        while self._unpublished:
            batch = list(self._unpublished)
            self._unpublished.clear()
            try:
                await self._loop.run_in_executor(self._publish_thread, self.broker.publish, batch)
            except Exception as exc:
                first = self._publish_outage.failed(exc)
                if not isinstance(exc, BrokerError):
                    _log.exception(
                        "Worker %s: publishing %d ready step(s) failed; they stay ready in the "
                        "store and are published again by the sweep",
                        self._id,
                        len(batch),
                    )
                elif first:
                    _log.warning(
                        "Worker %s: %s; the %d step(s) stay ready in the store and are "
                        "published again by the sweep (said once until it works again)",
                        self._id,
                        exc,
                        len(batch),
                    )
                continue
            lasted = self._publish_outage.answered()
            if lasted is not None:
                _log.info(
                    "Worker %s: publishing to %s works again after %.0f s",
                    self._id,
                    self.broker.safe_url,
                    lasted,
                )

    async def close_behind(self) -> None:
        """Close the broker and the store after the call still in flight (a connect, bounded
        by the broker's timeout), not under it; returns once they are closed."""
        assert self._thread is not None
        assert self._publish_thread is not None
        if self._publisher is not None:
            self._publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._publisher
        self._publish_thread.shutdown(wait=False)
        self._thread.submit(self._close)
        await asyncio.to_thread(self._thread.shutdown, wait=True)

    def close(self) -> None:
        """Wait for the calls in flight, then close the broker and the store (call
        :meth:`published` first: what is still queued for publishing is dropped, and the
        sweep publishes it)."""
        assert self._thread is not None
        assert self._publish_thread is not None
        if self._publisher is not None:
            self._publisher.cancel()
        self._thread.shutdown(wait=True)
        self._publish_thread.shutdown(wait=True)
        self._close()

    def _close(self) -> None:
        self.broker.close()
        if self._own_store:
            self.store.close()
