"""A processor's membership of the fleet: its record in Redis over its life.

:class:`Membership` registers the processor (stream, group, record), keeps its record alive
with a heartbeat every ``health_interval`` and gives way when another process took its id
over:

* Registration writes the record under this client's ``instance`` token (one process per id:
  :func:`~framepipe.processors.fleet.identity.claim` is asked first, by the client's start).
* Each heartbeat writes ``last_heartbeat`` and the counters the client reports
  (``in_flight``, ``processed``, ``failed``, ...) to the record. A processor declared dead by
  the registry (silent too long) that turns out alive registers again at its next heartbeat;
  one whose stream holds entries of another consumer (the registry's reaper) takes them back.
* A heartbeat that finds the record held by another ``instance`` (the id was taken over while
  this process was cut off from Redis) stops the client without touching the other's record
  or stream: :attr:`Membership.displaced` holds the :class:`~framepipe.errors.ConfigError`
  naming the holder, which the client's ``start()`` raises.
* Redis's clock is learned (one ``TIME``) at every registration and heartbeat
  (:class:`~framepipe.processors.fleet.deadlines.RedisClock`): the processor judges frames'
  deadlines on it.
* A heartbeat that goes through after failures sets :attr:`Membership.back`: the client's
  reconnecting loop stops waiting out its backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from framepipe.errors import ConfigError
from framepipe.logs import ComponentLogger
from framepipe.processors.fleet.consuming import Consumer
from framepipe.processors.fleet.deadlines import RedisClock
from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.keys import Keys
from framepipe.processors.fleet.outages import unavailable
from framepipe.processors.fleet.registry import heartbeat, register
from framepipe.redis import safe_url
from framepipe.redis.connection import REDIS_DOWN

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["Membership"]


class Membership:
    """The record of processor ``processor_id`` (in the namespace of ``keys``) as this client
    keeps it. ``counts()`` gives the counters it writes (``in_flight``, ``processed``,
    ``failed``, ...); ``stopping()`` says whether the client is stopping (a stopping client
    keeps beating but registers nothing again); ``on_ready()`` is called after each
    registration, ``on_displaced()`` once the id was found taken over."""

    def __init__(
        self,
        processor_id: str,
        keys: Keys,
        *,
        capabilities: Sequence[str],
        capacity: int,
        stream: str,
        result_stream: str,
        health_interval: float,
        redis_url: str,
        consumer: Consumer,
        clock: RedisClock,
        log: ComponentLogger,
        counts: Callable[[], Mapping[str, int]],
        stopping: Callable[[], bool],
        on_ready: Callable[[], None],
        on_displaced: Callable[[], None],
    ) -> None:
        self.processor_id = processor_id
        self.keys = keys
        self.capabilities = capabilities
        self.capacity = capacity
        self.stream = stream
        self.result_stream = result_stream
        self.health_interval = health_interval
        self.redis_url = redis_url
        self.consumer = consumer
        self.clock = clock
        self.log = log
        self.counts = counts
        self.stopping = stopping
        self.on_ready = on_ready
        self.on_displaced = on_displaced
        self.instance = uuid.uuid4().hex
        """This client, in its record (one process per id)."""
        self.registered = asyncio.Event()
        """Set once registered; cleared when a start begins and when the id was taken over."""
        self.displaced: ConfigError | None = None
        """Set when another process took the id over (the error ``start()`` raises)."""
        self.last_heartbeat: float | None = None
        """When (``time.time()``) the record was last written."""
        self.back = asyncio.Event()
        """Set by every heartbeat that went through (cleared by whoever waits for one)."""
        self._beat_failing = False  # the last heartbeat failed (logged once per run of them)

    def reset(self) -> None:
        """A new start: not registered, not displaced."""
        self.registered.clear()
        self.displaced = None

    async def register(self, redis: Redis) -> None:
        """Create the stream and group, then (atomically) the record and set membership."""
        counts = self.counts()
        await register(
            redis,
            self.keys,
            self.processor_id,
            capabilities=self.capabilities,
            capacity=self.capacity,
            stream=self.stream,
            result_stream=self.result_stream,
            in_flight=counts["in_flight"],
            processed=counts["processed"],
            failed=counts["failed"],
            health_interval=self.health_interval,
            instance=self.instance,
        )
        self.on_ready()
        self.last_heartbeat = time.time()
        await self.clock.sync(redis)
        if not self.registered.is_set():
            self.log.info(
                "Registered: capabilities=%s capacity=%d stream=%s results=%s",
                ",".join(self.capabilities),
                self.capacity,
                self.stream,
                self.result_stream,
            )
        self.registered.set()

    async def beat(self, redis: Redis, done: asyncio.Event) -> None:
        """Write a heartbeat every ``health_interval`` until ``done`` is set (see the module
        docstring); returns early once the id was found taken over."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.health_interval)
            if done.is_set():
                return
            try:
                beat = time.time()
                values: list[str | int] = ["last_heartbeat", repr(beat)]
                for name, value in self.counts().items():
                    values += [name, value]
                alive = await heartbeat(redis, self.keys, self.processor_id, self.instance, *values)
                self.last_heartbeat = beat
                self.back.set()
                await self.clock.sync(redis)
                if self._beat_failing:
                    self._beat_failing = False
                    self.log.info("heartbeat written again")
                if alive < 0:
                    await self.give_way(redis)
                    return
                if self.stopping():
                    continue
                if not alive:
                    self.log.warning(
                        "Found itself deregistered (declared dead or Redis lost "
                        "its data); registering again"
                    )
                    await self.register(redis)
                    self.consumer.want_recovery()
                elif await self.consumer.held_elsewhere(redis):
                    self.consumer.want_recovery()
            except Exception as exc:  # keep beating: a dead heartbeat would get it reaped
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """Log a heartbeat that failed: once per run of failures (Redis unreachable: the
        consuming loop says so)."""
        if isinstance(exc, REDIS_DOWN):
            self.log.debug("heartbeat failed: %s", exc)
        elif self._beat_failing:  # said once already
            self.log.debug("heartbeat failed again: %s: %s", type(exc).__name__, exc)
        elif unavailable(exc):
            self.log.warning(
                "heartbeat refused by Redis at %s (%s: %s); retrying every %gs",
                safe_url(self.redis_url),
                type(exc).__name__,
                exc,
                self.health_interval,
            )
        else:
            self.log.exception("heartbeat failed: %s", type(exc).__name__)
        self._beat_failing = not isinstance(exc, REDIS_DOWN) or self._beat_failing

    async def give_way(self, redis: Redis) -> None:
        """Another process holds this id now (it took it over while this one was cut off from
        Redis): stop without touching its record or its stream (:attr:`displaced` names it)."""
        pid, host = await redis.hmget(self.keys.proc(self.processor_id), ["pid", "host"])
        self.displaced = ConfigError(
            f"processor id {self.processor_id!r} was taken over by pid {text(pid) or '?'} on "
            f"host {text(host) or '?'} while this process (pid {os.getpid()}) was cut off from "
            "Redis: this one stops; give each process its own id (--id, PROCESSOR_ID)"
        )
        self.log.error("%s", self.displaced)
        self.registered.clear()  # its record is the other's: not marked draining nor removed
        self.on_displaced()
