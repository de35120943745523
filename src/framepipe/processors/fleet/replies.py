"""The reply reader: results coming back to a registry, matched to the frames it routed.

One blocking ``XREAD`` loop on the registry's own connection reads its reply stream
(``<ns>:replies:<registry id>``); each result updates the processor's circuit breaker, frees
the capacity its frame held and resolves the awaiting call (and is traced as the frame's
``result`` span: :mod:`~framepipe.processors.fleet.spans`). A result resolves only the request
that produced it: the frame in flight under its ``frame_id`` whose ``reply_token`` it echoes
(:func:`~framepipe.processors.fleet.protocol.answers`; without a token, the entry it answered).
A result nobody waits for any more (a duplicate of a re-routed frame, one whose wait expired,
the late result of an earlier request of a frame id sent again) is dropped, logged at debug
level and counted (:attr:`ReplyReader.dropped`); it only counts for the breaker.
Entries read are trimmed by the health watch (:meth:`ReplyReader.trim`), not one by one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING

from framepipe.processors.fleet.protocol import ProcessorResult, text
from framepipe.processors.fleet.spans import received
from framepipe.redis import safe_url
from framepipe.redis.connection import REDIS_DOWN
from framepipe.redis.streams import stream_entries

if TYPE_CHECKING:
    from framepipe.processors.fleet.routing import ProcessorRegistry

__all__ = ["ReplyReader"]


class ReplyReader:
    """The reply stream of one registry (its collaborator: it settles the registry's frames
    in flight)."""

    def __init__(self, registry: ProcessorRegistry) -> None:
        self.registry = registry
        self.read: bytes | str = ""
        """The id of the last reply entry read."""
        self.trimmed: bytes | str = ""
        """The id up to which the stream was trimmed."""
        self.dropped = 0
        """Results read that no request waited for (late, duplicate, or of an earlier request
        of the frame id)."""

    async def run(self) -> None:
        """Read replies until the registry closes; Redis being away is logged once and
        retried with the registry's backoff."""
        registry = self.registry
        wire = registry._replies
        assert wire is not None
        last: bytes | str = "0-0"
        failures = 0
        while not registry._closed:
            try:
                reply = await wire.execute(
                    "XREAD",
                    "COUNT",
                    500,
                    "BLOCK",
                    1000,
                    "STREAMS",
                    registry.reply_stream,
                    last,
                    block=1.0,
                )
            except REDIS_DOWN as exc:
                if registry._closed:
                    return
                failures += 1
                if failures == 1:
                    registry.log.warning(
                        "reply stream: Redis at %s unreachable (%s); retrying",
                        safe_url(registry.redis_url),
                        exc,
                    )
                await asyncio.sleep(registry.backoff.delay(failures))
                continue
            if failures:
                registry.log.info("reply stream: Redis reachable again")
                failures = 0
            if reply:
                for mid, fields in stream_entries(reply):
                    last = self.read = mid
                    if fields is not None:
                        self.on_reply(fields)

    def on_reply(self, fields: Mapping[bytes, bytes]) -> None:
        """Take one reply entry."""
        registry = self.registry
        try:
            result = ProcessorResult.from_fields(fields)
        except (ValueError, TypeError) as exc:
            registry.log.warning("malformed entry on the reply stream ignored: %s", exc)
            return
        proc = registry._procs.get(result.processor_id)
        if proc is not None:
            proc.breaker.record(result.ok, result.error_kind, result.error)
        track = registry._routed.get(result.frame_id)
        if track is None or not track.answered_by(result):
            # a duplicate (re-routed frame), one whose wait expired, or an earlier request's
            self.dropped += 1
            registry.log.debug(
                "result of frame %s from %s (entry %s) dropped: no request waits for it",
                result.frame_id,
                result.processor_id,
                result.entry_id,
            )
            return
        registry._release(track)
        received(result, track)
        if track.future is not None and not track.future.done():
            track.future.set_result(result)

    async def trim(self) -> None:
        """Remove the reply entries already read (once per health tick rather than an XDEL
        per batch on the hot path); MAXLEN ~ 10,000 on every reply bounds it meanwhile."""
        read = self.read
        if not read or read == self.trimmed:
            return
        ms, _, seq = text(read).partition("-")
        await self.registry._require().xtrim(
            self.registry.reply_stream, minid=f"{ms}-{int(seq or 0) + 1}"
        )
        self.trimmed = read
