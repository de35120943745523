"""A processor client's life: start (connect, claim its id, register), consume its stream,
reconnect while Redis is away, drain and deregister.

:class:`Serving` is a layer of :class:`~framepipe.processors.fleet.client.ProcessorClient`
(see its module docstring for the guarantees).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from framepipe.errors import RegistryConnectionError
from framepipe.processors.fleet.answering import Answering
from framepipe.processors.fleet.health import HealthServer
from framepipe.processors.fleet.identity import RUNNING, claim
from framepipe.processors.fleet.keys import ProcessorState
from framepipe.processors.fleet.options import (
    log_settings,
)
from framepipe.processors.fleet.outages import (
    REDIS_ERRORS,
    denied,
    kind,
    outage,
    reach,
    unavailable,
)
from framepipe.processors.fleet.publishing import Publisher
from framepipe.processors.fleet.registry import deregister, set_state
from framepipe.redis import safe_url
from framepipe.redis.connection import ResponseError, connect, lost, refused
from framepipe.redis.wire import Wire

if TYPE_CHECKING:
    pass

__all__ = ["Serving"]


class Serving(Answering):
    """Start, consume, reconnect, drain, deregister (frames answered by :class:`Answering`)."""

    async def start(self) -> None:
        """Connect, register, and process frames until stopped; returns after the graceful
        shutdown. Raises :class:`RegistryConnectionError` when Redis cannot be reached at
        start (after ``connect_retries`` retries), :class:`ConfigError` when it refuses the
        credentials."""
        if self._running:
            raise RuntimeError(f"processor {self.processor_id!r} is already running")
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._stopped_event = asyncio.Event()
        self._membership.reset()
        self._consumer.reset()
        if self._stop_requested:
            self._stop_event.set()
        self._running = True
        self.state = "starting"
        self._started_at = time.monotonic()
        try:
            if self.health_port is not None:
                self._health = HealthServer(
                    self.health_host, self.health_port, self.health, self.log
                )
                await self._health.start()
            log_settings(
                self.log,
                processor_id=self.processor_id,
                processor_id_source=self.processor_id_source,
                code_id=self._code_id,
                redis_url=self.redis_url,
                redis_url_source=self.redis_url_source,
                orchestrator_url=self.orchestrator_url,
            )
            if self._redis is None:
                self._redis = connect(self.redis_url)
            what = f"processor {self.processor_id!r}"
            await reach(
                self._redis,
                self.redis_url,
                retries=self.connect_retries,
                backoff=self.backoff,
                what=what,
            )
            try:
                await self._check_result_stream()
                await claim(self._redis, self.keys, self.processor_id, self._instance, self.log)
                RUNNING.add(self._instance)
                await self._register()
            except REDIS_ERRORS as exc:
                if not unavailable(exc):
                    raise
                if denied(exc):
                    raise refused(what, self.redis_url, exc) from exc
                raise RegistryConnectionError(
                    lost(what, self.redis_url, exc, during="registering"),
                    url=safe_url(self.redis_url),
                ) from exc
            self._reads = Wire(self._redis)
            self._publisher = Publisher(
                Wire(self._redis),
                self.keys,
                self.processor_id,
                self.stream,
                self.result_stream,
                self.result_maxlen,
                self.backoff,
                self.log,
            )
            beat_done = asyncio.Event()
            beating = asyncio.create_task(
                self._membership.beat(self._redis, beat_done), name=f"{self.processor_id}:heartbeat"
            )
            try:
                await self._serve()
            finally:
                await self._shutdown(beating, beat_done)
            if self._membership.displaced is not None:
                raise self._membership.displaced
        finally:
            RUNNING.discard(self._instance)
            self.state = ProcessorState.STOPPED
            if self._health is not None:
                await self._health.close()
                self._health = None
            if self._reads is not None:
                await self._reads.close()
                self._reads = None
            if self._publisher is not None:
                await self._publisher.close()
            if self._external is None and self._redis is not None:
                await self._redis.aclose()
                self._redis = None
            self._running = False
            self._stop_requested = False
            self._stopped_event.set()

    async def _serve(self) -> None:
        """Consume until stopped; reconnect with backoff while Redis is away."""
        failures = 0
        said = ""  # the kind of outage said at warning (error) level
        need_register = False
        while not self._stopping:
            try:
                if need_register:
                    await self._register()
                    need_register = False
                    if failures:
                        self.log.info("Reconnected to Redis after %d attempts", failures)
                    failures = 0
                    said = ""
                assert self._reads is not None
                await self._consumer.consume(
                    self._require_redis(),
                    self._reads,
                    capacity=self.capacity,
                    poll_interval=self.poll_interval,
                    stopping=lambda: self._stopping,
                )
            except REDIS_ERRORS as exc:
                if isinstance(exc, ResponseError) and (
                    "NOGROUP" in str(exc) or str(exc).startswith("UNBLOCKED")
                ):  # (UNBLOCKED: the stream was deleted under its blocking read)
                    self.log.warning(
                        "Its stream or group disappeared (deregistered as dead, or "
                        "Redis lost its data); registering again"
                    )
                    need_register = True
                    continue
                if not unavailable(exc):
                    raise
                failures += 1
                need_register = True
                if not self._stopping:
                    self.state = "reconnecting"
                delay = self.backoff.delay(failures)
                new, said = kind(exc) != said, kind(exc)
                first = self.log.error if denied(exc) else self.log.warning
                later = self.log.debug if denied(exc) else self.log.info
                (first if new else later)(
                    "%s; reconnecting in %.1fs (attempt %d)",
                    outage(self.redis_url, exc),
                    delay,
                    failures,
                )
                await self._sleep_unless_stopping(delay)

    async def _sleep_unless_stopping(self, delay: float) -> None:
        """Wait ``delay`` seconds before connecting again, or less: until stopped, or until
        a heartbeat went through (Redis is back: the backoff may have grown to
        ``backoff.maximum`` while it was away, and routers send frames again as soon as a
        heartbeat registered the processor again)."""
        assert self._stop_event is not None
        self._membership.back.clear()
        waits = {
            asyncio.ensure_future(self._stop_event.wait()),
            asyncio.ensure_future(self._membership.back.wait()),
        }
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()

    async def _shutdown(self, beating: asyncio.Task[None], beat_done: asyncio.Event) -> None:
        self.log.info("Stopping: %d frame(s) in flight", self.in_flight)
        displaced = self._membership.displaced is not None
        if self._draining_task is None and not displaced:
            self._draining_task = asyncio.ensure_future(self._set_draining())
        if self._draining_task is not None:
            await self._draining_task
        self._draining_task = None
        if self._consumer.inflight:
            _done, pending = await asyncio.wait(
                set(self._consumer.inflight.values()), timeout=self.shutdown_timeout
            )
            if pending:
                self.log.warning(
                    "%d frame(s) unfinished after %.1fs; left pending for the registry to re-route",
                    len(pending),
                    self.shutdown_timeout,
                )
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=5.0)
        # no cancel: redis-py can swallow a cancellation mid-command (redis/redis-py#2028)
        beat_done.set()
        await asyncio.wait({beating}, timeout=15.0)
        if not displaced:
            await self._deregister()

    async def _deregister(self) -> None:
        redis = self._require_redis()
        try:
            removed = await deregister(
                redis, self.keys, self.processor_id, self.stream, ProcessorState.DRAINING
            )
            if removed == 0:
                await set_state(redis, self.keys, self.processor_id, ProcessorState.STOPPED)
                self.log.info("Stopped; entries left in its stream go back to the registry")
            else:
                self.log.info("Deregistered (processed=%d failed=%d)", self.processed, self.failed)
        except REDIS_ERRORS as exc:
            if not unavailable(exc):
                raise
            self.log.warning(
                "could not deregister (Redis unreachable: %s: %s); the registry will declare "
                "it dead",
                type(exc).__name__,
                exc,
            )
