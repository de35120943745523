"""How a step's result or exception becomes what the store keeps (shared by the embedded
engine and the workers)."""

from __future__ import annotations

import traceback
from typing import Any

from framepipe.errors import FramepipeError, StepOutputError
from framepipe.jobs.keys import canonical_json

__all__ = ["check_output", "error_text"]


def error_text(exc: BaseException) -> str:
    """``Type: message``, a blank line, then the traceback."""
    if isinstance(exc, FramepipeError):
        head = f"{type(exc).__name__}: {exc}"
    else:
        head = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    tb = "".join(traceback.format_exception(exc)).rstrip()
    return f"{head}\n\n{tb}"


def check_output(result: Any, *, pipeline: str, step_key: str, execution_id: str,
                 limit: int) -> dict[str, Any]:
    """A step's return value as the dict to store; raises :class:`StepOutputError` for
    anything but a JSON-serialisable dict (or None) of at most ``limit`` bytes of JSON."""
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise StepOutputError(f"returned {type(result).__name__}; a step returns a dict "
                              "(merged into the execution's data) or None",
                              pipeline=pipeline, step_key=step_key, execution_id=execution_id)
    try:
        text = canonical_json(result)
    except (TypeError, ValueError) as exc:
        bad = next((k for k, v in result.items() if not _serialisable(k, v)), None)
        where = f" (key {bad!r}: {type(result[bad]).__name__})" if bad is not None else ""
        raise StepOutputError(f"returned a value that is not JSON-serialisable{where}: {exc}",
                              pipeline=pipeline, step_key=step_key,
                              execution_id=execution_id) from exc
    if len(text) > limit:
        raise StepOutputError(f"returned {len(text)} bytes of JSON, more than the {limit}-byte "
                              "limit: store paths, not contents", pipeline=pipeline,
                              step_key=step_key, execution_id=execution_id)
    return result


def _serialisable(key: Any, value: Any) -> bool:
    try:
        canonical_json({key: value})
    except (TypeError, ValueError):
        return False
    return True
