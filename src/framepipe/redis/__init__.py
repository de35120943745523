"""Redis, spoken one way: URLs, the key namespace rule, connections, the RESP wire client.

This package loads without redis-py (workers and the service import it to decide whether the
broker is Redis at all): :mod:`~framepipe.redis.urls` and :mod:`~framepipe.redis.keys` are
re-exported here; the others are imported by name (those that talk to Redis need redis-py):
:mod:`~framepipe.redis.connection` (clients with framepipe's timeouts, PING with retries, the
"cannot reach Redis at <url>" messages), :mod:`~framepipe.redis.wire` (the hot path's own RESP
connections), :mod:`~framepipe.redis.streams` (stream replies) and
:mod:`~framepipe.redis.scripts` (the Lua scripts).
"""

from __future__ import annotations

from framepipe.redis.keys import namespaced
from framepipe.redis.urls import REDIS_SCHEMES, is_redis_url, safe_url

__all__ = ["REDIS_SCHEMES", "is_redis_url", "namespaced", "safe_url"]
