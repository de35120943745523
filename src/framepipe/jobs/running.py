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
  with its completion and never for a failed attempt.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from framepipe.errors import StepCancelledError
from framepipe.jobs.outcomes import check_output

if TYPE_CHECKING:
    from framepipe.jobs.context import StepContext
    from framepipe.jobs.pipeline import Step

__all__ = ["Ran", "run_attempt", "run_attempt_async"]


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


def run_attempt(step: Step, ctx: StepContext, *, output_limit: int) -> Ran:
    """Run a plain step function with ``ctx`` and its parameters (call it in a thread)."""
    try:
        return _finished(ctx, step.fn(ctx, **ctx.params), output_limit)
    except BaseException as exc:  # the step's error, whatever it is, is the attempt's outcome
        return Ran(error=exc)
    finally:
        ctx._cleanup()


async def run_attempt_async(step: Step, ctx: StepContext, *, output_limit: int) -> Ran:
    """Run an ``async def`` step with ``ctx`` and its parameters on the running loop."""
    try:
        return _finished(ctx, await step.fn(ctx, **ctx.params), output_limit)
    except asyncio.CancelledError:
        return Ran(
            error=StepCancelledError(
                "cancelled",
                pipeline=ctx.pipeline.name,
                step_key=ctx.step_key,
                execution_id=ctx.execution_id,
            )
        )
    except BaseException as exc:
        return Ran(error=exc)
    finally:
        ctx._cleanup()
