"""Steps delivered by RabbitMQ: one quorum queue, publisher confirms, manual acknowledgements.

A message only names ready steps of one execution (JSON ``{"e": execution id, "k": [step
keys]}``, at most 16 keys: a fan-out of 5,000 steps is 313 messages, not 5,000, which is what
a Python client and RabbitMQ spend their time on) and goes through the default exchange to the
durable quorum queue ``{namespace}:jobs:steps`` (replicated and on disk where RabbitMQ runs a
cluster; a restart keeps it). Guarantees:

* :meth:`AmqpDelivery.publish` returns once RabbitMQ confirmed every message (``mandatory``:
  a message the queue did not take, say because it was deleted, is published again after the
  queue is declared again, or raises);
* a worker consumes with a prefetch that follows its claim window in steps (``basic.qos``:
  the messages that hold ``window`` steps at the size of the recent messages, so a window of
  16 holds 16 one-step messages or one of 16 steps), and holds about its window in steps
  unsettled, also when it consumes again (see :mod:`.amqp_consuming`); it
  takes the steps of a message one by one; a message is acknowledged once every step in it
  is settled (its claim committed), and given back with ``basic.nack`` (requeue) when none of
  its steps was taken;
  steps handed back from a message whose other steps were taken are published again first
  (confirmed), then the message is acknowledged; if that fails the whole message is given
  back, so no step is lost by a hand-back. A worker that dies or loses its connection gets
  nothing more, and RabbitMQ delivers what it held to the other workers by itself (no
  take-over needed);
* a worker that stays full pauses: it cancels its consumer and gives back what RabbitMQ sent
  ahead, so the messages wait for an idle worker instead of behind a busy one (and are never
  held unacknowledged long enough to hit RabbitMQ's ``consumer_timeout``); its next
  :meth:`~AmqpDelivery.take` consumes again;
* a malformed message is rejected without requeue (dead-lettered if the queue has a policy
  for it), with an error naming it.

aio-pika runs on an event loop of its own in a daemon thread: the methods block the calling
thread only, and a worker whose loop is busy with steps still answers RabbitMQ's heartbeats.
There are two connections: one consumes and settles, one publishes. RabbitMQ's resource alarms
(a full disk, memory past its watermark) block the connections that publish, so while one lasts
publications fail after the timeout but what a worker took stays its own to settle and the
queue is drained. A channel-level error (RabbitMQ closing one channel: ``PRECONDITION_FAILED``,
``NOT_FOUND``, an acknowledgement of a delivery tag it does not know) costs only that channel:
the call fails naming the reply, what the channel held goes back to the queue (said once at
warning level, naming the queue and the reply), and the next call opens a new channel on the
same connection. On any other failure the connection concerned is closed (RabbitMQ then
requeues what the consuming one held) and the next call connects again; each call is bounded
by ``timeout``. A connection is replaced only once its ``close()`` was awaited here, also one
that RabbitMQ closed or whose closing the timeout cut short, so none is left to aio-pika's
finaliser.

The two connections are modules of their own: :mod:`.amqp_publishing` (the queue declared,
messages published and confirmed) and :mod:`.amqp_consuming` (the consumer, what it sent
ahead, settling); what they share, opening and closing a connection and a message's format,
is :mod:`.amqp_wire`. This module is the client the callers see: it runs them on its loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from framepipe.amqp import is_amqp_url
from framepipe.errors import BrokerError, MissingDependencyError

try:
    from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError
    from aiormq.exceptions import AMQPChannelError
except ModuleNotFoundError as exc:
    raise MissingDependencyError(
        "aio-pika", "amqp", "distributed jobs on an amqp:// broker"
    ) from exc
from framepipe.jobs.delivery.amqp_consuming import Consuming
from framepipe.jobs.delivery.amqp_publishing import Publishing
from framepipe.jobs.delivery.amqp_wire import channel_closed_by_server
from framepipe.jobs.delivery.contract import Backlog, Received, StepDelivery
from framepipe.jobs.rounds import Delivery
from framepipe.logs import get_logger
from framepipe.redis import safe_url

__all__ = ["AmqpDelivery"]

T = TypeVar("T")
_SHUTDOWN_GRACE = 1.0
"""Seconds the client's tasks left after the connections closed are given to end."""
_log = get_logger("jobs.delivery")


def _run(loop: asyncio.AbstractEventLoop) -> None:
    """The loop's thread: runs it until stopped, then closes it."""
    try:
        loop.run_forever()
    finally:
        loop.close()


class AmqpDelivery(StepDelivery):
    """The quorum queue ``{namespace}:jobs:steps`` on the RabbitMQ at ``url``."""

    def __init__(self, url: str, namespace: str = "framepipe", *, timeout: float = 10.0) -> None:
        if not is_amqp_url(url):
            raise BrokerError(f"{safe_url(url)!r} is not an AMQP URL", url=safe_url(url))
        self.url = url
        self.safe_url = safe_url(url)
        self.queue = f"{namespace.rstrip(':')}:jobs:steps"
        self.target = f"quorum queue {self.queue}"
        self._timeout = timeout
        self._start = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._publishing = Publishing(
            url, self.queue, self.target, timeout=timeout, on_unroutable=self._on_unroutable
        )
        self._consuming = Consuming(url, self.queue, timeout=timeout, publishing=self._publishing)

    # -- the calling threads -------------------------------------------------------------------

    def prepare(self) -> None:
        """Connect and declare the quorum queue (durable; an existing queue of that name must
        be a quorum queue too, or RabbitMQ refuses and this raises)."""
        self._call(self._prepare, "declaring the queue", publishing=True)

    def publish(self, deliveries: Sequence[Delivery]) -> None:
        """Publish persistent messages of up to 16 steps of one execution each; returns once
        RabbitMQ confirmed them all."""
        if deliveries:
            self._call(
                lambda: self._publishing.publish(deliveries),
                f"publishing {len(deliveries)} step(s)",
                publishing=True,
            )

    def take(self, consumer: str, count: int, *, wait: float, window: int) -> list[Received]:
        """At most ``count`` steps of the messages RabbitMQ pushed to this consumer; consumes
        (again) when not consuming or when the window changed (the prefetch follows it). After
        ``CHECK_AFTER`` seconds without a message while its prefetch has room it checks that
        the consumer is attached."""
        if count <= 0:
            return []
        if not self._consuming.subscribed(window):
            self._call(lambda: self._consuming.consume(consumer, max(1, window)), "consuming")
        taken, silent = self._consuming.wait_taken(count, wait)
        if silent:
            self._call(self._consuming.check, "checking the consumer")
        return taken

    def ack(self, received: Sequence[Received]) -> None:
        """Settle the steps; a message is acknowledged (``basic.ack``: written, not answered)
        once all its steps are settled."""
        if received:
            self._call(lambda: self._consuming.settle(received, requeue=None), "acknowledging")

    def hand_back(self, received: Sequence[Received]) -> None:
        """Give the steps back for any consumer: their message with ``basic.nack`` (requeue)
        when none of its steps was kept, else published again (see the module doc)."""
        if received:
            self._call(lambda: self._consuming.settle(received, requeue=True), "handing back")

    def pause(self) -> None:
        """Cancel the consumer and give back what was sent ahead (see the module doc)."""
        if self._consuming.holds_nothing():
            return
        self._call(self._consuming.pause, "pausing the consumer")

    def backlog(self) -> Backlog:
        """Messages ready in the queue (AMQP does not tell the unacknowledged ones)."""
        return self._call(self._backlog, "reading the backlog")

    def close(self) -> None:
        """Close both connections (RabbitMQ requeues what the consuming one held) and stop the
        loop's thread. Bounded: the two connections close side by side, each waiting
        ``timeout`` at most for RabbitMQ's answer (a broker gone or frozen never answers),
        then the client's tasks left are cancelled and given a second to end. What did not
        close in time is said at warning level: a connection RabbitMQ did not answer (it
        requeues what that one held once it notices the connection gone) and tasks still
        ending, which the thread (a daemon) finishes before it stops."""
        with self._start:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            left = future.result(self._timeout + _SHUTDOWN_GRACE + 5.0)
        except Exception as exc:  # the shutdown that stops the loop was cut off or failed
            future.cancel()
            left = [
                f"its event loop, which did not answer within {self._timeout:g}s"
                if isinstance(exc, FutureTimeout)
                else f"what closing failed on ({exc!r})"
            ]
            with contextlib.suppress(RuntimeError):  # closed already
                loop.call_soon_threadsafe(loop.stop)
        thread.join(_SHUTDOWN_GRACE)
        if left:
            _log.warning(
                "job broker %s: closed, leaving %s",
                self.safe_url,
                "; ".join(left),
            )

    def _call(
        self, make: Callable[[], Coroutine[Any, Any, T]], what: str, *, publishing: bool = False
    ) -> T:
        loop = self._running_loop()
        future = asyncio.run_coroutine_threadsafe(self._guarded(make, what, publishing), loop)
        try:
            return future.result(self._timeout + 5.0)
        except FutureTimeout:
            future.cancel()
            raise BrokerError(
                f"job broker {self.safe_url}: {what} did not finish within {self._timeout:g}s",
                url=self.safe_url,
            ) from None
        except FutureCancelled:
            raise BrokerError(
                f"job broker {self.safe_url}: {what} was cut off (the connection closed)",
                url=self.safe_url,
            ) from None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._start:
            if self._closed:
                raise BrokerError(f"job broker {self.safe_url}: closed", url=self.safe_url)
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=_run, args=(self._loop,), daemon=True, name="framepipe-amqp"
                )
                self._thread.start()
            return self._loop

    # -- the loop's thread ---------------------------------------------------------------------

    async def _guarded(
        self, make: Callable[[], Coroutine[Any, Any, T]], what: str, publishing: bool
    ) -> T:
        """``make()`` within the timeout; a connection that fails or does not answer is
        closed (for a publication, only the publishing one: what was taken stays settleable)
        and the error raised as a :class:`BrokerError` saying ``what`` failed."""
        try:
            async with asyncio.timeout(self._timeout):
                return await make()
        except BrokerError:
            raise
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # this call itself was cancelled
            # Another call closed the connection under this one (aiormq cancels its RPCs).
            raise BrokerError(
                f"job broker {self.safe_url}: {what} was cut off (the connection closed)",
                url=self.safe_url,
            ) from exc
        except AMQPChannelError as exc:
            # RabbitMQ closed a channel (or one it closed was used): the connection and what
            # its other channels hold stay; the channel is opened again by the next call.
            reply = channel_closed_by_server(exc)
            raise BrokerError(
                f"job broker {self.safe_url}: {what} failed: "
                + (
                    f"RabbitMQ closed the channel ({reply}) on {self.target}"
                    if reply
                    else f"the channel was closed ({exc})"
                )
                + "; the connection stays",
                url=self.safe_url,
            ) from exc
        except ChannelInvalidStateError as exc:
            raise BrokerError(
                f"job broker {self.safe_url}: {what} failed: the channel was closed ({exc}); "
                "the connection stays",
                url=self.safe_url,
            ) from exc
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            await (self._publishing.drop() if publishing else self._consuming.drop())
            text = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                text = f"no answer within {self._timeout:g}s"
            raise BrokerError(
                f"job broker {self.safe_url}: {what} failed: {text}", url=self.safe_url
            ) from exc

    async def _shutdown(self) -> list[str]:
        """Close both connections side by side, then cancel the client's tasks left; the loop
        stops once they ended. Returns what did not close or end in time."""
        consuming, publishing = await asyncio.gather(
            self._consuming.drop_own(), self._publishing.drop()
        )
        left = [
            f"the {name} connection, which did not answer its close within {self._timeout:g}s"
            for name, answered in (("consuming", consuming), ("publishing", publishing))
            if not answered
        ]
        loop = asyncio.get_running_loop()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        pending: set[asyncio.Task[Any]] = set()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_SHUTDOWN_GRACE)
        if pending:
            left.append(f"{len(pending)} task(s) of the AMQP client still ending")
            stopping = loop.create_task(asyncio.wait(pending))
            stopping.add_done_callback(lambda _: loop.stop())
        else:
            loop.call_soon(loop.stop)
        return left

    async def _prepare(self) -> None:
        await self._publishing.channel()

    async def _backlog(self) -> Backlog:
        ready, _consumers = await self._consuming.count()
        return Backlog(ready or 0)

    def _on_unroutable(self) -> None:
        self._consuming.queue_gone()
