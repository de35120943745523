"""Redis, spoken one way: what a Redis URL is, and how it is shown in messages.

This package loads without redis-py (workers and the service import it to decide whether the
broker is Redis at all); the client lives with the code that talks to Redis.
"""

from __future__ import annotations

from framepipe.redis.urls import REDIS_SCHEMES, is_redis_url, safe_url

__all__ = ["REDIS_SCHEMES", "is_redis_url", "safe_url"]
