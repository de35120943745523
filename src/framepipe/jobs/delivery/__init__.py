"""Delivery: how "step X is ready" reaches the workers, one implementation per broker.

The state store decides what runs (:mod:`framepipe.jobs.dispatch`); a delivery only rings the
bell. A ``ready`` row is the outbox, a claim takes a step only while it is ready, and every
worker's sweep publishes again the ready steps nobody took. So each implementation needs to
promise only this much:

* :meth:`StepDelivery.publish` returns once the broker holds the deliveries (Redis: written;
  RabbitMQ: confirmed), or raises :class:`~framepipe.errors.BrokerError`, after which nothing
  is known (the sweep publishes them again after ``republish_after``);
* a delivery taken by a consumer is not given to another one until that consumer hands it
  back or stops being there (it died: Redis gives it to :meth:`~StepDelivery.take_over` after
  it idled; RabbitMQ delivers it again once the connection is gone); :meth:`~StepDelivery.ack`
  settles it, and the worker acknowledges only after the claim is committed;
* a delivery may come twice, or be lost with a broker that crashed: the claim makes a
  duplicate harmless and the sweep makes a loss a delay.

Every method blocks and may be called from any thread; errors are ``BrokerError`` naming the
URL with its password masked. :func:`open_delivery` picks the implementation from the URL:
``redis://``, ``rediss://``, ``unix://`` (:mod:`.redis_streams`), ``amqp://``, ``amqps://``
(:mod:`.amqp`).
"""

from __future__ import annotations

from framepipe.amqp import is_amqp_url
from framepipe.errors import BrokerError
from framepipe.jobs.delivery.contract import Backlog, Received, StepDelivery
from framepipe.jobs.rounds import Delivery
from framepipe.redis import is_redis_url, safe_url

__all__ = ["Backlog", "Delivery", "Received", "StepDelivery", "is_broker_url", "open_delivery"]


def is_broker_url(url: str) -> bool:
    """True when ``url`` names a broker that can deliver steps to workers."""
    return is_redis_url(url) or is_amqp_url(url)


def open_delivery(url: str, namespace: str = "framepipe", *, timeout: float = 10.0) -> StepDelivery:
    """The delivery for the broker at ``url``; its names start with ``namespace`` (several
    deployments may share a broker). Connects on first use, not here. ``timeout`` bounds every
    call to the broker."""
    if is_redis_url(url):
        from framepipe.jobs.delivery.redis_streams import RedisStreamsDelivery

        return RedisStreamsDelivery(url, namespace, socket_timeout=timeout)
    if is_amqp_url(url):
        from framepipe.jobs.delivery.amqp import AmqpDelivery

        return AmqpDelivery(url, namespace, timeout=timeout)
    raise BrokerError(
        f"job broker URL {safe_url(url)!r} names neither Redis (redis://, "
        "rediss://, unix://) nor RabbitMQ (amqp://, amqps://): workers need one "
        "of them (FRAMEPIPE_BROKER_URL)",
        url=safe_url(url),
    )
