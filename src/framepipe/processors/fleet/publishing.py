"""A processor's results going out: each one published, and its frame entry acknowledged, in
one script (:data:`~framepipe.redis.scripts.PUBLISH`): to the processor's result stream (unless
the frame gave nothing to publish) and to the reply stream of the router that sent it. A
``reply_to`` that is not a reply stream of the processor's namespace is never written to
(:meth:`~framepipe.processors.fleet.keys.Keys.reply_stream_of`; the frame's result is then
an ``input`` error, on the result stream only).

A frame entry is thus acknowledged only once its result is out (or, when Redis rejects the
publication for good, such as a result stream key of another type or an ACL that does not
cover it, once its router was told so: :meth:`Publisher.publish`); while Redis is away or
refuses the write (:func:`~framepipe.processors.fleet.outages.unavailable`: ``OOM`` at
``maxmemory``, ``LOADING``, ``READONLY`` ..., logged at once then once per 10 s) the script is
retried with backoff, and a handling cancelled meanwhile (the shutdown timeout) leaves its
entry pending, to be re-routed.
"""

from __future__ import annotations

import asyncio

from framepipe.backoff import Backoff
from framepipe.logs import ComponentLogger, Repeats
from framepipe.processors.fleet.field_values import BadEntryError
from framepipe.processors.fleet.keys import GROUP, Keys
from framepipe.processors.fleet.outages import REDIS_ERRORS, refusal, unavailable
from framepipe.processors.fleet.result_entries import Outcome
from framepipe.processors.fleet.shown import loggable
from framepipe.redis.scripts import PUBLISH
from framepipe.redis.streams import Fields
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
        self._rejections = Repeats(60.0)  # so is a rejection, once a minute

    async def publish(
        self, mid: bytes, fields: Fields, outcome: Outcome, payload: dict[str, str | bytes]
    ) -> bool:
        """Publish and acknowledge atomically; retry while Redis is away or refuses (the
        entry stays pending if this task is cancelled at shutdown). False when Redis rejected
        the publication for good (a result stream of another type, an ACL without it: the
        error names it): the frame is then answered on its router's reply stream with an
        ``output`` error naming the result stream and acknowledged, or, when even that is
        rejected, acknowledged without an answer (logged), so that no frame stays pending for
        ever in the stream of a live processor."""
        try:
            reply_to = self.keys.reply_stream_of(fields)
        except BadEntryError:  # its handling made that an input error; results stream only
            reply_to = None
        to_results = outcome.result_json is not None or not outcome.ok
        attempt = 0
        rejected: BaseException | None = None
        while True:
            wire = self.wire
            if wire is None:
                raise RuntimeError(f"processor {self.processor_id!r} is not running")
            args = self._args(mid, to_results, reply_to is not None, payload)
            try:
                acked = await wire.run(
                    PUBLISH, self.stream, self.result_stream, reply_to or self.stream, *args, keys=3
                )
            except REDIS_ERRORS as exc:
                if not unavailable(exc):
                    if not to_results and reply_to is None:
                        raise  # acknowledging alone failed: not Redis's answer to a write
                    payload, to_results, reply_to = self._rejected(
                        mid, fields, exc, payload, to_results, reply_to
                    )
                    rejected = exc
                    continue
                attempt += 1
                delay = self.backoff.delay(attempt)
                self._outage(mid, exc, delay)
                await asyncio.sleep(delay)
                continue
            if acked == -1:  # the group was dropped meanwhile (Redis lost its data)
                self.log.debug(
                    "published %s; its group is gone, nothing to acknowledge", mid.decode()
                )
            return rejected is None

    def _args(
        self, mid: bytes, to_results: bool, reply: bool, payload: dict[str, str | bytes]
    ) -> list[str | bytes]:
        """:data:`~framepipe.redis.scripts.PUBLISH`'s ARGV."""
        args: list[str | bytes] = [
            GROUP,
            mid,
            "" if self.result_maxlen is None else str(self.result_maxlen),
            "1" if to_results else "0",
            "1" if reply else "0",
        ]
        for key, value in payload.items():
            args += [key, value]
        return args

    def _rejected(
        self,
        mid: bytes,
        fields: Fields,
        exc: BaseException,
        payload: dict[str, str | bytes],
        to_results: bool,
        reply_to: bytes | None,
    ) -> tuple[dict[str, str | bytes], bool, bytes | None]:
        """The next publication of entry ``mid`` after Redis rejected one with ``exc``: its
        ``output`` error on the reply stream alone, else nothing (acknowledged only)."""
        frame_id = loggable(fields.get(b"frame_id")) or "?"
        where = f"result stream {self.result_stream!r}" if to_results else "its reply stream"
        reason = f"{type(exc).__name__}: {loggable(str(exc), 300)}"
        if to_results and reply_to is not None:
            held = self._rejections.admit(f"{where} {reason[:80]}")
            if held is not None:
                self.log.error(
                    "Redis rejected the result of frame %s for the %s (%s); it is answered with "
                    "an output error on its router's reply stream and acknowledged%s",
                    frame_id,
                    where,
                    reason,
                    f" ({held} more frame(s) since the last line)" if held else "",
                )
            error = dict(payload)
            error.pop("result", None)
            error["status"] = "error"
            error["error_kind"] = "output"
            error["error"] = (
                f"processor {self.processor_id!r} could not publish the result to {where}: {reason}"
            )
            return error, False, reply_to
        held = self._rejections.admit(f"{where} {reason[:80]}")
        if held is not None:
            self.log.error(
                "Redis rejected the result of frame %s for the %s (%s); the frame is "
                "acknowledged without an answer%s",
                frame_id,
                where,
                reason,
                f" ({held} more frame(s) since the last line)" if held else "",
            )
        return payload, False, None

    def _outage(self, mid: bytes, exc: BaseException, delay: float) -> None:
        """Log a publication that Redis could not take now (see the module docstring)."""
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

    async def close(self) -> None:
        """Close its connection; a publication still retrying raises RuntimeError."""
        wire, self.wire = self.wire, None
        if wire is not None:
            await wire.close()
