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
  does, or until the processor itself comes back and takes them back). A frame delivered
  ``max_attempts`` times to processors that died gets an error result (``error_kind``
  ``lost``) instead of killing more (its deliveries:
  :class:`~framepipe.processors.fleet.protocol.Attempts`; the reaper's own reads of an entry
  are not deliveries). The stream of a processor that stopped gracefully with entries left is
  handled the same way.
* The reply entries already read are trimmed, and waits past their timeout expire.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, cast

from framepipe.errors import CircuitOpenError, NoProcessorError, RegistryConnectionError
from framepipe.processors.fleet.protocol import (
    GROUP,
    Attempts,
    Fields,
    ProcessorState,
    lost_result,
    text,
)
from framepipe.processors.fleet.registry import Registration, deregister, pending_deliveries
from framepipe.redis.connection import REDIS_DOWN, ResponseError
from framepipe.redis.scripts import MARK_DEAD_LUA

if TYPE_CHECKING:
    from framepipe.processors.fleet.routing import ProcessorRegistry, Track

__all__ = ["REAPER", "Reaper"]

REAPER = "framepipe-reaper"
"""The consumer name the registry takes a dead processor's undelivered entries under."""

TAKE_NEW_LUA = """
local got = redis.call('XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', ARGV[3],
                       'STREAMS', KEYS[1], '>')
if not got then return 0 end
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for _, entry in ipairs(got[1][2]) do args[#args + 1] = entry[1] end
local taken = #args - 5
if taken > 0 then
  args[#args + 1] = 'RETRYCOUNT'
  args[#args + 1] = 0
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return taken
"""
"""KEYS: stream. ARGV: group, consumer, count. Takes up to ``count`` entries never delivered
(``XREADGROUP >``) under ``consumer`` with their delivery count at 0 (the registry taking an
entry is not a delivery to a processor); returns how many."""

_BATCH = 200


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
        """Re-route what is left in a dead or stopped processor's stream, then remove it.

        Entries not delivered yet are first taken under the consumer ``framepipe-reaper`` (a
        processor that comes back does not read them as new), their delivery count left at 0;
        entries pending under the processor stay there until they are re-routed. Nothing here
        counts as a delivery (:class:`~framepipe.processors.fleet.protocol.Attempts`). Entries
        that wait for a live processor and the processor comes back: it takes them back
        itself (:class:`~framepipe.processors.fleet.client.ProcessorClient`)."""
        registry = self.registry
        redis = registry._require()
        entries: dict[bytes, dict[bytes, bytes]] = {}
        delivered: dict[bytes, int] = {}  # entry id -> deliveries to processors in this stream
        try:
            while await redis.eval(TAKE_NEW_LUA, 1, proc.stream, GROUP, REAPER, _BATCH) >= _BATCH:
                pass
            delivered = await pending_deliveries(redis, proc.stream, batch=_BATCH)
            low = "-"
            while batch := cast(
                "list[tuple[bytes, Fields | None]]",
                await redis.xrange(proc.stream, low, "+", count=_BATCH),
            ):
                entries.update((mid, f) for mid, f in batch if f is not None)
                low = "(" + batch[-1][0].decode()
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
        self,
        dead: Registration,
        entries: dict[bytes, dict[bytes, bytes]],
        delivered: Mapping[bytes, int],
    ) -> bool:
        """Send ``entries`` of ``dead`` to other processors; True when none is left. An entry
        goes with ``attempt`` one more than its deliveries so far (``delivered``: its
        ``times_delivered`` in ``dead``'s stream; 0 for one never delivered); one delivered
        ``max_attempts`` times already is given up (:meth:`give_up`) instead: a frame that
        kills its processors stops after ``max_attempts`` of them."""
        registry = self.registry
        redis = registry._require()
        plan: list[tuple[bytes, Registration, dict[str, bytes | str], Track | None]] = []
        finished: list[bytes] = []
        left = 0
        for mid, raw in entries.items():
            fields: dict[str, bytes | str] = {text(k): v for k, v in raw.items()}
            frame_id = text(fields.get("frame_id"))
            capability = text(fields.get("capability")) or next(iter(dead.capability_order), "")
            attempts = Attempts.of(raw, delivered.get(mid, 0), registry.max_attempts)
            if attempts.exhausted:
                await self.give_up(dead, mid, raw, attempts.used)
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
            fields["attempt"] = str(attempts.used + 1)
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
        """Give up on a frame delivered ``attempts`` times to processors that died: logged,
        and its error result (:func:`~framepipe.processors.fleet.protocol.lost_result`) to
        the router that sent it."""
        self.registry.log.error(
            "Frame %s was delivered %d times to processors that died (last: %s); giving up on it",
            text(raw.get(b"frame_id")),
            attempts,
            dead.id,
        )
        reply_to = raw.get(b"reply_to")
        if not reply_to:
            return
        await self.registry._require().xadd(
            text(reply_to),
            lost_result(dead.id, mid, raw, attempts),  # type: ignore[arg-type]
            maxlen=10_000,
            approximate=True,
        )
