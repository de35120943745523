"""The fleet's wire format: Redis keys, processor states, frame entries and result entries.

Frame entries (stream fields, bytes): ``frame_id``, ``camera_id``, ``timestamp`` (ISO 8601),
``image_data`` (raw JPEG bytes; base64 accepted), ``width``, ``height``, ``format``
(``jpeg``), ``metadata`` (JSON object), ``trace_context`` (W3C ``traceparent``; a JSON object
holding one is accepted) and, from the router, ``capability``, ``reply_to``, ``reply_token``,
``attempt``, ``max_attempts``, ``routed_at``, ``ttl_ms`` (and ``rerouted_from`` and
``first_entry`` after a processor died).

Deadlines (:mod:`~framepipe.processors.fleet.deadlines`): ``ttl_ms`` (optional; whole
milliseconds) is how long after the frame's first ``XADD`` its sender waits for it: a
:meth:`~framepipe.processors.fleet.routing.ProcessorRegistry.call`'s result timeout, a
``route``'s ``max_age`` (none by default). ``first_entry`` is the id of that first entry, written
by the reaper on the entry it moves from a dead processor's stream (the moved entry has an id of
its own, later). The deadline is the millisecond part of ``first_entry`` (else of the entry's
own id) plus ``ttl_ms``, on Redis's clock; a processor that reaches the entry later
acknowledges it without running it or answering it. An entry without ``ttl_ms`` has no
deadline. Processors of an older framepipe ignore both fields and run every frame, however
old; processors of this one run every frame of an older router (it writes no ``ttl_ms``).

Reply tokens: the router gives every request a ``reply_token`` of its own (new each time a
frame is routed, kept when the frame is re-routed) and the processor copies it into the
result; the router takes a result carrying a token only for the request it names
(:func:`answers`), so the late result of a request whose caller gave up is never taken for a
newer request of the same ``frame_id``.

Processors of an older framepipe (written before the tokens: they ignore the field) reply
without ``reply_token``; their results are matched by ``frame_id``. A result without a token
is taken by the request in flight under its frame id, whether or not the router knows the
entry it answered yet: a router learns an entry's id only once the ``XADD`` that wrote it
replied (a processor can answer before that), so an entry it does not know is no reason to
drop a result. Unless it is the late result of an earlier request of that frame id, one that
ended (its caller timed out, or it was answered already): a router remembers the entries
(``processor_id``, ``entry_id``) of its ended requests per frame id
(:class:`~framepipe.processors.fleet.replies.Ended`: the last 10,000 frame ids, each for 10
minutes), and a result without a token that answered one of those is dropped.

Moved entries: a reaper (of any registry) that moves a request's entry to another processor
announces the new entry on the request's reply stream, in the script that writes it, so the
announcement (:class:`Moved`, fields :func:`moved_fields` and ``entry_id``) is read before
any result of the new entry; the router takes it as one more entry of that request (the one
in flight with the announced token, or else one that ended). So an older processor's results
are all taken by the requests they answer, and its late reply to a request that timed out,
from whichever processor the request's entry was moved to by whichever registry, is dropped;
it reaches a newer request of the same frame id only once the router forgot the earlier
request's entries (after 10 minutes, or 10,000 newer frame ids).

Attempts (:class:`Attempts`): a frame's attempts are its deliveries to processors, in the
streams it was re-routed from (its ``attempt`` field minus one) and in the one it is in (the
``times_delivered`` of its pending entry). Once they reach the entry's ``max_attempts`` the
frame is given up with a :func:`lost_result` instead of being delivered again, whether the
registry re-routes it from a dead processor or a processor takes it back after a restart.

Result entries: ``frame_id``, ``camera_id``, ``processor_id``, ``capability``, ``status``
(``ok``/``error``), ``result`` (JSON), ``error``, ``error_kind``, ``trace_context`` (the
frame's, unchanged), ``duration_ms``, ``processed_at``, ``entry_id`` (the frame entry's id in
the processor's stream) and ``reply_token`` (the frame entry's, when it had one).

Keys (:class:`Keys`, named by :func:`framepipe.redis.namespaced`; ``namespace`` default
``framepipe:``): ``<ns>:processors`` (set of ids), ``<ns>:proc:<id>`` (hash),
``<ns>:proc:<id>:frames`` (the processor's stream, consumer group ``processors``),
``<ns>:replies:<registry id>`` (a router's reply stream); result streams are named by the
processor, without the namespace. A frame entry's ``reply_to`` may name only a reply stream of
the namespace (:meth:`Keys.reply_stream_of`): its answer, and the expiry it gives the key, never
reach another key.

The format is built and parsed by small modules, which need neither Redis nor a connection:
the key names and states (:mod:`~framepipe.processors.fleet.keys`), frame entries and their
attempts (:mod:`~framepipe.processors.fleet.frame_entries`), result entries and the
announcements of moved entries (:mod:`~framepipe.processors.fleet.result_entries`) and the
reading of fields anyone may have written (:mod:`~framepipe.processors.fleet.field_values`).
This module names them all in one place.
"""

from __future__ import annotations

from framepipe.processors.fleet.field_values import (
    MAX_PERIOD,
    BadEntryError,
    as_int,
    as_period,
    read_json,
    text,
)
from framepipe.processors.fleet.frame_entries import (
    DEFAULT_MAX_ATTEMPTS,
    Attempts,
    Routable,
    check_entry,
    decode_image_data,
    entry_fields,
    frame_entry,
)
from framepipe.processors.fleet.keys import (
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    GROUP,
    Keys,
    ProcessorState,
)
from framepipe.processors.fleet.result_entries import (
    Moved,
    Outcome,
    ProcessorResult,
    answers,
    lost_result,
    moved_fields,
    result_fields,
)
from framepipe.redis.streams import Fields

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_NAMESPACE",
    "DEFAULT_REDIS_URL",
    "GROUP",
    "MAX_PERIOD",
    "Attempts",
    "BadEntryError",
    "Fields",
    "Keys",
    "Moved",
    "Outcome",
    "ProcessorResult",
    "ProcessorState",
    "Routable",
    "answers",
    "as_int",
    "as_period",
    "check_entry",
    "decode_image_data",
    "entry_fields",
    "frame_entry",
    "lost_result",
    "moved_fields",
    "read_json",
    "result_fields",
    "text",
]
