"""The Lua scripts framepipe runs in Redis, and :class:`Script`, which runs one by its SHA1.

Each script makes one check-and-write atomic that would race as separate commands; their
contracts (``KEYS``, ``ARGV``, the reply) are in their docstrings. The processor fleet
(:mod:`framepipe.processors.fleet`) uses them: a processor's hash holds its ``state``
(``ready``, ``draining``, ``stopped``, ``dead``) and ``last_heartbeat``, its stream the frames
routed to it, and a set the ids of the registered processors.
"""

from __future__ import annotations

import hashlib

__all__ = [
    "CLEANUP_LUA",
    "HEARTBEAT_LUA",
    "MARK_DEAD_LUA",
    "PUBLISH",
    "PUBLISH_LUA",
    "REPLY_STREAM_TTL",
    "ROUTE",
    "ROUTE_LUA",
    "Script",
]


class Script:
    """A Lua script run by its SHA1 (``EVALSHA``, see :meth:`~framepipe.redis.wire.Wire.run`),
    sent as text again when Redis lost it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


HEARTBEAT_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
if state == false or state == 'dead' or state == 'stopped' then return 0 end
local holder = redis.call('HGET', KEYS[1], 'instance')
if holder and holder ~= '' and holder ~= ARGV[2] then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""
"""KEYS: hash, set. ARGV: id, instance, field, value, ... Writes the heartbeat unless the
processor is unknown or was deregistered (returns 0: register again) or its record is held by
another client ``instance`` (returns -1: another process took the id over)."""

ROUTE_LUA = """
if redis.call('HGET', KEYS[1], 'state') ~= 'ready' then return false end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV))
"""
"""KEYS: hash, stream. ARGV: field, value, ... Adds the entry only while the processor is
``ready``, so nothing lands in the stream of a processor that is stopping or dead."""

CLEANUP_LUA = """
local state = redis.call('HGET', KEYS[1], 'state')
local allowed = false
for i = 2, #ARGV do if state == ARGV[i] then allowed = true end end
if state ~= false and not allowed then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('XLEN', KEYS[2]) > 0 then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""
"""KEYS: hash, stream, set. ARGV: id, allowed state, ... Removes the processor when its state
is one of those given and its stream holds nothing (1); 0: entries left; -1: state changed."""

REPLY_STREAM_TTL = 3600
"""Seconds a router's reply stream lives after the last entry written to it. Every write to
one sets it again: a live router reads its replies at once, and the stream of one that is
gone (a late reply made it again after it stopped, or it was killed) is not left for good."""

PUBLISH_LUA = f"""
local fields = {{unpack(ARGV, 6)}}
if ARGV[4] == '1' then
  if ARGV[3] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(fields))
  else
    redis.call('XADD', KEYS[2], '*', unpack(fields))
  end
end
if ARGV[5] == '1' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', 10000, '*', unpack(fields))
  redis.call('EXPIRE', KEYS[3], {REPLY_STREAM_TTL})
end
local ok, acked = pcall(redis.call, 'XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
if ok then return acked end
return -1
"""
"""KEYS: frame stream, result stream, reply stream. ARGV: group, entry id, result maxlen ('' =
none), publish to the result stream ('1'/'0'), reply ('1'/'0'), field, value, ... Publishes,
then acknowledges and deletes the entry: an error while publishing stops the script before the
acknowledgement, so nothing is acknowledged that was not published. -1: the group is gone. The
reply stream gets an expiry (:data:`REPLY_STREAM_TTL`): the caller names there only a reply
stream of its namespace
(:meth:`~framepipe.processors.fleet.protocol.Keys.reply_stream_of`)."""

MARK_DEAD_LUA = """
local hb = redis.call('HGET', KEYS[1], 'last_heartbeat')
if hb == false then redis.call('SREM', KEYS[2], ARGV[1]) return 0 end
if hb ~= ARGV[2] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'ready' and state ~= 'draining' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'dead')
return 1
"""
"""KEYS: hash, set. ARGV: id, the heartbeat value last seen. Marks the processor dead unless a
heartbeat arrived meanwhile."""

PUBLISH = Script(PUBLISH_LUA)
"""The processor's publish + acknowledge, run on its :class:`~framepipe.redis.wire.Wire`."""
ROUTE = Script(ROUTE_LUA)
"""The router's guarded ``XADD``, run on its :class:`~framepipe.redis.wire.Wire`."""
