"""What every delivery is (:class:`StepDelivery`, the promises of which the package docstring of
:mod:`framepipe.jobs.delivery` states) and what it hands out: a :class:`Received` delivery and
a queue's :class:`Backlog`. The implementations import this, not the package, which picks one
of them (:func:`framepipe.jobs.delivery.open_delivery`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from framepipe.jobs.rounds import Delivery

__all__ = ["Backlog", "Received", "StepDelivery"]


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
