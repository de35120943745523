"""One process per processor id: a client starting under an id that a live process holds is
refused.

Two processes under one id (a compose service scaled with one ``PROCESSOR_ID``, a copy started
by hand) would share one stream and one consumer name: each would take the other's frames back
as its own, split a camera's frames between them (a motion processor's differencing with
them), overwrite each other's counters, and the first to stop would remove the other's
registration and stream. :func:`claim` finds the holder of the id in its record (its
``instance``, ``pid``, ``host``, ``pidns``, ``state`` and heartbeat) before the client
registers:

* no record, or one that is not ``ready``/``draining``: the id is free;
* a record of a client running in this process: :class:`~framepipe.errors.ConfigError` at once;
* a record written in this host's and this process's pid namespace (:func:`pid_namespace`) by
  a process that is gone (a pid that no longer runs; or this process's own pid, written by an
  earlier life of it): free at once;
* otherwise (another host, another or an unknown pid namespace, or a pid that runs): its
  heartbeat is watched for three of its heartbeat periods (and a second): one that moves is a
  live process, and the start fails with :class:`~framepipe.errors.ConfigError` naming it; one
  that stands still is a process that died without deregistering (killed), and the id is
  taken over.

A host name and a pid alone do not tell a process: containers sharing a host name
(``network_mode: host``, a compose ``hostname:`` with replicas) each run in a pid namespace of
their own, often all as pid 1, and a pid of another namespace cannot be looked up from this
one. A restarted container gets a new pid namespace, so it waits out its earlier life's
heartbeat patience before taking its id back.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import TYPE_CHECKING, cast

from framepipe.errors import ConfigError
from framepipe.liveness import pid_gone, pid_namespace
from framepipe.logs import ComponentLogger
from framepipe.processors.fleet.field_values import as_int, as_period, text
from framepipe.processors.fleet.keys import Keys, ProcessorState

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = ["RUNNING", "claim", "pid_namespace"]

RUNNING: set[str] = set()
"""The ``instance`` tokens of the clients running in this process."""

_LIVE_STATES = (ProcessorState.READY, ProcessorState.DRAINING)


def _in_use(processor_id: str, pid: int, host: str, why: str) -> ConfigError:
    return ConfigError(
        f"processor id {processor_id!r} is in use by pid {pid or '?'} on host {host or '?'} "
        f"({why}): give each process its own id (--id, PROCESSOR_ID); two processes under "
        "one id take each other's frames, and the first to stop removes the other's "
        "registration"
    )


async def claim(
    redis: Redis, keys: Keys, processor_id: str, instance: str, log: ComponentLogger
) -> None:
    """Return once ``processor_id`` may be registered by the client ``instance``; raise
    :class:`ConfigError` when a live process holds it (see the module docstring)."""
    key = keys.proc(processor_id)
    record = cast("dict[bytes, bytes]", await redis.hgetall(key))
    if text(record.get(b"state")) not in _LIVE_STATES:
        return
    holder = text(record.get(b"instance"))
    if holder == instance:
        return
    pid = as_int(record.get(b"pid"), 0)
    host = text(record.get(b"host"))
    if holder in RUNNING:
        raise _in_use(processor_id, pid, host, "a client running in this process")
    namespace = text(record.get(b"pidns"))
    here = host == socket.gethostname() and namespace != "" and namespace == pid_namespace()
    if here and pid == os.getpid():
        return  # an earlier life of this process
    if here and pid and pid_gone(pid):
        return
    period = max(0.1, as_period(record.get(b"health_interval"), 5.0))
    patience = 3.0 * period + 1.0
    seen = record.get(b"last_heartbeat")
    log.warning(
        "Processor id %r is registered by pid %s on host %s; watching its heartbeat for up "
        "to %.0fs before taking the id over (it died without deregistering, or another "
        "process runs with this id)",
        processor_id,
        pid or "?",
        host or "?",
        patience,
    )
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        await asyncio.sleep(min(0.25, period / 4))
        state, beat = await redis.hmget(key, ["state", "last_heartbeat"])
        if text(state) not in _LIVE_STATES:
            return
        if beat != seen:
            raise _in_use(processor_id, pid, host, "its heartbeats go on")
    log.info("Processor id %r: its earlier holder is silent; taking the id over", processor_id)
