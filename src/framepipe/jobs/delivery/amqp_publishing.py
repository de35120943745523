"""The RabbitMQ delivery's publishing connection: messages of ready steps, confirmed.

It publishes and declares the queue, nothing else, so a resource alarm that blocks it (RabbitMQ
blocks the connections that publish) never holds up the consuming connection
(:mod:`.amqp_consuming`). Used only on the delivery's loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import aiormq
from aio_pika.abc import AbstractChannel
from aio_pika.exceptions import PublishError

from framepipe.errors import BrokerError
from framepipe.jobs.delivery.amqp_wire import PERSISTENT, QUORUM, Link, batches, message_body
from framepipe.jobs.rounds import Delivery

__all__ = ["Publishing"]


class Publishing:
    """The connection that publishes to the quorum queue ``queue`` (``target`` names it in
    errors), on a channel with publisher confirms. ``on_unroutable`` is called when
    RabbitMQ returned messages as unroutable (the queue is gone: a consumer of it may not have
    been told)."""

    def __init__(
        self,
        url: str,
        queue: str,
        target: str,
        *,
        timeout: float,
        on_unroutable: Callable[[], None],
    ) -> None:
        self.queue = queue
        self.target = target
        self.link = Link(url, "framepipe-publish", timeout=timeout, on_closed=self._forget)
        self._on_unroutable = on_unroutable
        self._pub: AbstractChannel | None = None
        self._declared = False

    def redeclare(self) -> None:
        """Declare the queue again before the next publication (it may have been deleted)."""
        self._declared = False

    async def channel(self) -> aiormq.Channel:
        """The publishing channel, connected and with the queue declared (durable; an
        existing queue of that name must be a quorum queue too, or RabbitMQ refuses)."""
        conn = self.link.conn
        if conn is None or conn.is_closed:
            await self.drop()
            conn = await self.link.connect()
        if self._pub is None or self._pub.is_closed:
            self._pub = await conn.channel(publisher_confirms=True, on_return_raises=True)
            self._declared = False
        if not self._declared:
            await self._pub.declare_queue(self.queue, durable=True, arguments=QUORUM)
            self._declared = True
        channel = await self._pub.get_underlay_channel()
        assert isinstance(channel, aiormq.Channel)  # has basic_publish(wait=...)
        return channel

    async def publish(self, deliveries: Sequence[Delivery]) -> None:
        """Publish persistent messages of up to 16 steps of one execution each; returns once
        RabbitMQ confirmed them all. Messages returned unroutable are published once more
        after the queue is declared again, else this raises."""
        # aiormq directly, without waiting for each frame to be written (aio-pika does), so
        # the frames go out together and one round of confirms answers them.
        todo = batches(deliveries)
        for attempt in (1, 2):
            channel = await self.channel()
            results = await asyncio.gather(
                *(
                    channel.basic_publish(
                        message_body(e, keys),
                        routing_key=self.queue,
                        properties=PERSISTENT,
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
            self._on_unroutable()
            todo = returned
            if attempt == 2:
                raise BrokerError(
                    f"job broker {self.link.safe_url}: {len(returned)} message(s) "
                    f"were returned unroutable by {self.target}",
                    url=self.link.safe_url,
                )

    async def drop(self) -> bool:
        """Close the connection (and any RabbitMQ closed); the next call connects again. True
        when each answered its close within the timeout."""
        conn = self.link.forget()
        self._forget()
        return await self.link.close(conn)

    def _forget(self) -> None:
        self._pub = None
        self._declared = False
