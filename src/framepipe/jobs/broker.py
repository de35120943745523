"""The job broker: a Redis Stream with one consumer group that rings workers' bells.

An entry only names a ready step (``e``: execution id, ``k``: step key); the state store
decides whether it may run (:func:`framepipe.jobs.dispatch.claim`). So the broker may lose
entries (a Redis restart without persistence) or deliver one twice: the workers' sweep
publishes ready steps again, and a claim takes a step only while it is ready. An entry is
acknowledged (and deleted) once its claim is committed; the entries of a worker that died
before claiming stay pending and are taken over with ``XAUTOCLAIM``.

Blocking calls; a worker runs them in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from framepipe.errors import BrokerError, MissingDependencyError

try:
    import redis
except ModuleNotFoundError as exc:
    raise MissingDependencyError("redis", "redis",
                                 "distributed jobs (a redis:// broker)") from exc
from framepipe.jobs.dispatch import Delivery
from framepipe.logs import get_logger
from framepipe.redis import is_redis_url, safe_url

__all__ = ["Entry", "StepBroker"]

Entry = tuple[str, Delivery]
"""A stream entry id and the step it names."""

_log = get_logger("jobs.broker")


class StepBroker:
    """The stream ``{namespace}:jobs:steps`` and its consumer group ``workers``."""

    GROUP = "workers"

    def __init__(self, url: str, namespace: str = "framepipe", *,
                 socket_timeout: float = 10.0) -> None:
        if not is_redis_url(url):
            raise BrokerError(f"job broker URL {safe_url(url)!r} is not a redis:// URL; "
                              "distributed jobs need Redis (FRAMEPIPE_BROKER_URL)", url=url)
        self.url = url
        self.safe_url = safe_url(url)
        self.stream = f"{namespace.rstrip(':')}:jobs:steps"
        self.redis: redis.Redis = redis.Redis.from_url(
            url, socket_connect_timeout=2.0, socket_timeout=socket_timeout,
            health_check_interval=15)
        self._group_ready = False

    def _wrap(self, exc: redis.RedisError, what: str) -> BrokerError:
        return BrokerError(f"job broker {self.safe_url}: {what} failed: {exc}", url=self.url)

    def ensure_group(self) -> None:
        """Create the stream and the group if missing (after a Redis restart, for one)."""
        try:
            self.redis.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise self._wrap(exc, "creating the consumer group") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "creating the consumer group") from exc
        self._group_ready = True

    def publish(self, deliveries: Sequence[Delivery]) -> None:
        """Append one entry per step (pipelined, no transaction)."""
        if not deliveries:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for d in deliveries:
                pipe.xadd(self.stream, {"e": d.execution_id, "k": d.key})
            pipe.execute()
        except redis.RedisError as exc:
            raise self._wrap(exc, f"publishing {len(deliveries)} step(s)") from exc

    def read(self, consumer: str, count: int, block_ms: int) -> list[Entry]:
        """Up to ``count`` new entries for ``consumer``, waiting at most ``block_ms``."""
        if not self._group_ready:
            self.ensure_group()
        try:
            reply: Any = self.redis.xreadgroup(self.GROUP, consumer, {self.stream: ">"},
                                                count=count, block=block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                _log.warning("job broker %s lost its consumer group (restarted?); recreating "
                             "it", self.safe_url)
                self._group_ready = False
                return []
            raise self._wrap(exc, "reading steps") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "reading steps") from exc
        return self._entries(reply[0][1] if reply else [])

    def autoclaim(self, consumer: str, min_idle_ms: int, count: int = 100) -> list[Entry]:
        """Take over entries another consumer read but did not acknowledge for ``min_idle_ms``
        (it died between reading and claiming)."""
        if not self._group_ready:
            self.ensure_group()
        try:
            reply = self.redis.xautoclaim(self.stream, self.GROUP, consumer, min_idle_ms,
                                          start_id="0-0", count=count)
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._group_ready = False
                return []
            raise self._wrap(exc, "taking over idle steps") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "taking over idle steps") from exc
        return self._entries(reply[1] if reply else [])

    def ack(self, entry_ids: Sequence[str]) -> None:
        """Acknowledge and delete handled entries."""
        if not entry_ids:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xack(self.stream, self.GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.execute()
        except redis.RedisError as exc:
            raise self._wrap(exc, f"acknowledging {len(entry_ids)} entr(ies)") from exc

    def _entries(self, raw: Sequence[Any]) -> list[Entry]:
        out: list[Entry] = []
        bad: list[str] = []
        for entry_id, fields in raw:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if not fields:  # deleted while pending
                bad.append(eid)
                continue
            e, k = fields.get(b"e"), fields.get(b"k")
            if not e or not k:
                _log.error("job broker %s: entry %s of %s is malformed (fields %s; expected "
                           "'e' and 'k'); dropped", self.safe_url, eid, self.stream,
                           sorted(f.decode("utf-8", "replace") for f in fields))
                bad.append(eid)
                continue
            out.append((eid, Delivery(e.decode(), k.decode())))
        if bad:
            self.ack(bad)
        return out

    def close(self) -> None:
        """Close the connections."""
        self.redis.close()
