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

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from framepipe.amqp import is_amqp_url
from framepipe.errors import BrokerError
from framepipe.jobs.rounds import Delivery
from framepipe.redis import is_redis_url, safe_url

__all__ = ["Backlog", "Delivery", "Received", "StepDelivery", "is_broker_url", "open_delivery"]


@dataclass(frozen=True, slots=True)
class Received:
    """A delivery a consumer took, until it acknowledges or hands it back. ``receipt`` is the
    broker's handle (a stream entry id, an AMQP message) and means nothing elsewhere."""

    delivery: Delivery
    receipt: object


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the broker holds: ``waiting`` not yet delivered to any consumer, ``unacked``
    delivered and not yet acknowledged (None when the broker does not tell). Counted in the
    broker's units: Redis entries (one step each), RabbitMQ messages (up to 16 steps each)."""

    waiting: int
    unacked: int | None = None


class StepDelivery(ABC):
    """Publishes ready steps and hands them to consumers (workers) with acknowledgement."""

    url: str
    safe_url: str
    target: str
    """Where the deliveries go, for logs (``stream ns:jobs:steps``)."""

    @abstractmethod
    def prepare(self) -> None:
        """Connect and create what the deliveries need (a stream and its group, a queue)."""

    @abstractmethod
    def publish(self, deliveries: Sequence[Delivery]) -> None:
        """Hand ``deliveries`` to the broker; returns once it holds them all."""

    @abstractmethod
    def take(self, consumer: str, count: int, *, wait: float, window: int) -> list[Received]:
        """Up to ``count`` deliveries for ``consumer`` (none when ``count`` < 1), waiting up
        to ``wait`` seconds for the first. ``window`` is how many the consumer may hold
        unsettled at once (its claim window): a broker that pushes (RabbitMQ) sends it at most
        that many ahead. Each delivery returned must be settled once: acknowledged or handed
        back."""

    @abstractmethod
    def ack(self, received: Sequence[Received]) -> None:
        """Settle deliveries that were handled (claimed, or stale): they are not delivered
        again. A lost acknowledgement costs one duplicate delivery."""

    @abstractmethod
    def hand_back(self, received: Sequence[Received]) -> None:
        """Give back deliveries that were not handled, for any consumer to take."""

    def pause(self) -> None:  # noqa: B027 (a hook: nothing to do for most brokers)
        """The consumer is full and will not take for a while: a broker that pushes stops
        sending to it and gives back what it sent ahead, so idle consumers get it; the next
        :meth:`take` resumes. Nothing to do for a broker the consumer pulls from."""

    def take_over(self, consumer: str, idle: float, count: int) -> list[Received]:
        """Deliveries another consumer took and held unsettled for ``idle`` seconds (it died
        between taking and claiming). Empty where the broker gives them back by itself."""
        return []

    def forget_consumers(self, idle: float, keep: str) -> int:
        """Forget the consumers (other than ``keep``) that hold nothing unsettled and took
        nothing for ``idle`` seconds (workers that stopped: each process is a new consumer);
        return how many. Nothing to do where the broker forgets them by itself."""
        return 0

    @abstractmethod
    def backlog(self) -> Backlog:
        """How many deliveries wait in the broker."""

    @abstractmethod
    def close(self) -> None:
        """Close the connections; what this process took and did not settle goes back."""


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
