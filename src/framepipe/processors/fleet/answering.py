"""The handling of one frame by a processor client: ``process_frame`` run in the frame's
span, its result published and acknowledged together, or, for a frame delivered
``max_attempts`` times already, the error result that gives it up.

:class:`Answering` is a layer of :class:`~framepipe.processors.fleet.client.ProcessorClient`
(see its module docstring for the guarantees).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from framepipe.processors.fleet.client_state import ClientState
from framepipe.processors.fleet.field_values import text
from framepipe.processors.fleet.frame_entries import Attempts
from framepipe.processors.fleet.handling import run_frame
from framepipe.processors.fleet.result_entries import Outcome, lost_result, result_fields
from framepipe.processors.fleet.shown import loggable
from framepipe.processors.fleet.spans import end_process_span, process_span
from framepipe.redis.streams import Fields
from framepipe.tracing import parse_traceparent

if TYPE_CHECKING:
    pass

__all__ = ["Answering"]

_RAW_HINT = (
    " (frame_data[b'image_data'] holds base64 of the image by default; pass "
    "image_encoding='raw' for the raw bytes, or use self.decode_image(frame_data))"
)


class Answering(ClientState):
    """The frames' side of a processor client (its state in :class:`ClientState`)."""

    # -- one frame ----------------------------------------------------------------------------

    async def _handle(self, mid: bytes, fields: Fields) -> None:
        started = time.perf_counter()
        traceparent = parse_traceparent(fields.get(b"trace_context"))
        span = process_span(self.processor_id, fields, traceparent)
        outcome = await run_frame(
            self.process_frame,
            mid,
            fields,
            traceparent,
            keys=self.keys,
            image_encoding=self.image_encoding,
            frame_timeout=self.frame_timeout,
            log=self.log,
            raised=self._raised,
            image_hint=_RAW_HINT if self._encoding_defaulted else "",
            span=span,
        )
        end_process_span(span, outcome)
        if outcome.ok:
            self.processed += 1
        else:
            self.failed += 1
        payload = result_fields(
            self.processor_id,
            mid,
            fields,
            outcome,
            traceparent,
            (time.perf_counter() - started) * 1000.0,
        )
        if not await self._publish(mid, fields, outcome, payload) and outcome.ok:
            self.processed -= 1  # Redis rejected its result: answered as an output error
            self.failed += 1
        self._consumer.free(mid)

    async def _give_up(self, mid: bytes, fields: Fields, attempts: Attempts) -> None:
        """Answer an entry delivered ``attempts.limit`` times already with the error result
        the registry gives such a frame, and acknowledge it: it is not run again."""
        self.failed += 1
        self.log.error(
            "Frame %s was delivered %d times (max_attempts %d) to processors that died or "
            "restarted before finishing it; giving up on it",
            loggable(fields.get(b"frame_id")),
            attempts.used,
            attempts.limit,
        )
        payload = lost_result(self.processor_id, mid, fields, attempts.used)
        outcome = Outcome(ok=False, error=text(payload["error"]), kind="lost")
        await self._publish(mid, fields, outcome, payload)

    async def _publish(
        self, mid: bytes, fields: Fields, outcome: Outcome, payload: dict[str, str | bytes]
    ) -> bool:
        """:meth:`Publisher.publish` (frames are handled only once started)."""
        assert self._publisher is not None
        return await self._publisher.publish(mid, fields, outcome, payload)
