"""Redis URLs: which ones name a Redis server (:func:`safe_url`, how any URL is shown, is
re-exported from :mod:`framepipe.urls`)."""

from __future__ import annotations

from framepipe.urls import check_sent_url, safe_url

__all__ = ["REDIS_SCHEMES", "check_redis_url", "is_redis_url", "safe_url"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""The URL schemes redis-py connects with (TCP, TLS, a Unix socket)."""


def is_redis_url(url: str) -> bool:
    """True when ``url`` names a Redis server (see :data:`REDIS_SCHEMES`)."""
    return url.startswith(REDIS_SCHEMES)


def check_redis_url(url: str) -> None:
    """A :class:`~framepipe.errors.ConfigError` when ``url`` can never reach Redis (see
    :func:`framepipe.urls.check_sent_url`)."""
    check_sent_url(url, "Redis URL")
