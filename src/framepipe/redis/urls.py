"""Redis URLs: which ones name a Redis server, and how one is shown without its password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDIS_SCHEMES", "is_redis_url", "safe_url"]

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
"""The URL schemes redis-py connects with (TCP, TLS, a Unix socket)."""


def is_redis_url(url: str) -> bool:
    """True when ``url`` names a Redis server (see :data:`REDIS_SCHEMES`)."""
    return url.startswith(REDIS_SCHEMES)


def safe_url(url: str) -> str:
    """``url`` with its password masked, for messages and logs; a URL that does not parse is
    returned as it is (it holds no recognisable password)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if password is None:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
