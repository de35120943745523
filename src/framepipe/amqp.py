"""AMQP URLs: which broker URLs name a RabbitMQ (AMQP 0-9-1) server.

Loads without aio-pika, like :mod:`framepipe.redis`: the settings and the worker import it to
decide what delivers job steps; the client lives in :mod:`framepipe.jobs.delivery.amqp`.
"""

from __future__ import annotations

__all__ = ["AMQP_SCHEMES", "is_amqp_url"]

AMQP_SCHEMES = ("amqp://", "amqps://")
"""The URL schemes of an AMQP server (TCP, TLS)."""


def is_amqp_url(url: str) -> bool:
    """True when ``url`` names an AMQP server (see :data:`AMQP_SCHEMES`)."""
    return url.startswith(AMQP_SCHEMES)
