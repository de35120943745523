"""Steps delivered by a Redis Stream with one consumer group (``workers``).

An entry only names a ready step (``e``: execution id, ``k``: step key). Consumers pull:
``XREADGROUP`` gives each entry to one consumer, which acknowledges (and deletes) it once its
claim is committed; the entries of a consumer that died before that stay pending and are
taken over with ``XAUTOCLAIM`` (:meth:`RedisStreamsDelivery.take_over`). A Redis restart
without persistence loses the stream and the group: the group is created again on the next
read, and the workers' sweep publishes the ready steps again. Every worker process is a new
consumer of the group; one that holds nothing pending and read nothing for an hour (a worker
that stopped) is deleted from the group by the workers' upkeep
(:meth:`RedisStreamsDelivery.forget_consumers`), so the group does not grow with every
restart.

Redis refusing the credentials (a wrong password or user in the URL) is a setting to fix, not
a broker that is away: until a command has gone through (a worker's start), it raises
:class:`~framepipe.errors.ConfigError` naming the job broker and its URL, password masked,
which no retry mends. Once one has, it is a :class:`~framepipe.errors.BrokerError` that says
the credentials are refused (the worker retries it as it retries a lost broker: the password
may be set back on the server), logged once at error level when Redis starts refusing them,
and once at info level when it accepts them again. Redis refusing a command to the user (an
ACL without it: ``NOPERM``) names the user, the stream and what Redis said, and is never
taken for an empty stream: a :class:`~framepipe.errors.ConfigError` until a command has gone
through, a :class:`~framepipe.errors.BrokerError` after.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

from framepipe.errors import BrokerError, ConfigError, FramepipeError, MissingDependencyError

try:
    import redis
except ModuleNotFoundError as exc:
    raise MissingDependencyError("redis", "redis", "distributed jobs on a redis:// broker") from exc
from framepipe.jobs.delivery.contract import Backlog, Received, StepDelivery
from framepipe.jobs.rounds import Delivery
from framepipe.logs import get_logger
from framepipe.outage import Outage
from framepipe.redis import is_redis_url, namespaced, safe_url
from framepipe.redis.connection import connect_sync, denied, refused, refused_credentials

__all__ = ["RedisStreamsDelivery"]

_log = get_logger("jobs.delivery")

FORGET_LUA = """
local n = 0
for _, fields in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local c = {}
  for i = 1, #fields, 2 do c[fields[i]] = fields[i + 1] end
  if c['name'] ~= ARGV[3] and tonumber(c['pending']) == 0
     and tonumber(c['idle']) > tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], c['name'])
    n = n + 1
  end
end
return n
"""
"""KEYS: stream. ARGV: group, idle (ms), the consumer to keep. Deletes, in one step (so none
reads an entry between the check and the delete), every other consumer with nothing pending
and idle for longer; returns how many."""


class RedisStreamsDelivery(StepDelivery):
    """The stream ``{namespace}:jobs:steps`` and its consumer group ``workers``."""

    GROUP = "workers"

    def __init__(
        self, url: str, namespace: str = "framepipe", *, socket_timeout: float = 10.0
    ) -> None:
        if not is_redis_url(url):
            raise BrokerError(f"{safe_url(url)!r} is not a Redis URL", url=safe_url(url))
        self.url = url
        self.safe_url = safe_url(url)
        self.stream = namespaced(namespace, "jobs", "steps")
        self.target = f"stream {self.stream}"
        self.redis: redis.Redis = connect_sync(
            url,
            retries=None,
            connect_timeout=2.0,
            socket_timeout=socket_timeout,
            health_check_interval=15,
        )
        self._group_ready = False
        self._lock = threading.Lock()  # the worker calls from several threads
        self._answered = False
        """A command has gone through: credentials refused now are no longer a start's."""
        self._refused = Outage()
        """Credentials refused since the last command that went through (its only failures:
        the broker's other outages are the worker's to say)."""

    def _wrap(self, exc: redis.RedisError, what: str) -> FramepipeError:
        if isinstance(exc, redis.exceptions.NoPermissionError):
            user = urlsplit(self.url).username or "default"
            text = (
                f"job broker {self.safe_url}: {what} failed: Redis refuses user {user!r} a "
                f"command on key {self.stream!r} ({exc}): its ACL must allow the stream "
                "commands (XADD, XREADGROUP, XACK, XDEL, XAUTOCLAIM, XGROUP, XINFO, XLEN, "
                "EVAL) on the job broker's keys"
            )
            with self._lock:
                answered = self._answered
            # At a start it is a setting to fix; later the ACL may be put back as it was.
            return BrokerError(text, url=self.safe_url) if answered else ConfigError(text)
        if not denied(exc):
            return BrokerError(
                f"job broker {self.safe_url}: {what} failed: {exc}", url=self.safe_url
            )
        with self._lock:
            if not self._answered:
                return refused("job broker", self.url, exc)
            first = self._refused.failed(exc, refused=True)
        message = refused_credentials(self.url, exc)
        if first:
            _log.error(
                "job broker %s: %s; retried until it accepts them, no step is delivered meanwhile",
                self.safe_url,
                message,
            )
        return BrokerError(
            f"job broker {self.safe_url}: {what} failed: {message}", url=self.safe_url
        )

    def _went_through(self) -> None:
        """A command went through: the credentials are taken (said once if they were
        refused)."""
        if self._answered and not self._refused.down:
            return
        with self._lock:
            self._answered = True
            lasted = self._refused.answered()
        if lasted is not None:
            _log.info(
                "job broker %s: Redis accepts the credentials again; delivering", self.safe_url
            )

    def prepare(self) -> None:
        """Create the stream and the group if missing (after a Redis restart, for one)."""
        try:
            self.redis.xgroup_create(self.stream, self.GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise self._wrap(exc, "creating the consumer group") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "creating the consumer group") from exc
        self._went_through()
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
        self._went_through()

    def take(self, consumer: str, count: int, *, wait: float, window: int) -> list[Received]:
        """New entries for ``consumer`` (``XREADGROUP``); ``window`` is not needed: nothing
        is read ahead of ``count``."""
        if count <= 0:
            return []
        if not self._group_ready:
            self.prepare()
        try:
            reply: Any = self.redis.xreadgroup(
                self.GROUP,
                consumer,
                {self.stream: ">"},
                count=count,
                block=max(1, int(wait * 1000)),
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                _log.warning(
                    "job broker %s lost its consumer group (restarted?); recreating it",
                    self.safe_url,
                )
                self._group_ready = False
                return []
            raise self._wrap(exc, "reading steps") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "reading steps") from exc
        self._went_through()
        return self._entries(reply[0][1] if reply else [])

    def take_over(self, consumer: str, idle: float, count: int) -> list[Received]:
        """Entries another consumer read and did not acknowledge for ``idle`` seconds
        (``XAUTOCLAIM``)."""
        if count <= 0:
            return []
        if not self._group_ready:
            self.prepare()
        try:
            reply = self.redis.xautoclaim(
                self.stream, self.GROUP, consumer, int(idle * 1000), start_id="0-0", count=count
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc):
                self._group_ready = False
                return []
            raise self._wrap(exc, "taking over idle steps") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "taking over idle steps") from exc
        self._went_through()
        return self._entries(reply[1] if reply else [])

    def forget_consumers(self, idle: float, keep: str) -> int:
        """Delete from the group the consumers other than ``keep`` with nothing pending that
        read nothing for ``idle`` seconds (``XGROUP DELCONSUMER``, checked and done in one
        script); return how many."""
        try:
            forgotten = int(
                self.redis.eval(FORGET_LUA, 1, self.stream, self.GROUP, int(idle * 1000), keep)
            )
        except redis.ResponseError as exc:
            if "NOGROUP" in str(exc) or "no such key" in str(exc):
                return 0
            raise self._wrap(exc, "forgetting stopped consumers") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "forgetting stopped consumers") from exc
        self._went_through()
        return forgotten

    def ack(self, received: Sequence[Received]) -> None:
        """Acknowledge and delete the entries."""
        self._settle([str(r.receipt) for r in received], [])

    def hand_back(self, received: Sequence[Received]) -> None:
        """Append the steps again and settle the old entries, in one round trip (appended
        first: if Redis fails half-way, the old entries stay pending and are taken over)."""
        self._settle([str(r.receipt) for r in received], [r.delivery for r in received])

    def _settle(self, entry_ids: list[str], again: list[Delivery]) -> None:
        if not entry_ids:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for d in again:
                pipe.xadd(self.stream, {"e": d.execution_id, "k": d.key})
            pipe.xack(self.stream, self.GROUP, *entry_ids)
            pipe.xdel(self.stream, *entry_ids)
            pipe.execute()
        except redis.RedisError as exc:
            raise self._wrap(exc, f"acknowledging {len(entry_ids)} entr(ies)") from exc
        self._went_through()

    def backlog(self) -> Backlog:
        """The group's ``lag`` (entries not read yet) and ``pending`` (read, unacknowledged);
        an empty backlog when the stream does not exist yet. Where Redis does not tell the
        lag (before 7.0, or it cannot tell) it is the stream's length less the pending
        entries (an acknowledged entry is deleted); without the group (the next read makes it
        again, from the stream's start), every entry waits. Anything else Redis answers (an
        ACL without ``XINFO``: ``NOPERM``; a key of another type) raises
        :class:`~framepipe.errors.BrokerError`: a backlog not seen is not an empty one."""
        try:
            groups: Any = self.redis.xinfo_groups(self.stream)
            group = next((g for g in groups if g.get("name") in (b"workers", "workers")), None)
            pending = int(group.get("pending") or 0) if group is not None else 0
            lag = group.get("lag") if group is not None else None
            if lag is None:
                lag = max(0, int(self.redis.xlen(self.stream)) - pending)
        except redis.ResponseError as exc:
            if "no such key" in str(exc).lower():
                self._went_through()
                return Backlog(0, 0)
            raise self._wrap(exc, "reading the backlog") from exc
        except redis.RedisError as exc:
            raise self._wrap(exc, "reading the backlog") from exc
        self._went_through()
        return Backlog(int(lag), pending)

    def _entries(self, raw: Sequence[Any]) -> list[Received]:
        out: list[Received] = []
        bad: list[str] = []
        for entry_id, fields in raw:
            eid = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            if not fields:  # deleted while pending
                bad.append(eid)
                continue
            e, k = fields.get(b"e"), fields.get(b"k")
            if not e or not k:
                _log.error(
                    "job broker %s: entry %s of %s is malformed (fields %s; expected "
                    "'e' and 'k'); dropped",
                    self.safe_url,
                    eid,
                    self.stream,
                    sorted(f.decode("utf-8", "replace") for f in fields),
                )
                bad.append(eid)
                continue
            out.append(Received(Delivery(e.decode(), k.decode()), eid))
        if bad:
            self._settle(bad, [])
        return out

    def close(self) -> None:
        """Close the connections (pending entries stay pending until taken over)."""
        self.redis.close()
