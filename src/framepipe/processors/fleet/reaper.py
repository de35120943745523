"""The health watch: silent processors declared dead, their frames re-routed.

A background task of :class:`~framepipe.processors.fleet.routing.ProcessorRegistry`, every
``poll_interval``:

* A processor whose heartbeat has not changed for ``heartbeat_timeout`` seconds, or three of
  its own heartbeat periods when that is longer (measured on the registry's clock, so machine
  clocks need not agree), is marked ``dead`` and deregistered; every entry left in its stream
  is re-routed to another live processor with the entry's capability, each entry once
  whichever registries reap it, no frame lost as long as a processor with the capability
  lives, a frame that killed ``max_attempts`` processors given up with a ``lost`` result
  (:mod:`~framepipe.processors.fleet.rerouting`). The stream of a processor that stopped
  gracefully with entries left is handled the same way.
* The reply entries already read are trimmed, and waits past their timeout expire.
* A restart of Redis (its ``run_id`` changed since the last tick) is noticed: the requests in
  flight then may have been lost with Redis's data, and their timeouts do not count against
  their processors' circuit breakers
  (:meth:`~framepipe.processors.fleet.inflight.InFlight.redis_restarted`); nor do the
  timeouts while Redis is away, until a tick has checked its run id again. A Redis that
  refuses ``INFO`` (an ACL without it) is not checked.

A record Redis cannot read (:meth:`~framepipe.processors.fleet.registry.Registrations.read`)
and a processor whose checks Redis refuses for good (its stream a key of another type) are
skipped, with one warning naming them; the watch goes on with the others. Only Redis away or
refusing for a while (:func:`~framepipe.processors.fleet.outages.unavailable`) pauses it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Protocol

from framepipe.errors import RegistryConnectionError
from framepipe.processors.fleet.keys import ProcessorState
from framepipe.processors.fleet.outages import REDIS_ERRORS, denied, kind, outage, unavailable
from framepipe.processors.fleet.rerouting import (
    MOVE_LUA,
    REAPER,
    TAKE_NEW_LUA,
    Rerouter,
    ReroutingRegistry,
)
from framepipe.processors.fleet.shown import loggable
from framepipe.redis.connection import ResponseError
from framepipe.redis.scripts import MARK_DEAD_LUA

if TYPE_CHECKING:
    from collections.abc import Mapping

    from redis.asyncio import Redis

    from framepipe.processors.fleet.registry import Registration

__all__ = ["MOVE_LUA", "REAPER", "TAKE_NEW_LUA", "ReapedRegistry", "Reaper"]


class _Trimmed(Protocol):
    """The reply stream, trimmed at every tick
    (:class:`~framepipe.processors.fleet.replies.ReplyReader`)."""

    async def trim(self) -> None: ...


class ReapedRegistry(ReroutingRegistry, Protocol):
    """What the health watch uses of its registry
    (:class:`~framepipe.processors.fleet.routing.ProcessorRegistry`): its settings, its
    route connection, its mirror of the processors, its frames in flight and its reply
    stream."""

    @property
    def redis_url(self) -> str: ...
    @property
    def poll_interval(self) -> float: ...
    @property
    def heartbeat_timeout(self) -> float: ...
    @property
    def _closed(self) -> bool: ...
    @property
    def _procs(self) -> Mapping[str, Registration]: ...
    @property
    def _reader(self) -> _Trimmed: ...
    async def refresh(self) -> object: ...


class Reaper:
    """The health watch of one registry (its collaborator: it reads and changes the
    registry's mirror and its frames in flight, and routes through it)."""

    def __init__(self, registry: ReapedRegistry) -> None:
        self._registry = registry
        self.rerouter = Rerouter(registry)
        """The emptying of dead and stopped processors' streams."""
        self._failing: set[str] = set()  # processors whose last check Redis refused (logged)
        self._run_id: str | None = ""  # Redis's run id as last seen (None: INFO refused)

    @property
    def registry(self) -> ReapedRegistry:
        """The registry watched; one owner with :attr:`rerouter` (setting it sets both)."""
        return self._registry

    @registry.setter
    def registry(self, registry: ReapedRegistry) -> None:
        self._registry = registry
        self.rerouter.registry = registry

    async def reap(self, proc: Registration) -> None:
        """Empty the stream of ``proc``, dead or stopped (see
        :meth:`~framepipe.processors.fleet.rerouting.Rerouter.reap`)."""
        await self.rerouter.reap(proc)

    async def watch(self) -> None:
        """Tick every ``poll_interval`` until the registry closes; Redis being away or
        refusing (:func:`~framepipe.processors.fleet.outages.unavailable`) is logged once and
        retried."""
        registry = self.registry
        failures = 0
        said = ""  # the kind of outage said since the last success
        while not registry._closed:
            await asyncio.sleep(registry.poll_interval)
            if registry._closed:
                return
            try:
                await self.tick()
            except RegistryConnectionError as exc:
                registry._inflight.redis_away = True
                failures += 1
                if failures == 1:
                    registry.log.warning("health watch: %s; retrying", exc)
                continue
            except REDIS_ERRORS as exc:
                if not unavailable(exc):
                    raise
                registry._inflight.redis_away = True
                failures += 1
                if failures == 1 or kind(exc) != said:
                    said = kind(exc)
                    (registry.log.error if denied(exc) else registry.log.warning)(
                        "health watch: %s; retrying", outage(registry.redis_url, exc)
                    )
                continue
            if failures:
                registry.log.info("health watch: Redis reachable again")
                failures = 0

    async def tick(self) -> None:
        """Notice a restart of Redis; refresh the mirror; mark silent processors dead; reap the
        dead and stopped; trim the reply stream; expire waits that outlived their timeout."""
        registry = self.registry
        redis = registry._require()
        await self.check_restart(redis)
        await registry.refresh()
        now = time.monotonic()
        for proc in list(registry._procs.values()):
            try:
                await self.check(redis, proc, now)
            except REDIS_ERRORS as exc:
                if unavailable(exc):
                    raise
                self._failed(proc, exc)
            else:
                self._failing.discard(proc.id)
        self._failing.intersection_update(registry._procs)
        await registry._reader.trim()
        for track in list(registry._routed.values()):  # call() expires its own, on time
            if now - track.routed_at > track.timeout + registry.poll_interval:
                registry._inflight.expire(track, track.timeout)

    async def check_restart(self, redis: Redis) -> None:
        """Compare Redis's ``run_id`` with the one last seen: a new one is a restart, whose
        requests in flight then do not count against their processors when they expire. Then
        Redis is no longer away for the requests (see the module docstring)."""
        registry = self.registry
        if self._run_id is not None:
            try:
                info = await redis.info("server")
            except ResponseError as exc:
                if unavailable(exc):
                    raise
                self._run_id = None
                registry.log.info(
                    "health watch: Redis refuses INFO (%s); a restart of Redis is not "
                    "noticed, and frames it loses count as timeouts of their processors",
                    loggable(str(exc), 200),
                )
            else:
                run = str(info.get("run_id") or "")
                if self._run_id and run and run != self._run_id:
                    count = registry._inflight.redis_restarted()
                    registry.log.warning(
                        "Redis restarted (run id %s, was %s): the %d frame(s) in flight may "
                        "have been lost with its data; their timeouts do not count against "
                        "their processors' circuits",
                        run[:12],
                        self._run_id[:12],
                        count,
                    )
                self._run_id = run or self._run_id
        registry._inflight.redis_away = False

    async def check(self, redis: Redis, proc: Registration, now: float) -> None:
        """Mark ``proc`` dead when it has been silent too long; reap it when dead or stopped."""
        registry = self.registry
        silent = now - proc.hb_seen_at
        limit = proc.silence_limit(registry.heartbeat_timeout)
        if proc.state in (ProcessorState.READY, ProcessorState.DRAINING) and silent > limit:
            marked = await redis.eval(
                MARK_DEAD_LUA,
                2,
                registry.keys.proc(proc.id),
                registry.keys.processors,
                proc.id,
                proc.hb_value or b"",
            )
            if marked:
                proc.state = ProcessorState.DEAD
                registry.log.warning(
                    "Processor %s silent for %.1fs (limit %.1fs: heartbeat_timeout "
                    "or 3 of its heartbeat periods): deregistered as dead; re-routing "
                    "its frames",
                    loggable(proc.id),
                    silent,
                    limit,
                )
        if proc.state in (ProcessorState.DEAD, ProcessorState.STOPPED):
            await self.reap(proc)

    def _failed(self, proc: Registration, exc: BaseException) -> None:
        """Redis refused a command about ``proc`` for good (its stream a key of another type,
        a script error): logged once until a tick gets through; the other processors are
        watched as usual, and ``proc`` is tried again at every tick."""
        if proc.id in self._failing:
            return
        self._failing.add(proc.id)
        self.registry.log.warning(
            "health watch: processor %s (stream %s) skipped: %s: %s; tried again every tick",
            loggable(proc.id),
            loggable(proc.stream),
            type(exc).__name__,
            loggable(str(exc)),
        )
