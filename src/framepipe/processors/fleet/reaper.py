"""The health watch: silent processors declared dead, their frames re-routed.

A background task of :class:`~framepipe.processors.fleet.routing.ProcessorRegistry`, every
``poll_interval``:

* A processor whose heartbeat has not changed for ``heartbeat_timeout`` seconds, or three of
  its own heartbeat periods when that is longer (measured on the registry's clock, so machine
  clocks need not agree), is marked ``dead`` and deregistered;
  every entry left in its stream (pending in its consumer group or not yet delivered) is
  re-routed to another live processor with the entry's capability (regardless of free
  capacity: it has waited already), then acknowledged and deleted there; no frame is lost as
  long as a processor with the capability lives (entries wait in the dead stream until one
  does). A frame that has been on ``max_attempts`` processors that died gets an error result
  (``error_kind`` ``lost``) instead of killing more. The stream of a processor that stopped
  gracefully with entries left is handled the same way.
* The reply entries already read are trimmed, and waits past their timeout expire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from framepipe.errors import CircuitOpenError, NoProcessorError, RegistryConnectionError
from framepipe.processors.fleet.protocol import GROUP, ProcessorState, as_int, text
from framepipe.processors.fleet.registry import Registration, deregister
from framepipe.redis.connection import REDIS_DOWN, ResponseError
from framepipe.redis.scripts import MARK_DEAD_LUA
from framepipe.redis.streams import claim_pending

if TYPE_CHECKING:
    from framepipe.processors.fleet.routing import ProcessorRegistry, Track

__all__ = ["REAPER", "Reaper"]

REAPER = "framepipe-reaper"
"""The consumer name the registry claims a dead processor's entries under."""


class Reaper:
    """The health watch of one registry (its collaborator: it reads and changes the
    registry's mirror and its frames in flight, and routes through it)."""

    def __init__(self, registry: ProcessorRegistry) -> None:
        self.registry = registry
        self._waiting_logged: set[str] = set()

    async def watch(self) -> None:
        """Tick every ``poll_interval`` until the registry closes; Redis being away is
        logged once and retried."""
        registry = self.registry
        failures = 0
        while not registry._closed:
            await asyncio.sleep(registry.poll_interval)
            if registry._closed:
                return
            try:
                await self.tick()
            except RegistryConnectionError as exc:
                failures += 1
                if failures == 1:
                    registry.log.warning("health watch: %s; retrying", exc)
                continue
            except REDIS_DOWN as exc:
                failures += 1
                if failures == 1:
                    registry.log.warning("health watch: Redis unreachable (%s); retrying", exc)
                continue
            if failures:
                registry.log.info("health watch: Redis reachable again")
                failures = 0

    async def tick(self) -> None:
        """Refresh the mirror; mark silent processors dead; reap the dead and stopped; trim
        the reply stream; expire waits that outlived their timeout."""
        registry = self.registry
        redis = registry._require()
        await registry.refresh()
        now = time.monotonic()
        for proc in list(registry._procs.values()):
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
                        proc.id,
                        silent,
                        limit,
                    )
            if proc.state in (ProcessorState.DEAD, ProcessorState.STOPPED):
                await self.reap(proc)
        await registry._reader.trim()
        for track in list(registry._routed.values()):  # call() expires its own, on time
            if now - track.routed_at > track.timeout + registry.poll_interval:
                registry._expire(track, track.timeout)

    async def reap(self, proc: Registration) -> None:
        """Re-route what is left in a dead or stopped processor's stream, then remove it."""
        registry = self.registry
        redis = registry._require()
        entries: dict[bytes, dict[bytes, bytes]] = {}
        delivered: set[bytes] = set()  # were in a processor's hands (it may have died of them)
        try:
            for row in await redis.xpending_range(proc.stream, GROUP, "-", "+", 10_000):
                consumer = row["consumer"]
                if (consumer.decode() if isinstance(consumer, bytes) else consumer) != REAPER:
                    mid = row["message_id"]
                    delivered.add(mid if isinstance(mid, bytes) else str(mid).encode())
            async for claimed in claim_pending(redis, proc.stream, GROUP, REAPER, count=200):
                entries.update(claimed)
            while True:
                fresh = await redis.xreadgroup(GROUP, REAPER, {proc.stream: ">"}, count=200)
                got = [
                    (mid, f)
                    for _s, es in cast(list[Any], fresh or [])
                    for mid, f in es
                    if f is not None
                ]
                if not got:
                    break
                entries.update(got)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        if entries and not await self.reroute(proc, entries, delivered):
            return  # some wait for a live processor; try again at the next tick
        removed = await deregister(
            redis, registry.keys, proc.id, proc.stream, ProcessorState.DEAD, ProcessorState.STOPPED
        )
        if removed == 1:
            registry.log.info("Processor %s removed (%s)", proc.id, proc.state)
            registry._mirror.depart(proc)

    async def reroute(
        self, dead: Registration, entries: dict[bytes, dict[bytes, bytes]], delivered: set[bytes]
    ) -> bool:
        """Send ``entries`` of ``dead`` to other processors; True when none is left. Entries in
        ``delivered`` count one more attempt (a frame that kills its processors is given up
        after ``max_attempts``); entries it never took keep theirs."""
        registry = self.registry
        redis = registry._require()
        plan: list[tuple[bytes, Registration, dict[str, bytes | str], Track | None]] = []
        finished: list[bytes] = []
        left = 0
        for mid, raw in entries.items():
            fields: dict[str, bytes | str] = {text(k): v for k, v in raw.items()}
            frame_id = text(fields.get("frame_id"))
            capability = text(fields.get("capability")) or next(iter(dead.capability_order), "")
            attempt = as_int(raw.get(b"attempt"), 1) + (1 if mid in delivered else 0)
            if attempt > registry.max_attempts:
                await self.give_up(dead, mid, raw, attempt - 1)
                finished.append(mid)
                continue
            try:
                target = registry._mirror.choose(
                    capability, exclude=[dead.id], ignore_capacity=True
                )
            except (NoProcessorError, CircuitOpenError):
                target = None
            if target is None:
                left += 1
                continue
            fields["attempt"] = str(attempt)
            fields["rerouted_from"] = dead.id
            track = registry._routed.get(frame_id)
            if track is not None and track.processor_id == dead.id:
                dead.outstanding.discard(frame_id)
                target.outstanding.add(frame_id)
                track.processor_id = target.id
            else:
                track = None
            plan.append((mid, target, fields, track))
        if plan:
            results = await registry._send([(t, f) for _, t, f, _ in plan])
            for (mid, target, fields, track), result in zip(plan, results, strict=True):
                if isinstance(result, BaseException) or result is None:
                    left += 1
                    if track is not None:  # back to the dead one; retried next tick
                        target.outstanding.discard(track.frame_id)
                        dead.outstanding.add(track.frame_id)
                        track.processor_id = dead.id
                    if isinstance(result, REDIS_DOWN):
                        raise result
                    continue
                finished.append(mid)
                registry.log.info(
                    "Re-routed frame %s from %s to %s (attempt %s)",
                    text(fields.get("frame_id")),
                    dead.id,
                    target.id,
                    text(fields.get("attempt")),
                )
        if finished:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.xack(dead.stream, GROUP, *finished)
                pipe.xdel(dead.stream, *finished)
                await pipe.execute()
        if left:
            if dead.id not in self._waiting_logged:
                self._waiting_logged.add(dead.id)
                registry.log.warning(
                    "%d frame(s) of %s wait for a live processor with their capability",
                    left,
                    dead.id,
                )
        else:
            self._waiting_logged.discard(dead.id)
        return left == 0

    async def give_up(
        self, dead: Registration, mid: bytes, raw: Mapping[bytes, bytes], attempts: int
    ) -> None:
        """Give up on a frame that was on ``attempts`` processors that died: logged, and an
        error result (``error_kind`` ``lost``) to the router that sent it."""
        frame_id = text(raw.get(b"frame_id"))
        self.registry.log.error(
            "Frame %s was on %d processors that died (last: %s); giving up on it",
            frame_id,
            attempts,
            dead.id,
        )
        reply_to = raw.get(b"reply_to")
        if not reply_to:
            return
        payload = {
            "frame_id": raw.get(b"frame_id", b""),
            "camera_id": raw.get(b"camera_id", b""),
            "processor_id": dead.id,
            "capability": raw.get(b"capability", b""),
            "status": "error",
            "error_kind": "lost",
            "error": f"the frame was on {attempts} processors that died (last: "
            f"{dead.id}); given up",
            "trace_context": raw.get(b"trace_context", b""),
            "entry_id": mid,
            "duration_ms": "0",
            "processed_at": repr(time.time()),
        }
        await self.registry._require().xadd(
            text(reply_to),
            payload,  # type: ignore[arg-type]
            maxlen=10_000,
            approximate=True,
        )
