"""How a step's result or exception becomes what the store keeps, and whether a failed step
runs again and when: the rules the embedded engine and the workers share."""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from framepipe.backoff import Backoff
from framepipe.errors import (
    ConfigError,
    InvalidInputError,
    MissingDependencyError,
    PipelineDefinitionError,
    StepOutputError,
)
from framepipe.jobs.keys import canonical_json
from framepipe.untrusted import storable_text
from framepipe.urls import safe_text

if TYPE_CHECKING:
    from framepipe.config import Settings
    from framepipe.jobs.pipeline import Step

__all__ = ["NO_RETRY", "RetryPolicy", "check_output", "error_text", "is_permanent"]


def is_permanent(exc: BaseException) -> bool:
    """True for a failure that no retry can mend: an output that cannot be stored, a pipeline
    definition error, inputs that are invalid, a setting that is missing or invalid, an
    optional dependency that is not installed (a resume after the fix runs the step again)."""
    return isinstance(
        exc,
        (
            StepOutputError,
            PipelineDefinitionError,
            InvalidInputError,
            ConfigError,
            MissingDependencyError,
        ),
    )


@dataclass(frozen=True)
class RetryPolicy:
    """Whether a failed step runs again, and after how long; one rule for both modes.

    A step is retried while its failures number at most ``retries`` and the failure is not
    :func:`permanent <is_permanent>`. The delay before retry ``n`` is exponential with
    jitter, starting at the step's ``retry_delay`` (else the setting ``retry_initial_delay``)
    and never above the setting ``retry_max_delay``, even when the step's own first delay is
    longer: the setting is the operator's cap."""

    retries: int
    backoff: Backoff

    @classmethod
    def of(
        cls, step: Step | None, settings: Settings, *, retries: int | None = None
    ) -> RetryPolicy:
        """The policy of ``step`` under ``settings`` (``retries`` overrides the step's)."""
        initial = (
            step.retry_delay
            if step is not None and step.retry_delay is not None
            else settings.retry_initial_delay
        )
        count = retries if retries is not None else (step.retries if step is not None else 0)
        return cls(count, Backoff(initial=initial, maximum=settings.retry_max_delay))

    def retries_after(
        self, failures: int, exc: BaseException | None = None, *, permanent: bool = False
    ) -> bool:
        """True when a step that has now failed ``failures`` times runs again."""
        if permanent or (exc is not None and is_permanent(exc)):
            return False
        return failures <= self.retries

    def delay(self, failures: int) -> float:
        """Seconds to wait before the retry that follows failure number ``failures``."""
        return self.backoff.delay(failures)


NO_RETRY = RetryPolicy(0, Backoff())
"""The policy of an attempt that must not run again (a step this worker cannot load)."""


def error_text(exc: BaseException) -> str:
    """``Type: message``, a blank line, then the traceback: the error stored for a failed
    attempt, in both modes. Never raises: an exception whose ``str()`` (or traceback) cannot
    be read is named with that failure instead. Always storable: a lone surrogate or a NUL in
    the message (a file name from ``os.listdir``, bytes decoded as text) is escaped by
    :func:`~framepipe.jobs.storable.storable_text`, so no step's error can fail the commit
    that records it. Never a password: a URL in the message or the traceback (a database
    driver's "could not connect to postgresql://app:pw@db") is shown by
    :func:`~framepipe.urls.safe_text`, in the records, the events and the log alike."""
    try:
        message = str(exc)
    except Exception as broken:
        message = f"<its message could not be read: {type(broken).__name__}>"
    head = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    try:
        tb = "".join(traceback.format_exception(exc)).rstrip()
    except Exception as broken:
        tb = f"<its traceback could not be read: {type(broken).__name__}>"
    return storable_text(safe_text(f"{head}\n\n{tb}"))


def check_output(
    result: Any, *, pipeline: str, step_key: str, execution_id: str, limit: int
) -> dict[str, Any]:
    """A step's return value as the dict to store and to merge into later steps'
    ``ctx.data``: a fresh copy parsed back from its canonical JSON, so both modes see the same
    values (string keys, lists for tuples, nothing shared with the step's own objects), as a
    worker or a resumed execution reads them from the store. Raises
    :class:`StepOutputError` for anything but a JSON-serialisable dict (or None) of at most
    ``limit`` bytes of JSON encoded as UTF-8."""
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise StepOutputError(
            f"returned {type(result).__name__}; a step returns a dict "
            "(merged into the execution's data) or None",
            pipeline=pipeline,
            step_key=step_key,
            execution_id=execution_id,
        )
    try:
        text = canonical_json(result)
    except (TypeError, ValueError) as exc:
        bad = next((k for k, v in result.items() if not _serialisable(k, v)), None)
        where = f" (key {bad!r}: {type(result[bad]).__name__})" if bad is not None else ""
        raise StepOutputError(
            f"returned a value that is not JSON-serialisable{where}: {exc}",
            pipeline=pipeline,
            step_key=step_key,
            execution_id=execution_id,
        ) from exc
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > limit:
        raise StepOutputError(
            f"returned {size} bytes of JSON, more than the {limit}-byte "
            "limit: store paths, not contents",
            pipeline=pipeline,
            step_key=step_key,
            execution_id=execution_id,
        )
    parsed: dict[str, Any] = json.loads(text)
    return parsed


def _serialisable(key: Any, value: Any) -> bool:
    try:
        canonical_json({key: value})
    except (TypeError, ValueError):
        return False
    return True
