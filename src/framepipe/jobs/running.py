"""Running one attempt of a step: the same code in the embedded engine and on a worker.

:func:`run_attempt` (a plain function, in a step thread) and :func:`run_attempt_async` (an
``async def`` step, on the event loop) call the step with its context and parameters and
return what happened as a :class:`Ran`. Guarantees, in both modes:

* the return value is checked in the step's own thread (:func:`~framepipe.jobs.outcomes.
  check_output`: a dict of JSON values within ``output_limit`` bytes, or None); an output
  that cannot be stored is the attempt's error, which no retry mends;
* every exception is caught and returned, never raised; an ``async`` step cancelled on the
  loop returns :class:`~framepipe.errors.StepCancelledError`;
* the attempt's temporary directories (``ctx.tempdir()``) are removed before this returns,
  whether the step succeeded or not;
* the ledger rows the step recorded are returned with a success only, so they are committed
  with its completion and never for a failed attempt;
* while OpenTelemetry tracing is on (:func:`framepipe.tracing.tracer`), the attempt is one
  span, ``step <pipeline>.<step name>``, child of its execution's submit (``traceparent``, as
  stored with the execution) and current while the step runs, with its outcome
  (``completed``, ``failed``, ``cancelled``) and its error recorded (status ERROR). This is
  the one place step spans are made, for both modes.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from framepipe import tracing
from framepipe.errors import StepCancelledError
from framepipe.jobs.outcomes import check_output

if TYPE_CHECKING:
    from framepipe.jobs.context import StepContext
    from framepipe.jobs.pipeline import Step

__all__ = ["Mode", "Ran", "run_attempt", "run_attempt_async"]

Mode = Literal["embedded", "worker"]
"""Where an attempt runs: in the embedded engine, or on a ``framepipe worker``."""


@dataclass(slots=True)
class Ran:
    """What an attempt's code did: its checked ``output`` and ``ledger_rows``, or the
    ``error`` it raised."""

    output: dict[str, Any] | None = None
    ledger_rows: list[dict[str, Any]] = field(default_factory=list)
    error: BaseException | None = None


def _finished(ctx: StepContext, result: Any, output_limit: int) -> Ran:
    output = check_output(
        result,
        pipeline=ctx.pipeline.name,
        step_key=ctx.step_key,
        execution_id=ctx.execution_id,
        limit=output_limit,
    )
    return Ran(output=output, ledger_rows=list(ctx._ledger_rows))


def _span(ctx: StepContext, mode: Mode, traceparent: str | None) -> Any | None:
    if tracing.tracer() is None:
        return None
    return tracing.start_span(
        f"step {ctx.pipeline.name}.{ctx.step_name}",
        parent=traceparent,
        attributes={
            "framepipe.pipeline": ctx.pipeline.name,
            "framepipe.execution_id": ctx.execution_id,
            "framepipe.step_key": ctx.step_key,
            "framepipe.attempt": ctx.attempt,
            "framepipe.mode": mode,
        },
    )


def _end_span(span: Any | None, ran: Ran) -> Ran:
    if span is not None:
        error = ran.error
        outcome = (
            "completed"
            if error is None
            else "cancelled"
            if isinstance(error, StepCancelledError)
            else "failed"
        )
        tracing.end_span(span, error, {"framepipe.outcome": outcome})
    return ran


def run_attempt(
    step: Step,
    ctx: StepContext,
    *,
    output_limit: int,
    mode: Mode = "embedded",
    traceparent: str | None = None,
) -> Ran:
    """Run a plain step function with ``ctx`` and its parameters (call it in a thread)."""
    span = _span(ctx, mode, traceparent)
    token = tracing.activate(span)
    try:
        ran = _finished(ctx, step.fn(ctx, **ctx.params), output_limit)
    except BaseException as exc:  # the step's error, whatever it is, is the attempt's outcome
        ran = Ran(error=exc)
    finally:
        ctx._cleanup()
        tracing.deactivate(token)
    return _end_span(span, ran)


async def run_attempt_async(
    step: Step,
    ctx: StepContext,
    *,
    output_limit: int,
    mode: Mode = "embedded",
    traceparent: str | None = None,
) -> Ran:
    """Run an ``async def`` step with ``ctx`` and its parameters on the running loop."""
    span = _span(ctx, mode, traceparent)
    token = tracing.activate(span)
    try:
        ran = _finished(ctx, await step.fn(ctx, **ctx.params), output_limit)
    except asyncio.CancelledError:
        ran = Ran(
            error=StepCancelledError(
                "cancelled",
                pipeline=ctx.pipeline.name,
                step_key=ctx.step_key,
                execution_id=ctx.execution_id,
            )
        )
    except BaseException as exc:
        ran = Ran(error=exc)
    finally:
        ctx._cleanup()
        tracing.deactivate(token)
    return _end_span(span, ran)
