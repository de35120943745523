"""The RabbitMQ delivery's consuming connection: the consumer, what it was sent ahead of
``take()``, and settling the steps taken.

It never publishes, so RabbitMQ's resource alarms (a full disk, memory past its watermark),
which block the connections that publish, leave the steps it took settleable and the queue
drained. Steps handed back from a message whose other steps were taken are published again
through the publishing connection (:mod:`.amqp_publishing`). The loop thread runs the
coroutines; the calling threads share only what was sent ahead, under a condition.

Its prefetch follows the window in steps, as a worker pulling from Redis takes as many steps
as its window has room for: RabbitMQ counts a prefetch in messages, and a message holds 1 to
16 steps, so the prefetch is the messages that hold the window at the size of the recent
messages (:func:`prefetch_of`; the largest of the last 16, or a full message before any came):
a window of 16 holds 16 one-step messages, or one of 16 steps. It then holds about its window
in steps unsettled (sent ahead, or taken and not settled yet); larger messages than the recent
ones may bring more, once, and the next ``take()`` consumes again for them. A consumer made
again (the window or the message size changed, or the old one was lost) is given a prefetch of
the room left by the steps still held, none when there is no room; what was sent ahead and
not touched is first given back only when the steps held pass the window.
A consumer that hears nothing is checked (:meth:`Consuming.check`) only while it has room in
its prefetch: a full one hears nothing because it is full.

A quorum queue counts how often a message came back (``x-delivery-count``: on RabbitMQ 3.x and
4.0 to 4.2 every give-back counts, a ``basic.nack``, a channel or connection closed while
holding it; from 4.3 on a ``basic.nack`` no longer does) and RabbitMQ 4.x drops it, or
dead-letters it, past the queue's delivery limit (20 unless a policy says otherwise): its
steps then wait for the sweep to publish them again. The first message seen with a count of
:data:`DELIVERY_COUNT_WARN` or more is said once at warning level, naming the queue and the
policy that raises the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shlex
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractConnection
from aio_pika.exceptions import (
    CONNECTION_EXCEPTIONS,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
)
from aiormq.abc import DeliveredMessage

from framepipe.errors import BrokerError
from framepipe.jobs.delivery.amqp_publishing import Publishing
from framepipe.jobs.delivery.amqp_wire import (
    BATCH,
    QUORUM,
    Link,
    Taken,
    channel_closed_by_server,
    delivery_count,
    parse,
    server_version,
    settle_message,
    tag_of,
    vhost_of,
)
from framepipe.jobs.delivery.contract import Received
from framepipe.jobs.rounds import Delivery
from framepipe.logs import get_logger

__all__ = ["CHECK_AFTER", "DELIVERY_COUNT_WARN", "Consuming", "policy_target", "prefetch_of"]

CHECK_AFTER = 5.0
"""Seconds a consumer with room in its prefetch is sent nothing before ``take()`` checks it."""
DELIVERY_COUNT_WARN = 10
"""The ``x-delivery-count`` at which a message is said to near RabbitMQ 4's default delivery
limit (20)."""
_log = get_logger("jobs.delivery")
_REGEX_SPECIAL = re.compile(r"([.^$*+?()\[\]{}|\\])")
"""What a policy's pattern (a regular expression) needs escaped to match a queue name as is."""


def prefetch_of(window: int, size: int = BATCH) -> int:
    """The messages of ``size`` steps that hold a claim window of ``window`` steps."""
    return max(1, -(-window // max(1, size)))


def policy_command(queue: str, vhost: str, version: str | None) -> str:
    """The ``rabbitmqctl set_policy`` that raises the delivery limit of quorum queue ``queue``
    of virtual host ``vhost`` on RabbitMQ ``version``, quoted for a shell (a queue name or a
    virtual host may hold any character)."""
    vhost_args = [] if vhost == "/" else ["-p", vhost]
    pattern = "^" + _REGEX_SPECIAL.sub(r"\\\1", queue) + "$"
    return shlex.join(
        [
            "rabbitmqctl",
            "set_policy",
            *vhost_args,
            "framepipe-steps",
            pattern,
            '{"delivery-limit": 1000}',
            "--apply-to",
            policy_target(version),
        ]
    )


def policy_target(version: str | None) -> str:
    """The ``--apply-to`` of a policy for the quorum queue on RabbitMQ ``version``:
    ``quorum_queues``, or ``queues`` before 3.12, which knows no other queue-type target."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    if found and (int(found[1]), int(found[2])) < (3, 12):
        return "queues"
    return "quorum_queues"


class Consuming:
    """The connection that consumes from the quorum queue ``queue`` and settles what it
    took; ``publishing`` publishes again the steps handed back from a message that is not."""

    def __init__(self, url: str, queue: str, *, timeout: float, publishing: Publishing) -> None:
        self.queue = queue
        self.link = Link(url, "framepipe", timeout=timeout, on_closed=self._forget)
        self._publishing = publishing
        # Shared with the calling threads, under _cond: what RabbitMQ sent ahead of take().
        self._cond = threading.Condition()
        self._buffer: deque[Received] = deque()
        self._consuming = False
        self._window = 0
        self._prefetch = 0  # the current consumer's
        self._sizes: deque[int] = deque(maxlen=BATCH)  # steps in the recent messages
        self._size = BATCH  # the message size the current consumer's prefetch was made for
        self._held: set[Taken] = set()  # messages delivered and not settled yet
        self._heard = 0.0  # when a message came or was settled, or the consumer was checked
        # Only touched on the loop's thread.
        self._sub: AbstractChannel | None = None
        self._raw: object = None  # _sub's aiormq channel: what its messages name
        self._tag: str | None = None
        self._tags = 0
        self._told_limit = False  # a message nearing the delivery limit was said

    # -- the calling threads -------------------------------------------------------------------

    def subscribed(self, window: int) -> bool:
        """Whether it consumes with the prefetch of ``window`` at the size of the recent
        messages: false also when its consumer was given less (the steps an earlier consumer
        sent left less room) and no message of an earlier consumer is held now (its own count
        against its prefetch: while they are held, it had all the room there was)."""
        with self._cond:
            size = self._recent_size()
            earlier = any(t.message.consumer_tag != self._tag for t in self._held)
            return (
                self._consuming
                and self._window == window
                and self._size == size
                and (self._prefetch == prefetch_of(window, size) or earlier)
            )

    def _recent_size(self) -> int:
        """Steps per message expected (under ``_cond``): the most of the recent messages."""
        return max(self._sizes, default=BATCH)

    def holds_nothing(self) -> bool:
        """Whether it neither consumes nor holds anything sent ahead."""
        with self._cond:
            return not self._consuming and not self._buffer

    def wait_taken(self, count: int, wait: float) -> tuple[list[Received], bool]:
        """At most ``count`` steps sent ahead, waiting ``wait`` seconds at most for the first;
        and, when there is none, whether the consumer has heard nothing for
        :data:`CHECK_AFTER` seconds (:meth:`check` is then due)."""
        with self._cond:
            if not self._buffer:
                self._cond.wait(wait)
            if self._buffer:
                return [self._buffer.popleft() for _ in range(min(count, len(self._buffer)))], False
            return [], self._consuming and time.monotonic() - self._heard >= CHECK_AFTER

    # -- the loop's thread ---------------------------------------------------------------------

    async def connection(self) -> AbstractConnection:
        """The consuming connection, opened when there is none. The publishing connection is
        not concerned: a publication under way goes on."""
        conn = self.link.conn
        if conn is None or conn.is_closed:
            await self.link.close(self._forget_connection())
            conn = await self.link.connect()
        return conn

    async def consume(self, consumer: str, window: int) -> None:
        """Consume (again) as ``consumer``, with a prefetch of the messages (at the size of
        the recent ones, :func:`prefetch_of`) that hold the room ``window`` leaves beside the
        steps still held (RabbitMQ counts a prefetch per consumer, so a new one would be sent
        a full prefetch more). What a consumer before it sent ahead and nobody touched is
        given back first only when the steps held pass the window. With no room left it does
        not consume: the next call does, once some are settled."""
        conn = await self.connection()
        if self._sub is None or self._sub.is_closed:
            self._sub = await conn.channel(publisher_confirms=False)
            self._tag = None
            raw = await self._sub.get_underlay_channel()
            raw.on_consumer_cancel_callbacks.add(self._on_cancelled)
            self._raw = raw
            self._sub.close_callbacks.add(self._on_channel_closed)
        raw = await self._sub.get_underlay_channel()
        if self._tag is not None:
            await raw.basic_cancel(self._tag)  # what it sent stays valid to settle
            self._tag = None
        with self._cond:
            self._consuming = False
            over = sum(t.unsettled for t in self._held) > window
        if over:
            await self._give_back_sent_ahead(untouched_only=True)
        with self._cond:
            size = self._recent_size()
            room = window - sum(t.unsettled for t in self._held)
            self._size = size
        if room < 1:
            return
        await self._declare()
        prefetch = prefetch_of(room, size)
        await self._sub.set_qos(prefetch_count=prefetch)
        self._tags += 1
        tag = f"{consumer}/{self._tags}"
        self._tag = tag
        await raw.basic_consume(self.queue, self._on_message, consumer_tag=tag)
        with self._cond:
            self._consuming, self._window, self._prefetch = True, window, prefetch
            self._heard = time.monotonic()

    async def _on_message(self, message: DeliveredMessage) -> None:
        if message.consumer_tag != self._tag:  # sent before a cancel took effect
            await settle_message(message, requeue=True)
            return
        found = parse(message.body)
        if not found:
            _log.error(
                "job broker %s: a message of %s is malformed (%r; expected JSON with "
                "'e' and 'k'); rejected",
                self.link.safe_url,
                self.queue,
                message.body[:200],
            )
            with contextlib.suppress(ChannelInvalidStateError):
                await message.channel.basic_reject(tag_of(message), requeue=False)
            return
        if not self._told_limit:
            self._tell_delivery_limit(message)
        batch = Taken(message, len(found))
        with self._cond:
            self._sizes.append(len(found))
            self._held.add(batch)
            self._buffer.extend(Received(d, batch) for d in found)
            self._heard = time.monotonic()
            self._cond.notify()

    def _tell_delivery_limit(self, message: DeliveredMessage) -> None:
        """Say once that messages of the queue come back often enough to near RabbitMQ's
        delivery limit, and how to raise it."""
        count = delivery_count(message)
        if count < DELIVERY_COUNT_WARN:
            return
        self._told_limit = True
        version = server_version(message)
        _log.warning(
            "job broker %s: a message of quorum queue %s came back %d time(s) "
            "(x-delivery-count)%s; RabbitMQ 4.x drops a message past the queue's delivery "
            "limit (20 unless a policy sets it; dead-lettered instead if the queue has a "
            "dead-letter exchange) and its steps then wait for the sweep to publish them "
            "again. Raise the limit with a policy: %s",
            self.link.safe_url,
            self.queue,
            count,
            f" on RabbitMQ {version}" if version else "",
            policy_command(self.queue, vhost_of(self.link.url), version),
        )

    def _on_channel_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        """RabbitMQ closed the consuming channel (an acknowledgement of a delivery tag it does
        not know, a queue gone under the consumer): only that channel is lost. What it held
        goes back to the queue (RabbitMQ requeues it), so it is forgotten here, said once at
        warning level, and the next ``take()`` consumes on a new channel of the same
        connection. A channel closed with its connection is the connection's to handle."""
        reply = channel_closed_by_server(exc)
        if sender is not self._sub or reply is None:
            return
        raw, self._sub, self._raw, self._tag = self._raw, None, None, None
        with self._cond:
            lost = {t for t in self._held if t.message.channel is raw}
            self._held -= lost
            for t in lost:
                t.done = True  # settling it later would name a tag of a closed channel
            self._buffer = deque(r for r in self._buffer if r.receipt not in lost)
            self._consuming = False
            self._prefetch = 0
            self._cond.notify_all()
        _log.warning(
            "job broker %s: RabbitMQ closed the channel consuming %s (%s); the %d message(s) "
            "it held (%d step(s) not settled) go back to the queue, and steps taken from them "
            "may be delivered again; consuming again on a new channel of the same connection",
            self.link.safe_url,
            self.queue,
            reply,
            len(lost),
            sum(t.unsettled for t in lost),
        )

    def _on_cancelled(self, _frame: Any) -> None:
        """RabbitMQ cancelled the consumer (the queue was deleted): consume again next time."""
        _log.warning(
            "job broker %s: RabbitMQ cancelled the consumer of %s (queue deleted?); "
            "declaring it again",
            self.link.safe_url,
            self.queue,
        )
        self._unsubscribed()

    def queue_gone(self) -> None:
        """The queue was found gone (a publication returned unroutable): consume again."""
        if self._tag is not None:
            self._unsubscribed()

    def _unsubscribed(self) -> None:
        self._tag = None
        self._publishing.redeclare()
        with self._cond:
            self._consuming = False
            self._cond.notify_all()

    async def check(self) -> None:
        """Nothing came for a while: make sure the consumer is still attached. A queue that
        was deleted and at once declared again (by a publisher) may leave it on the old queue
        without RabbitMQ cancelling it; then the queue counts no consumer, or messages wait
        that nobody is sent though it has room in its prefetch, and this one subscribes again.
        A consumer whose prefetch is full of messages not settled yet is sent nothing by
        design: it is left alone."""
        with self._cond:
            self._heard = time.monotonic()
            own = sum(1 for t in self._held if t.message.consumer_tag == self._tag)
        if self._tag is None or own >= self._prefetch:
            return
        ready, consumers = await self.count()
        if ready is None or consumers == 0 or ready > 0:
            _log.warning(
                "job broker %s: the consumer of %s receives nothing while %s; consuming again",
                self.link.safe_url,
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

    async def settle(self, received: Sequence[Received], *, requeue: bool | None) -> None:
        """Settle taken steps: acknowledged (``requeue`` None) or handed back. A message is
        acknowledged once all its steps are settled; handed back whole (nack) when all of them
        are handed back; steps handed back from a message that is not are published again
        first, within half the timeout, and if that fails (a resource alarm blocks publishing)
        their whole message is handed back instead, said at warning level: the steps taken
        from it may be delivered twice, none is lost, and this connection stays."""
        groups: dict[Taken, list[Delivery]] = {}
        for r in received:
            assert isinstance(r.receipt, Taken)
            groups.setdefault(r.receipt, []).append(r.delivery)
        again: list[Taken] = []  # with steps to publish again
        republish: list[Delivery] = []
        ended: dict[Taken, bool] = {}  # message -> handed back whole
        for batch, found in groups.items():
            batch.unsettled -= len(found)
            if batch.done:  # gone back whole already (or with its channel): nothing to do
                continue
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
                async with asyncio.timeout(self.link.timeout / 2):
                    await self._publishing.publish(republish)
        except (*CONNECTION_EXCEPTIONS, TimeoutError, BrokerError) as exc:
            ended.update(dict.fromkeys(again, True))
            _log.warning(
                "job broker %s: %d step(s) handed back could not be published again (%s); "
                "their %d message(s) of %s go back whole, so steps taken from them may be "
                "delivered twice",
                self.link.safe_url,
                len(republish),
                str(exc) or type(exc).__name__,
                len(again),
                self.queue,
            )
        except BaseException:
            ended.update(dict.fromkeys(again, True))
            raise
        finally:
            for batch, whole in ended.items():
                if not batch.done:
                    batch.done = True
                    with self._cond:  # room in the prefetch: silence counts from now
                        self._held.discard(batch)
                        self._heard = time.monotonic()
                    await settle_message(batch.message, requeue=True if whole else None)

    async def pause(self) -> None:
        """Cancel the consumer and give back what was sent ahead."""
        if self._tag is not None and self._sub is not None and not self._sub.is_closed:
            raw = await self._sub.get_underlay_channel()
            await raw.basic_cancel(self._tag)
        self._tag = None
        with self._cond:
            self._consuming = False
        await self._give_back_sent_ahead()

    async def _give_back_sent_ahead(self, *, untouched_only: bool = False) -> None:
        """Hand back what was sent ahead and not taken; with ``untouched_only``, only the
        messages none of whose steps were taken (a ``basic.nack``: the others' steps would be
        published again, which a resource alarm blocks), the others staying to be taken."""
        with self._cond:
            left: dict[Taken, int] = {}  # message -> its steps sent ahead
            for r in self._buffer:
                assert isinstance(r.receipt, Taken)
                left[r.receipt] = left.get(r.receipt, 0) + 1
            back = {t for t, n in left.items() if n == t.size or not untouched_only}
            ahead = [r for r in self._buffer if r.receipt in back]
            self._buffer = deque(r for r in self._buffer if r.receipt not in back)
        await self.settle(ahead, requeue=True)

    async def count(self) -> tuple[int | None, int]:
        """(ready messages, consumers) of the queue; (None, 0) when it does not exist."""
        try:
            return await self._declare(passive=True)
        except ChannelNotFoundEntity:
            return None, 0

    async def _declare(self, *, passive: bool = False) -> tuple[int, int]:
        """Declare the queue (durable, a quorum queue) on a channel of its own, so that
        RabbitMQ refusing it (``PRECONDITION_FAILED``: a queue of that name with other
        arguments; ``NOT_FOUND`` when ``passive``), which closes the channel, costs nothing
        the consumer holds. Returns (ready messages, consumers)."""
        conn = await self.connection()
        channel = await conn.channel(publisher_confirms=False)
        try:
            if passive:
                queue = await channel.declare_queue(self.queue, passive=True)
            else:
                queue = await channel.declare_queue(self.queue, durable=True, arguments=QUORUM)
        finally:
            if not channel.is_closed:
                await channel.close()
        result = queue.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)

    async def drop(self) -> None:
        """Close both connections (RabbitMQ requeues what this one held)."""
        await self._publishing.drop()
        await self.drop_own()

    async def drop_own(self) -> bool:
        """Close this connection only (RabbitMQ requeues what it held); True when it (and
        any RabbitMQ closed) answered its close within the timeout."""
        return await self.link.close(self._forget_connection())

    def _forget_connection(self) -> AbstractConnection | None:
        """The connection, no longer current, and what lived on it forgotten."""
        conn = self.link.forget()
        self._forget()
        return conn

    def _forget(self) -> None:
        self._sub = None
        self._raw = None
        self._tag = None
        with self._cond:  # RabbitMQ requeues what the connection held
            self._consuming = False
            self._prefetch = 0
            self._buffer.clear()
            self._held.clear()
            self._cond.notify_all()
