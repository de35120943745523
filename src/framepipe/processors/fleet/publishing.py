"""A processor's results going out: each one published, and its frame entry acknowledged, in
one script (:data:`~framepipe.redis.scripts.PUBLISH`): to the processor's result stream (unless
the frame gave nothing to publish) and to the reply stream of the router that sent it. A
``reply_to`` that is not a reply stream of the processor's namespace is never written to
(:meth:`~framepipe.processors.fleet.protocol.Keys.reply_stream_of`; the frame's result is then
an ``input`` error, on the result stream only).

A frame entry is thus acknowledged only once its result is out; while Redis is away or
refuses the write (:func:`~framepipe.processors.fleet.outages.unavailable`: ``OOM`` at
``maxmemory``, ``LOADING``, ``READONLY`` ..., logged at once then once per 10 s) the script is
retried with backoff, and a handling cancelled meanwhile (the shutdown timeout) leaves its
entry pending, to be re-routed.
"""

from __future__ import annotations

import asyncio

from framepipe.backoff import Backoff
from framepipe.logs import ComponentLogger, Repeats
from framepipe.processors.fleet.outages import REDIS_ERRORS, refusal, unavailable
from framepipe.processors.fleet.protocol import GROUP, BadEntryError, Fields, Keys, Outcome
from framepipe.redis.scripts import PUBLISH
from framepipe.redis.wire import Wire

__all__ = ["Publisher"]


class Publisher:
    """The results of processor ``processor_id`` (consumer of ``stream``, in the namespace of
    ``keys``), published on ``wire`` (its own connection) until :meth:`close`."""

    def __init__(
        self,
        wire: Wire,
        keys: Keys,
        processor_id: str,
        stream: str,
        result_stream: str,
        result_maxlen: int | None,
        backoff: Backoff,
        log: ComponentLogger,
    ) -> None:
        self.wire: Wire | None = wire
        """The connection it publishes on (None once closed)."""
        self.keys = keys
        self.processor_id = processor_id
        self.stream = stream
        self.result_stream = result_stream
        self.result_maxlen = result_maxlen
        self.backoff = backoff
        self.log = log
        self._refusals = Repeats()  # a refusal is logged at once, then once per 10 s

    async def publish(
        self, mid: bytes, fields: Fields, outcome: Outcome, payload: dict[str, str | bytes]
    ) -> None:
        """Publish and acknowledge atomically; retry while Redis is away (the entry stays
        pending if this task is cancelled at shutdown)."""
        try:
            reply_to = self.keys.reply_stream_of(fields)
        except BadEntryError:  # its handling made that an input error; results stream only
            reply_to = None
        to_results = outcome.result_json is not None or not outcome.ok
        args: list[str | bytes] = [
            GROUP,
            mid,
            "" if self.result_maxlen is None else str(self.result_maxlen),
            "1" if to_results else "0",
            "1" if reply_to else "0",
        ]
        for key, value in payload.items():
            args += [key, value]
        attempt = 0
        while True:
            wire = self.wire
            if wire is None:
                raise RuntimeError(f"processor {self.processor_id!r} is not running")
            try:
                acked = await wire.run(
                    PUBLISH, self.stream, self.result_stream, reply_to or self.stream, *args, keys=3
                )
            except REDIS_ERRORS as exc:
                if not unavailable(exc):
                    raise
                attempt += 1
                delay = self.backoff.delay(attempt)
                code = refusal(exc)
                held = None if code is None else self._refusals.admit(code)
                if held is not None:  # Redis answers, and refuses: the operator must know
                    self.log.warning(
                        "publishing the result of %s refused by Redis (%s: %s); the frame "
                        "stays pending, retried with backoff%s",
                        mid.decode(),
                        type(exc).__name__,
                        exc,
                        f" ({held} more refusal(s) since the last line)" if held else "",
                    )
                else:  # unreachable: the consuming loop says so
                    self.log.debug(
                        "publishing the result of %s failed (%s: %s); retry in %.1fs",
                        mid.decode(),
                        type(exc).__name__,
                        exc,
                        delay,
                    )
                await asyncio.sleep(delay)
                continue
            if acked == -1:  # the group was dropped meanwhile (Redis lost its data)
                self.log.debug(
                    "published %s; its group is gone, nothing to acknowledge", mid.decode()
                )
            return

    async def close(self) -> None:
        """Close its connection; a publication still retrying raises RuntimeError."""
        wire, self.wire = self.wire, None
        if wire is not None:
            await wire.close()
