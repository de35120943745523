"""Emptying a dead (or stopped) processor's stream: its entries moved to live processors.

Part of the health watch (:mod:`~framepipe.processors.fleet.reaper`), which calls
:meth:`Rerouter.reap` for every processor it finds ``dead`` or ``stopped``. Guarantees:

* Every entry left in the stream (pending in its consumer group or not yet delivered) is
  re-routed to another live processor with the entry's capability (regardless of free
  capacity: it has waited already), and acknowledged and deleted there in the same step
  (:data:`MOVE_LUA`): of several registries reaping the same processor, one moves each entry,
  once, and the others leave it; nor is an entry moved once its processor has registered
  again (it takes its entries back itself).
* The new entry is announced on the reply stream of the request it answers, by the same step
  and so before any result of it (:class:`~framepipe.processors.fleet.result_entries.Moved`):
  the registry that sent the frame knows every entry its request was moved to, whichever
  registry moved it.
* No frame is lost as long as a processor with the capability lives: entries wait in the dead
  stream until one does (said once per processor), or until the processor itself comes back.
* A frame delivered ``max_attempts`` times to processors that died gets an error result
  (``error_kind`` ``lost``) instead of killing more
  (:class:`~framepipe.processors.fleet.frame_entries.Attempts`; the reaper's own reads of an
  entry are not deliveries).
* The processor's record is removed once its stream is empty.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from framepipe.errors import CircuitOpenError, NoProcessorError, ProcessorRegistryError
from framepipe.processors.fleet.field_values import BadEntryError, text
from framepipe.processors.fleet.frame_entries import Attempts
from framepipe.processors.fleet.keys import GROUP, ProcessorState
from framepipe.processors.fleet.outages import unavailable
from framepipe.processors.fleet.registry import Registration, deregister, pending_deliveries
from framepipe.processors.fleet.result_entries import lost_result, moved_fields
from framepipe.processors.fleet.shown import loggable
from framepipe.redis.connection import ResponseError
from framepipe.redis.scripts import REPLY_STREAM_TTL, Script
from framepipe.redis.streams import Fields

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from framepipe.logs import ComponentLogger
    from framepipe.processors.fleet.inflight import InFlight, Track
    from framepipe.processors.fleet.keys import Keys
    from framepipe.processors.fleet.registry import Registrations
    from framepipe.redis.wire import Wire

__all__ = ["MOVE_LUA", "REAPER", "TAKE_NEW_LUA", "Rerouter", "ReroutingRegistry"]

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

MOVE_LUA = f"""
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'ready' or state == 'draining' then return -1 end
if #redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[2]) == 0 then return 0 end
local first = 5 + tonumber(ARGV[4])
local moved = 1
if ARGV[3] == 'route' then
  if redis.call('HGET', KEYS[3], 'state') ~= 'ready' then return false end
  moved = redis.call('XADD', KEYS[4], '*', unpack(ARGV, first))
  if first > 5 then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', 10000, '*', 'entry_id', moved,
               unpack(ARGV, 5, first - 1))
    redis.call('EXPIRE', KEYS[5], {REPLY_STREAM_TTL})
  end
elseif ARGV[3] == 'reply' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', 10000, '*', unpack(ARGV, first))
  redis.call('EXPIRE', KEYS[4], {REPLY_STREAM_TTL})
end
pcall(redis.call, 'XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
return moved
"""
"""KEYS: dead stream, dead hash, target hash, target stream, announcement stream. ARGV: group,
entry id, mode (``route``, ``reply``, ``drop``), ``n``, the announcement's ``n`` fields and
values, then the entry's field, value, ... Moves one entry out of a dead (or stopped)
processor's stream, in one step: ``route`` writes the fields to the target stream while the
target is ``ready`` (its new id; None when not ready) and, when ``n`` is not 0, the
announcement with the new ``entry_id`` to the announcement stream (the reply stream of the
entry's request: :class:`~framepipe.processors.fleet.result_entries.Moved`); ``reply`` writes the
fields to the target stream as a result (1), ``drop`` writes nothing (1); then the entry is
acknowledged and deleted. The target stream in ``reply`` mode and the announcement stream get
an expiry: the reaper names there only a reply stream of the namespace
(:meth:`~framepipe.processors.fleet.keys.Keys.reply_stream_of`). 0: the entry is gone
(another registry's reaper moved it, or its processor answered it); -1: the processor
registered again (``ready``/``draining``) and takes its entries back itself. Nothing is
written in either case: each entry is moved once, whoever else reaps the stream."""
MOVE = Script(MOVE_LUA)

_BATCH = 200


class ReroutingRegistry(Protocol):
    """What the rerouting uses of its registry
    (:class:`~framepipe.processors.fleet.routing.ProcessorRegistry`): its settings, its route
    connection, its mirror of the processors and its frames in flight."""

    @property
    def keys(self) -> Keys: ...
    @property
    def reply_stream(self) -> str: ...
    @property
    def max_attempts(self) -> int: ...
    @property
    def log(self) -> ComponentLogger: ...
    @property
    def _routes(self) -> Wire | None: ...
    @property
    def _mirror(self) -> Registrations: ...
    @property
    def _inflight(self) -> InFlight: ...
    @property
    def _routed(self) -> Mapping[str, Track]: ...
    def _require(self) -> Redis: ...


class Rerouter:
    """The emptying of dead processors' streams for one registry (its collaborator: it moves
    the registry's frames in flight along with their entries, and routes through it)."""

    def __init__(self, registry: ReroutingRegistry) -> None:
        self.registry = registry
        self._waiting_logged: set[str] = set()  # processors whose waiting entries were said

    async def reap(self, proc: Registration) -> None:
        """Re-route what is left in a dead or stopped processor's stream, then remove it.

        Entries not delivered yet are first taken under the consumer ``framepipe-reaper`` (a
        processor that comes back does not read them as new), their delivery count left at 0;
        entries pending under the processor stay there until they are re-routed. Nothing here
        counts as a delivery (:class:`~framepipe.processors.fleet.frame_entries.Attempts`). Entries
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
            registry.log.info("Processor %s removed (%s)", loggable(proc.id), loggable(proc.state))
            registry._mirror.depart(proc)

    async def reroute(
        self,
        dead: Registration,
        entries: dict[bytes, dict[bytes, bytes]],
        delivered: Mapping[bytes, int],
    ) -> bool:
        """Move ``entries`` of ``dead`` to other processors; True when none is left. An entry
        goes with ``attempt`` one more than its deliveries so far (``delivered``: its
        ``times_delivered`` in ``dead``'s stream; 0 for one never delivered); one delivered
        ``max_attempts`` times already is given up instead (its ``lost`` result to the router
        that sent it): a frame that kills its processors stops after ``max_attempts`` of them.

        Each entry is moved by :data:`MOVE_LUA`, atomically: written to its new stream (or
        answered) and acknowledged and deleted in ``dead``'s at once, only while it is still
        there and ``dead`` has not registered again. Of several registries reaping the same
        processor, each entry is thus moved by one; the others find it gone and leave it.
        Redis away: every move's track goes back to ``dead`` first, then the connection error
        is raised."""
        moves: list[_Move] = []
        left = 0
        for mid, raw in entries.items():
            move = self._plan(dead, mid, raw, delivered.get(mid, 0))
            if move is None:
                left += 1
            else:
                moves.append(move)
        if not moves:
            return self._left(dead, left)
        results = await self._move([m.call for m in moves])
        came_back = False
        down: BaseException | None = None
        for move, result in zip(moves, results, strict=True):
            outcome = self._settle(dead, move, result)
            came_back = came_back or outcome == -1
            left += outcome == 1
            if down is None and isinstance(result, BaseException) and unavailable(result):
                down = result
        if down is not None:  # raised once every move is settled (its track put back)
            raise down
        return False if came_back else self._left(dead, left)

    def _plan(
        self, dead: Registration, mid: bytes, raw: dict[bytes, bytes], delivered: int
    ) -> _Move | None:
        """The move of entry ``mid`` of ``dead`` (delivered ``delivered`` times there): to the
        processor chosen for its capability, or its ``lost`` result when its attempts are
        exhausted; None when no live processor can take it now. The track of the request the
        entry is (when this registry routed it and it is in flight: its reply token is the
        entry's) is moved to the target at once, its capacity held there (a result read before
        the script's reply is taken all the same: a result without a reply token is taken by
        its frame id, see :func:`~framepipe.processors.fleet.result_entries.answers`). The new entry
        is announced on the reply stream of the request the entry is, when it names one with
        a reply token (:data:`MOVE_LUA`): the registry that sent it, this one or another,
        takes it as an entry of that request, in flight or ended."""
        registry = self.registry
        frame_id = text(raw.get(b"frame_id"))
        attempts = Attempts.of(raw, delivered, registry.max_attempts)
        reply_to = self._reply_stream(dead, mid, raw)
        if attempts.exhausted:
            lost = lost_result(dead.id, mid, raw, attempts.used)
            keys = _keys(dead, dead.hash_key, reply_to or dead.stream, dead.stream)
            mode = "reply" if reply_to else "drop"
            call = [*keys, GROUP, mid, mode, "0", *_flat(lost)]
            return _Move(mid, frame_id, attempts.used, None, None, call)
        capability = text(raw.get(b"capability")) or next(iter(dead.capability_order), "")
        try:
            target = registry._mirror.choose(capability, exclude=[dead.id], ignore_capacity=True)
        except (NoProcessorError, CircuitOpenError):
            target = None
        if target is None:
            return None
        fields: dict[str, bytes | str] = {text(k): v for k, v in raw.items()}
        fields["attempt"] = str(attempts.used + 1)
        fields["rerouted_from"] = dead.id
        fields["first_entry"] = raw.get(b"first_entry") or mid  # its deadline's start
        track = registry._routed.get(frame_id)
        ours = reply_to == registry.reply_stream
        token = text(raw.get(b"reply_token"))
        late = ours and bool(token) and (track is None or token != track.reply_token)
        if (
            track is not None
            and ours
            and not late
            and track.processor_id == dead.id  # (not moved by an entry of the same request)
        ):
            dead.outstanding.discard(frame_id)
            target.outstanding.add(frame_id)
            track.processor_id = target.id
        else:
            track = None
        notice = moved_fields(frame_id, token, target.id) if reply_to and token else []
        keys = _keys(dead, target.hash_key, target.stream, reply_to or dead.stream)
        call = [*keys, GROUP, mid, "route", str(len(notice)), *notice, *_flat(fields)]
        return _Move(mid, frame_id, attempts.used + 1, target, track, call)

    def _reply_stream(self, dead: Registration, mid: bytes, raw: Mapping[bytes, bytes]) -> str:
        """The reply stream entry ``mid`` of ``dead`` names ("" for none). One that is not a
        reply stream of the namespace is logged and ignored: nothing is written to it (the
        processor the entry moves to answers it with an ``input`` error)."""
        try:
            return text(self.registry.keys.reply_stream_of(raw))
        except BadEntryError as exc:
            self.registry.log.warning(
                "Frame %s (entry %s of %s): %s; nothing written to it",
                loggable(raw.get(b"frame_id")) or "?",
                loggable(mid),
                loggable(dead.id),
                loggable(str(exc), 300),
            )
            return ""

    def _settle(self, dead: Registration, move: _Move, result: Any) -> int:
        """Take the script's ``result`` for ``move``: 0 done (moved here, or gone: moved by
        another registry or answered), 1 left for the next tick (the script failed: Redis
        away, the target not ready any more), -1 the processor is back. A track moved to the
        target goes back to ``dead`` when nothing was moved (unless its request ended
        meanwhile)."""
        registry = self.registry
        moved = isinstance(result, bytes) or result == 1
        track, target = move.track, move.target
        if (
            track is not None
            and target is not None
            and not moved
            and registry._routed.get(track.frame_id) is track  # (one that ended is released)
        ):
            target.outstanding.discard(track.frame_id)  # back to the dead one
            dead.outstanding.add(track.frame_id)
            track.processor_id = dead.id
        if isinstance(result, BaseException) or result is None:
            return 1
        if not moved:
            return -1 if result == -1 else 0
        if target is None:
            registry.log.error(
                "Frame %s was delivered %d times to processors that died (last: %s); "
                "giving up on it",
                loggable(move.frame_id),
                move.attempt,
                loggable(dead.id),
            )
        else:
            if track is not None:
                registry._inflight.learned(track, target.id, text(result))
            registry.log.info(
                "Re-routed frame %s from %s to %s (attempt %d)",
                loggable(move.frame_id),
                loggable(dead.id),
                loggable(target.id),
                move.attempt,
            )
        return 0

    def _left(self, dead: Registration, left: int) -> bool:
        """True when no entry of ``dead`` is left; else logs (once) that some wait."""
        if left:
            if dead.id not in self._waiting_logged:
                self._waiting_logged.add(dead.id)
                self.registry.log.warning(
                    "%d frame(s) of %s wait for a live processor with their capability",
                    left,
                    loggable(dead.id),
                )
            return False
        self._waiting_logged.discard(dead.id)
        return True

    async def _move(self, calls: list[list[bytes | str]]) -> list[Any]:
        """Run :data:`MOVE_LUA` for each call, pipelined on the registry's route connection;
        replies, or the exception for every call when the connection failed."""
        wire = self.registry._routes
        if wire is None:
            self.registry._require()
            raise ProcessorRegistryError("the registry is not started")
        try:
            return await wire.run_many(MOVE, calls, keys=5)
        except Exception as exc:
            return [exc] * len(calls)


@dataclass(frozen=True)
class _Move:
    """One entry of a dead processor's stream, on its way out."""

    mid: bytes
    frame_id: str
    attempt: int
    """The delivery it goes as (the deliveries it had, when it is given up)."""
    target: Registration | None
    """The processor it goes to (None: it is given up)."""
    track: Track | None
    """The track of its request when this registry routed it and it is in flight (moved to
    ``target`` already)."""
    call: list[bytes | str]
    """The KEYS and ARGV of its :data:`MOVE_LUA` run."""


def _keys(dead: Registration, hash_key: str, stream: str, announce: str) -> list[bytes | str]:
    """:data:`MOVE_LUA`'s KEYS for an entry of ``dead`` going to ``stream`` (checked against
    ``hash_key`` when routed), its move announced on ``announce``."""
    return [dead.stream, dead.hash_key, hash_key, stream, announce]


def _flat(fields: Mapping[str, bytes | str]) -> list[bytes | str]:
    return [part for pair in fields.items() for part in pair]
