"""A commit the state store refused for its data (not a lost connection: that is waited out,
:mod:`framepipe.jobs.transient`): the rule both modes share is that only the part the store
refuses is failed, for good, with an error that says why, and everything else is committed
and goes on.

The embedded engine commits a refused group commit again execution by execution and fails
the execution whose changes are refused; a worker commits a refused round again piece by
piece (:func:`round_pieces`) and fails the attempt a refused piece belongs to
(:func:`piece_attempt`, :func:`refused_outcome`). Both word the error with
:func:`refusal_error`, stored as the step's or the execution's error.
"""

from __future__ import annotations

from collections.abc import Callable

from framepipe.jobs.rounds import Outcome, Round, RoundResult
from framepipe.jobs.storable import brief_error
from framepipe.untrusted import storable_text

__all__ = ["merge", "piece_attempt", "refusal_error", "refused_outcome", "round_pieces"]

Attempt = tuple[str, str, int]
"""An attempt: (execution id, step key, attempt number)."""


def refusal_error(what: str, exc: BaseException) -> str:
    """The error stored for ``what`` (``"this execution's changes"``, ``"what this step
    reported"``) failed because the store refused it: storable text naming the refusal."""
    return storable_text(f"the state store refused {what}, so it was failed: {brief_error(exc)}")


def round_pieces(work: Round) -> list[Round]:
    """``work`` as rounds of one piece each (a spawn, a progress report, an outcome), spawns
    first: a spawn is fenced once its spawner's outcome is in."""
    return [
        *(Round(spawns=[s]) for s in work.spawns),
        *(Round(progress=[p]) for p in work.progress),
        *(Round(outcomes=[o]) for o in work.outcomes),
    ]


def piece_attempt(
    piece: Round, work: Round, held: Callable[[Attempt], tuple[float, float] | None]
) -> tuple[Attempt, float, float]:
    """The attempt one piece of round ``work`` belongs to, with the step's weight and its
    progress as committed before the round; for a spawn alone in ``work``, ``held`` gives
    them for an attempt the worker still runs (None: not its any more, and whatever is
    written for it is fenced)."""
    for p in piece.progress:
        return (p.execution_id, p.key, p.attempt), p.weight, p.before
    for o in piece.outcomes:
        return (o.execution_id, o.key, o.attempt), o.weight, o.before
    s = piece.spawns[0]
    ident = (s.execution_id, s.spawner, s.attempt)
    for p in work.progress:
        if (p.execution_id, p.key, p.attempt) == ident:
            return ident, p.weight, p.before
    for o in work.outcomes:
        if (o.execution_id, o.key, o.attempt) == ident:
            return ident, o.weight, o.before
    weight, before = held(ident) or (0.0, 0.0)
    return ident, weight, before


def refused_outcome(ident: Attempt, weight: float, before: float, exc: BaseException) -> Outcome:
    """The outcome that fails attempt ``ident`` for good because the store refused what it
    reported."""
    execution_id, key, attempt = ident
    return Outcome(
        execution_id=execution_id,
        key=key,
        attempt=attempt,
        kind="failed",
        weight=weight,
        before=before,
        error=refusal_error("what this step reported", exc),
        permanent=True,
    )


def merge(result: RoundResult, part: RoundResult) -> None:
    """Add what committing ``part`` gave to ``result``."""
    result.ready.extend(part.ready)
    result.claimed.extend(part.claimed)
    result.retry_at.extend(part.retry_at)
    result.fenced.extend(part.fenced)
    result.events.extend(part.events)
