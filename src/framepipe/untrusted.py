"""Checks for values that come from outside: HTTP bodies, detector messages, execution inputs.

Guarantees:

* :func:`check_json` accepts exactly what every backend can store and every response can
  encode: JSON values (dict with string keys, list, str, int, float that is finite, bool,
  None), nested at most ``max_depth`` deep, with text that is valid Unicode (no lone
  surrogates such as ``"\\ud800"``) and holds no NUL character (PostgreSQL's JSONB refuses
  it). The first problem found raises :class:`~framepipe.errors.InvalidInputError` whose
  ``where`` names the field (``inputs.files[2]``), so a client can fix it;
* :func:`check_size` refuses a value whose canonical JSON is over a byte limit with
  :class:`~framepipe.errors.InputTooLargeError` naming the limit and the setting;
* :func:`storable_json` turns what code hands over (event data with a ``nan`` score, a file
  name with a lone surrogate, a ``datetime``) into a value every backend stores alike;
* :func:`dumps` never fails on text that was stored before these checks existed: a lone
  surrogate is written as its ``\\uXXXX`` escape, so one bad row cannot break a listing.
"""

from __future__ import annotations

import json
import math
from typing import Any

from framepipe.errors import InputTooLargeError, InvalidInputError

__all__ = [
    "MAX_DEPTH",
    "check_json",
    "check_size",
    "check_text",
    "dumps",
    "json_size",
    "storable_json",
    "storable_text",
]

MAX_DEPTH = 64


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return f"holds a NUL character at position {text.index(chr(0))}"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        return f"is not valid Unicode: a lone surrogate \\u{ord(bad):04x} at position {exc.start}"
    return None


def check_text(value: object, where: str, *, max_length: int | None = None) -> str:
    """``value`` if it is a string of valid Unicode without NUL (and at most ``max_length``
    characters), else :class:`InvalidInputError` naming ``where``."""
    if not isinstance(value, str):
        raise InvalidInputError(f"must be a string, not {type(value).__name__}", where=where)
    problem = _text_problem(value)
    if problem is not None:
        raise InvalidInputError(problem, where=where)
    if max_length is not None and len(value) > max_length:
        raise InvalidInputError(
            f"is {len(value)} characters long; at most {max_length}", where=where
        )
    return value


def check_json(value: Any, where: str, *, max_depth: int = MAX_DEPTH) -> None:
    """Refuse anything in ``value`` that is not storable, encodable JSON (see the module)."""
    # An explicit stack: a hostile value nested 100,000 deep must not hit Python's recursion
    # limit here, which is the very thing being refused.
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > max_depth:
            raise InvalidInputError(
                f"is nested more than {max_depth} levels deep", where=_shortened(path)
            )
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem is not None:
                raise InvalidInputError(problem, where=path)
        elif isinstance(item, dict):
            for key, child in item.items():
                if not isinstance(key, str):
                    raise InvalidInputError(
                        f"has a key of type {type(key).__name__}; keys must be strings", where=path
                    )
                problem = _text_problem(key)
                if problem is not None:
                    raise InvalidInputError(f"a key {problem}", where=path)
                stack.append((child, f"{path}.{key}", depth + 1))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise InvalidInputError(f"is {item}, which JSON cannot hold", where=path)
        elif item is not None and not isinstance(item, (bool, int)):
            raise InvalidInputError(f"is a {type(item).__name__}, which is not JSON", where=path)


def _shortened(path: str, keep: int = 120) -> str:
    """``path`` cut in its middle when longer than ``keep`` characters: a
    value nested 64 deep would otherwise be named by 64 ``[0]``."""
    if len(path) <= keep:
        return path
    return f"{path[: keep // 2]}…{path[-(keep // 4) :]}"


def json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON (what a store keeps)."""
    return len(
        json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8", "surrogatepass"
        )
    )


def check_size(value: Any, where: str, *, limit: int, setting: str) -> int:
    """The JSON size of ``value``; :class:`InputTooLargeError` if it is over ``limit`` bytes
    (the message names ``setting``, which raises the limit)."""
    size = json_size(value)
    if size > limit:
        raise InputTooLargeError(
            f"is {size} bytes of JSON, over the limit of {limit} ({setting}); store large data "
            "as objects and pass their keys",
            where=where,
        )
    return size


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> str:
    """JSON text of ``value`` that always encodes as UTF-8 and is always valid JSON:
    non-ASCII text as itself, unless a lone surrogate (stored before it was refused) forces
    ``\\uXXXX`` escapes throughout; a non-finite number (which JSON cannot hold) as null."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        value = _finite(value)
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    return text


def storable_text(text: str) -> str:
    """``text`` with every lone surrogate written as ``\\udcXX`` (its ``repr`` escape) and
    every NUL as ``\\x00``; any other text is returned unchanged (the same object). The result
    always encodes as UTF-8 and holds no NUL, so every state backend can store it."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def storable_json(value: Any) -> Any:
    """``value`` as JSON every state backend stores the same way: an object JSON cannot hold
    as its ``str``, a non-finite number as null (as :func:`dumps` writes it) and every string
    and key through :func:`storable_text`. SQLite would keep ``NaN`` and a NUL that PostgreSQL
    refuses; after this, both keep the same value."""
    plain = json.loads(json.dumps(value, default=str))
    return _storable(plain)


def _storable(value: Any) -> Any:
    if isinstance(value, str):
        return storable_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {storable_text(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(v) for v in value]
    return value
