"""Step keys: ``name`` for a step without parameters, ``name:param_hash`` for an instance.

The hash is content-addressed from the canonical JSON of the parameters, so the same step with
the same parameters always has the same key, in every process and run.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

__all__ = ["canonical_json", "is_step_key", "step_key", "validate_step_name"]

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,199}$")


def validate_step_name(name: str) -> str:
    """Return ``name`` if it can name a step or pipeline (letters, digits, ``_ . -``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"invalid name {name!r}: use letters, digits, '_', '.', '-' and start with a letter"
        )
    return name


def canonical_json(value: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces, no NaN); raises TypeError/ValueError."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def step_key(name: str, params: dict[str, Any] | None = None) -> str:
    """The key of step ``name`` with ``params``; raises TypeError for unserialisable params."""
    if not params:
        return name
    digest = hashlib.blake2b(canonical_json(params).encode(), digest_size=6).hexdigest()
    return f"{name}:{digest}"


def is_step_key(ref: str) -> bool:
    """True for an instance key (``name:hash``), False for a bare step name."""
    return ":" in ref
