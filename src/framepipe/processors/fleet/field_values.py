"""Values read from fields of entries and records that anyone with access to Redis may have
written: text, whole numbers, heartbeat periods and JSON.

Guarantees: none of these raises on any bytes except :func:`read_json` (and then only
:class:`BadEntryError`, naming the field and what was wrong); :func:`text` replaces bad UTF-8,
:func:`as_int` and :func:`as_period` fall back to the caller's default, and a period never
exceeds :data:`MAX_PERIOD`. No Redis, no connection: only parsing.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["MAX_PERIOD", "BadEntryError", "as_int", "as_period", "read_json", "text"]


def text(value: bytes | str | None) -> str:
    """A field's value as text ("" for a missing one; bad UTF-8 replaced)."""
    if value is None:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


MAX_PERIOD = 300.0
"""The longest heartbeat period (seconds) a record may state, and a client may beat at. The
registry declares a processor dead after three of its periods of silence and a newcomer
watches a record for three of them before taking its id over: a record written by hand with a
huge period (``1e300``) would otherwise keep a dead processor routable, and its id held, for
ever. A period above it reads as no period (:func:`as_period`)."""


def as_period(value: bytes | None, default: float) -> float:
    """A record's period in seconds (``health_interval``); ``default`` when missing, not a
    number, not positive or above :data:`MAX_PERIOD` (a record written by hand must not make
    its holder immortal, nor keep a newcomer watching it forever)."""
    try:
        period = float(value) if value else default
    except ValueError:
        return default
    return period if 0 < period <= MAX_PERIOD else default


def as_int(value: bytes | None, default: int) -> int:
    """A field's value as an int; ``default`` when missing, empty or not a number."""
    try:
        return int(value) if value else default
    except ValueError:
        return default


class BadEntryError(ValueError):
    """An entry read from Redis that cannot be read: a frame entry that cannot be handled
    (reported as an ``input`` error), or a field of a result entry or a record that is not
    the JSON it should hold (:func:`read_json`)."""


def read_json(raw: bytes | str, what: str) -> Any:
    """The JSON value of field ``what`` of an entry or record written by anyone with access
    to Redis. Whatever the bytes, the only error is :class:`BadEntryError` naming ``what`` and
    why: not UTF-8, not JSON, or nested too deeply for the parser (which would otherwise
    raise :class:`RecursionError` out of whatever task read the entry)."""
    try:
        return json.loads(raw.decode("utf-8") if isinstance(raw, bytes) else raw)
    except RecursionError:
        raise BadEntryError(f"{what} is JSON nested too deeply to be read") from None
    except UnicodeDecodeError as exc:
        raise BadEntryError(
            f"{what} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None
    except ValueError as exc:
        raise BadEntryError(f"{what} is not JSON ({exc}): {text(raw[:200])!r}") from None
