"""Steps delivered by RabbitMQ: one quorum queue, publisher confirms, manual acknowledgements.

A message only names ready steps of one execution (JSON ``{"e": execution id, "k": [step
keys]}``, at most 16 keys: a fan-out of 5,000 steps is 313 messages, not 5,000, which is what
a Python client and RabbitMQ spend their time on) and goes through the default exchange to the
durable quorum queue ``{namespace}:jobs:steps`` (replicated and on disk where RabbitMQ runs a
cluster; a restart keeps it). Guarantees:

* :meth:`AmqpDelivery.publish` returns once RabbitMQ confirmed every message (``mandatory``:
  a message the queue did not take, say because it was deleted, is published again after the
  queue is declared again, or raises);
* a worker consumes with a prefetch matching its claim window (``basic.qos``: the messages
  that hold ``window`` steps, and one more so the next is on its way) and takes the steps of
  a message one by one; a message is acknowledged once every step in it is settled (its claim
  committed), and given back with ``basic.nack`` (requeue) when none of its steps was taken;
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
queue is drained. On any failure the connection concerned is closed (RabbitMQ then requeues
what the consuming one held) and the next call connects again; each call is bounded by
``timeout``. A connection is replaced only once its ``close()`` was awaited here, also one
that RabbitMQ closed or whose closing the timeout cut short, so none is left to aio-pika's
finaliser.

At some 600 lines the module is one concept, one client of RabbitMQ: the calling threads'
methods and the loop's share its connections, channels, consumer and unsettled messages, and
the helpers at the end (a message's format, settling one) serve that client only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import CancelledError as FutureCancelled
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any, TypeVar

from framepipe.amqp import is_amqp_url
from framepipe.errors import BrokerError, MissingDependencyError

try:
    import aio_pika
    import aiormq
    from aio_pika.abc import AbstractChannel, AbstractConnection
    from aio_pika.connection import make_url
    from aio_pika.exceptions import (
        CONNECTION_EXCEPTIONS,
        ChannelInvalidStateError,
        ChannelNotFoundEntity,
        PublishError,
    )
    from aiormq.abc import DeliveredMessage
    from pamqp.common import FieldTable
except ModuleNotFoundError as exc:
    raise MissingDependencyError(
        "aio-pika", "amqp", "distributed jobs on an amqp:// broker"
    ) from exc
from framepipe.jobs.delivery import Backlog, Received, StepDelivery
from framepipe.jobs.rounds import Delivery
from framepipe.logs import get_logger
from framepipe.redis import safe_url

__all__ = ["AmqpDelivery"]

T = TypeVar("T")
_log = get_logger("jobs.delivery")
# aiormq logs every failure it meets, with a traceback, and then raises it; here it becomes one
# BrokerError that the caller reports (the worker: one line, and it retries). So only its
# critical records are kept.
logging.getLogger("aiormq").setLevel(logging.CRITICAL)
_BATCH = 16  # steps per message at most
_CHECK_AFTER = 5.0  # seconds without a message before take() checks the consumer
_QUORUM: FieldTable = {"x-queue-type": "quorum"}
_PERSISTENT = aiormq.spec.Basic.Properties(content_type="application/json", delivery_mode=2)


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
        # Shared with the calling threads, under _cond: what RabbitMQ sent ahead of take().
        self._cond = threading.Condition()
        self._buffer: deque[Received] = deque()
        self._consuming = False
        self._window = 0
        self._heard = 0.0  # when a message last came, or the consumer was (re)checked
        self._start = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # Only touched on the loop's thread: the connection that consumes (and settles) and
        # the one that publishes.
        self._conn: AbstractConnection | None = None
        self._pconn: AbstractConnection | None = None
        self._pub: AbstractChannel | None = None
        self._sub: AbstractChannel | None = None
        self._tag: str | None = None
        self._declared = False
        self._tags = 0
        # Connections RabbitMQ closed (a broker gone, a forced close), to close here too.
        self._stale: list[AbstractConnection] = []

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
                lambda: self._publish(deliveries),
                f"publishing {len(deliveries)} step(s)",
                publishing=True,
            )

    def take(self, consumer: str, count: int, *, wait: float, window: int) -> list[Received]:
        """At most ``count`` steps of the messages RabbitMQ pushed to this consumer; consumes
        (again) when not consuming or when the window changed (the prefetch follows it). After
        ``_CHECK_AFTER`` seconds without a message it checks that the consumer is attached."""
        if count <= 0:
            return []
        with self._cond:
            subscribed = self._consuming and self._window == window
        if not subscribed:
            self._call(lambda: self._consume(consumer, max(1, window)), "consuming")
        with self._cond:
            if not self._buffer:
                self._cond.wait(wait)
            if self._buffer:
                return [self._buffer.popleft() for _ in range(min(count, len(self._buffer)))]
            silent = self._consuming and time.monotonic() - self._heard >= _CHECK_AFTER
        if silent:
            self._call(self._check_consumer, "checking the consumer")
        return []

    def ack(self, received: Sequence[Received]) -> None:
        """Settle the steps; a message is acknowledged (``basic.ack``: written, not answered)
        once all its steps are settled."""
        if received:
            self._call(lambda: self._settle(received, requeue=None), "acknowledging")

    def hand_back(self, received: Sequence[Received]) -> None:
        """Give the steps back for any consumer: their message with ``basic.nack`` (requeue)
        when none of its steps was kept, else published again (see :meth:`_settle`)."""
        if received:
            self._call(lambda: self._settle(received, requeue=True), "handing back")

    def pause(self) -> None:
        """Cancel the consumer and give back what was sent ahead (see the module doc)."""
        with self._cond:
            if not self._consuming and not self._buffer:
                return
        self._call(self._pause, "pausing the consumer")

    def backlog(self) -> Backlog:
        """Messages ready in the queue (AMQP does not tell the unacknowledged ones)."""
        return self._call(self._backlog, "reading the backlog")

    def close(self) -> None:
        """Close the connection (RabbitMQ requeues what it held) and stop the thread."""
        with self._start:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._drop(), loop).result(self._timeout)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self._timeout)
        if not thread.is_alive():
            loop.close()

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
                    target=self._loop.run_forever, daemon=True, name="framepipe-amqp"
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
        except (*CONNECTION_EXCEPTIONS, TimeoutError) as exc:
            await (self._drop_publisher() if publishing else self._drop())
            text = str(exc) or type(exc).__name__
            if isinstance(exc, TimeoutError):
                text = f"no answer within {self._timeout:g}s"
            raise BrokerError(
                f"job broker {self.safe_url}: {what} failed: {text}", url=self.safe_url
            ) from exc

    async def _connection(self) -> AbstractConnection:
        """The connection that consumes and settles. It never publishes, so RabbitMQ's
        resource alarms (a full disk, memory past its watermark), which block the connections
        that publish, leave the steps it took settleable and the queue drained."""
        if self._conn is None or self._conn.is_closed:
            await self._drop()
            self._conn = await self._open("framepipe")
        return self._conn

    async def _publish_connection(self) -> AbstractConnection:
        if self._pconn is None or self._pconn.is_closed:
            await self._drop_publisher()
            self._pconn = await self._open("framepipe-publish")
        return self._pconn

    async def _open(self, name: str) -> AbstractConnection:
        conn = aio_pika.Connection(make_url(self.url), client_properties={"connection_name": name})
        try:
            await conn.connect(timeout=self._timeout)
        except BaseException as exc:
            await conn.close()  # or aio-pika closes it from its finaliser, in any thread
            if _refused_open(exc):
                raise BrokerError(
                    f"job broker {self.safe_url}: RabbitMQ refused to open the connection: "
                    f"the virtual host {_vhost(self.url)!r} does not exist, or user "
                    f"{make_url(self.url).user or 'guest'!r} may not use it",
                    url=self.safe_url,
                ) from exc
            raise
        conn.close_callbacks.add(self._on_close)
        return conn

    async def _publisher(self) -> aiormq.Channel:
        conn = await self._publish_connection()
        if self._pub is None or self._pub.is_closed:
            self._pub = await conn.channel(publisher_confirms=True, on_return_raises=True)
            self._declared = False
        if not self._declared:
            await self._pub.declare_queue(self.queue, durable=True, arguments=_QUORUM)
            self._declared = True
        channel = await self._pub.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)  # has basic_publish(wait=...)
        return channel

    async def _prepare(self) -> None:
        await self._publisher()

    async def _publish(self, deliveries: Sequence[Delivery]) -> None:
        # aiormq directly, without waiting for each frame to be written (aio-pika does), so
        # the frames go out together and one round of confirms answers them.
        todo = _batches(deliveries)
        for attempt in (1, 2):
            channel = await self._publisher()
            results = await asyncio.gather(
                *(
                    channel.basic_publish(
                        json.dumps({"e": e, "k": keys}).encode(),
                        routing_key=self.queue,
                        properties=_PERSISTENT,
                        mandatory=True,
                        wait=False,
                    )
                    for e, keys in todo
                ),
                return_exceptions=True,
            )
            returned = [
                b for b, r in zip(todo, results, strict=True) if isinstance(r, PublishError)
            ]
            failed = next(
                (
                    r
                    for r in results
                    if isinstance(r, BaseException) and not isinstance(r, PublishError)
                ),
                None,
            )
            if failed is not None:
                raise failed
            if not returned:
                return
            # Unroutable: the queue is gone (deleted, or a broker that lost its data). Declared
            # again below; a consumer of the old one may not be told: consume again too.
            self._declared = False
            if self._tag is not None:
                self._unsubscribed()
            todo = returned
            if attempt == 2:
                raise BrokerError(
                    f"job broker {self.safe_url}: {len(returned)} message(s) "
                    f"were returned unroutable by {self.target}",
                    url=self.safe_url,
                )

    async def _consume(self, consumer: str, window: int) -> None:
        conn = await self._connection()
        if self._sub is None or self._sub.is_closed:
            self._sub = await conn.channel(publisher_confirms=False)
            self._tag = None
            raw = await self._sub.get_underlay_channel()
            raw.on_consumer_cancel_callbacks.add(self._on_cancelled)
        raw = await self._sub.get_underlay_channel()
        if self._tag is not None:
            await raw.basic_cancel(self._tag)  # what it sent stays valid to settle
            self._tag = None
        await self._sub.set_qos(prefetch_count=-(-window // _BATCH) + 1)
        await self._sub.declare_queue(self.queue, durable=True, arguments=_QUORUM)
        self._tags += 1
        tag = f"{consumer}/{self._tags}"
        self._tag = tag
        await raw.basic_consume(self.queue, self._on_message, consumer_tag=tag)
        with self._cond:
            self._consuming, self._window = True, window
            self._heard = time.monotonic()

    async def _on_message(self, message: DeliveredMessage) -> None:
        if message.consumer_tag != self._tag:  # sent before a cancel took effect
            await _settle_message(message, requeue=True)
            return
        found = _parse(message.body)
        if not found:
            _log.error(
                "job broker %s: a message of %s is malformed (%r; expected JSON with "
                "'e' and 'k'); rejected",
                self.safe_url,
                self.queue,
                message.body[:200],
            )
            with contextlib.suppress(ChannelInvalidStateError):
                await message.channel.basic_reject(_tag_of(message), requeue=False)
            return
        batch = _Message(message, len(found))
        with self._cond:
            self._buffer.extend(Received(d, batch) for d in found)
            self._heard = time.monotonic()
            self._cond.notify()

    def _on_cancelled(self, _frame: Any) -> None:
        """RabbitMQ cancelled the consumer (the queue was deleted): consume again next time."""
        _log.warning(
            "job broker %s: RabbitMQ cancelled the consumer of %s (queue deleted?); "
            "declaring it again",
            self.safe_url,
            self.queue,
        )
        self._unsubscribed()

    def _unsubscribed(self) -> None:
        self._tag = None
        self._declared = False
        with self._cond:
            self._consuming = False
            self._cond.notify_all()

    async def _check_consumer(self) -> None:
        """Nothing came for a while: make sure the consumer is still attached. A queue that
        was deleted and at once declared again (by a publisher) may leave it on the old queue
        without RabbitMQ cancelling it; then the queue counts no consumer, or messages wait
        that nobody is sent, and this one subscribes again."""
        with self._cond:
            self._heard = time.monotonic()
        if self._tag is None:
            return
        ready, consumers = await self._count()
        if ready is None or consumers == 0 or ready > 0:
            _log.warning(
                "job broker %s: the consumer of %s receives nothing while %s; consuming again",
                self.safe_url,
                self.queue,
                "the queue is gone"
                if ready is None
                else f"{ready} message(s) wait and {consumers} consumer(s) listen",
            )
            if self._sub is not None and not self._sub.is_closed:
                raw = await self._sub.get_underlay_channel()
                with contextlib.suppress(*CONNECTION_EXCEPTIONS):
                    await raw.basic_cancel(self._tag)
            self._unsubscribed()

    async def _settle(self, received: Sequence[Received], *, requeue: bool | None) -> None:
        """Settle taken steps: acknowledged (``requeue`` None) or handed back. A message is
        acknowledged once all its steps are settled; handed back whole (nack) when all of them
        are handed back; steps handed back from a message that is not are published again
        first, and if that fails their whole message is handed back."""
        groups: dict[_Message, list[Delivery]] = {}
        for r in received:
            assert isinstance(r.receipt, _Message)
            groups.setdefault(r.receipt, []).append(r.delivery)
        again: list[_Message] = []  # with steps to publish again
        republish: list[Delivery] = []
        ended: dict[_Message, bool] = {}  # message -> handed back whole
        for batch, found in groups.items():
            batch.unsettled -= len(found)
            if requeue:
                batch.handed_back += len(found)
                if batch.handed_back == batch.size:
                    ended[batch] = True
                    continue
                republish += found
                again.append(batch)
            if batch.unsettled == 0:
                ended[batch] = False
        try:
            if republish:
                await self._publish(republish)
        except BaseException:
            ended.update(dict.fromkeys(again, True))
            raise
        finally:
            for batch, whole in ended.items():
                if not batch.done:
                    batch.done = True
                    await _settle_message(batch.message, requeue=True if whole else None)

    async def _pause(self) -> None:
        if self._tag is not None and self._sub is not None and not self._sub.is_closed:
            raw = await self._sub.get_underlay_channel()
            await raw.basic_cancel(self._tag)
        self._tag = None
        with self._cond:
            self._consuming = False
            held = list(self._buffer)
            self._buffer.clear()
        await self._settle(held, requeue=True)

    async def _backlog(self) -> Backlog:
        ready, _consumers = await self._count()
        return Backlog(ready or 0)

    async def _count(self) -> tuple[int | None, int]:
        """(ready messages, consumers) of the queue; (None, 0) when it does not exist."""
        conn = await self._connection()
        channel = await conn.channel(publisher_confirms=False)  # a 404 closes it
        try:
            queue = await channel.declare_queue(self.queue, passive=True)
        except ChannelNotFoundEntity:
            return None, 0
        finally:
            if not channel.is_closed:
                await channel.close()
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    def _on_close(self, sender: AbstractConnection | None, *_args: Any) -> None:
        """A connection closed under the delivery (RabbitMQ closed it, or went away; one
        closed here was forgotten first): forgotten at once, and kept to be closed here by
        the next drop (:meth:`_close_stale`)."""
        if sender is None:
            return
        if sender is self._conn:
            self._stale.append(sender)
            self._reset()
        elif sender is self._pconn:
            self._stale.append(sender)
            self._reset_publisher()

    def _reset_publisher(self) -> None:
        self._pconn = self._pub = None
        self._declared = False

    def _reset(self) -> None:
        self._conn = self._sub = None
        self._tag = None
        with self._cond:  # RabbitMQ requeues what the connection held
            self._consuming = False
            self._buffer.clear()
            self._cond.notify_all()

    async def _drop(self) -> None:
        """Close both connections (RabbitMQ requeues what the consuming one held)."""
        conn = self._conn
        self._reset()
        await self._drop_publisher()
        await self._close(conn)

    async def _drop_publisher(self) -> None:
        conn = self._pconn
        self._reset_publisher()
        await self._close(conn)
        await self._close_stale()

    async def _close_stale(self) -> None:
        """Close the connections RabbitMQ closed (:meth:`_on_close`), so each is replaced
        only once its ``close()`` was awaited: one left to aio-pika's finaliser is closed from
        whichever thread collects it, where no event loop runs ("RuntimeWarning: coroutine
        'Connection.close' was never awaited", once per outage)."""
        while self._stale:
            await self._close(self._stale.pop())

    async def _close(self, conn: AbstractConnection | None) -> None:
        """Close ``conn``, waiting a timeout at most (a blocked or frozen one never answers).
        A close cut short is finished at once (aio-pika let go of the transport when it began,
        so nothing more is sent): one left unfinished is closed by aio-pika's finaliser, from
        a thread with no event loop."""
        for _ in range(2):
            if conn is None or conn.is_closed:
                return
            with contextlib.suppress(*CONNECTION_EXCEPTIONS, TimeoutError):
                async with asyncio.timeout(self._timeout):
                    await conn.close()


def _refused_open(exc: BaseException) -> bool:
    """RabbitMQ answered the opening of a connection (after the login) by closing it: aiormq
    then raises an error that only shows the frame's repr, not its reason."""
    return isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc)


def _vhost(url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when its path is empty)."""
    path = make_url(url).path
    return path[1:] if len(path) > 1 else "/"


def _tag_of(message: DeliveredMessage) -> int:
    tag = message.delivery_tag
    assert tag is not None  # a delivery to a consumer always has one
    return tag


@dataclass(eq=False)
class _Message:
    """A message whose steps were taken apart: settled when every one of them is."""

    message: DeliveredMessage
    size: int
    unsettled: int = field(init=False)
    handed_back: int = 0
    done: bool = False  # acknowledged or handed back whole: its other steps settle nothing

    def __post_init__(self) -> None:
        self.unsettled = self.size


def _batches(deliveries: Sequence[Delivery]) -> list[tuple[str, list[str]]]:
    """(execution id, up to _BATCH keys) per message, in the order given."""
    by_execution: dict[str, list[str]] = {}
    for d in deliveries:
        by_execution.setdefault(d.execution_id, []).append(d.key)
    return [
        (e, keys[i : i + _BATCH])
        for e, keys in by_execution.items()
        for i in range(0, len(keys), _BATCH)
    ]


async def _settle_message(message: DeliveredMessage, *, requeue: bool | None) -> None:
    """Ack (``requeue`` None) or nack one message; a message whose channel is gone was
    requeued by RabbitMQ already. The frame is queued for writing, not waited for."""
    with contextlib.suppress(ChannelInvalidStateError):
        if requeue is None:
            await message.channel.basic_ack(_tag_of(message), wait=False)
        else:
            await message.channel.basic_nack(_tag_of(message), requeue=requeue, wait=False)


def _parse(body: bytes) -> list[Delivery]:
    """The steps a message names: ``{"e": "...", "k": ["...", ...]}`` (or ``"k": "..."``);
    empty when it is not that."""
    try:
        fields = json.loads(body)
    except ValueError:
        return []
    if not isinstance(fields, dict):
        return []
    e, keys = fields.get("e"), fields.get("k")
    if isinstance(keys, str):
        keys = [keys]
    if not (
        isinstance(e, str)
        and e
        and isinstance(keys, list)
        and keys
        and all(isinstance(k, str) and k for k in keys)
    ):
        return []
    return [Delivery(e, k) for k in keys]
