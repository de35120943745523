"""``GET /api/pipelines``: the pipelines this service may start; ``GET
/api/pipelines/step-durations``: how long their steps took lately (the dashboard's bar charts).
"""

import asyncio
from typing import Annotated, Any

import sqlalchemy as sa

from framepipe.backends.state import StateStore
from framepipe.backends.state.schema import executions, steps
from framepipe.errors import MissingDependencyError
from framepipe.server.state import Service

try:
    from fastapi import APIRouter, Query
    from pydantic import BaseModel, Field
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["router"]

router = APIRouter(tags=["pipelines"])
"""Included under ``/api``."""


@router.get("/pipelines")
async def pipelines_list(service: Service) -> list[dict[str, Any]]:
    """The pipelines this service may start."""
    return [
        {
            "name": p.name,
            "ref": p.ref,
            "description": p.description,
            "steps": [
                {
                    "name": s.name,
                    "depends_on": list(s.depends_on),
                    "params": list(s.params),
                    "retries": s.retries,
                    "weight": s.weight,
                }
                for s in p.steps.values()
            ],
        }
        for p in service.pipelines.values()
    ]


class StepDuration(BaseModel):
    """How long one step of a pipeline took in its newest completed executions."""

    name: str
    count: int = Field(description="Completed runs of the step counted.")
    mean_s: float
    max_s: float
    last_s: float = Field(description="In the newest of those executions.")


class PipelineDurations(BaseModel):
    """The step durations of one job pipeline."""

    pipeline: str
    executions: int = Field(description="Completed executions counted (the newest ones).")
    steps: list[StepDuration]


def _durations(store: StateStore, per_pipeline: int) -> list[PipelineDurations]:
    newest = (
        sa.select(executions.c.id, executions.c.pipeline, executions.c.created_at)
        .where(executions.c.status == "completed")
        .order_by(executions.c.created_at.desc())
        .limit(per_pipeline * 20)
    ).subquery()
    query = (
        sa.select(
            newest.c.pipeline, newest.c.id, steps.c.name, steps.c.started_at, steps.c.finished_at
        )
        .select_from(newest.join(steps, steps.c.execution_id == newest.c.id))
        .where(
            steps.c.status == "completed",
            steps.c.started_at.is_not(None),
            steps.c.finished_at.is_not(None),
        )
        .order_by(newest.c.created_at.desc(), newest.c.id, steps.c.seq)
    )
    by_pipeline: dict[str, dict[str, list[float]]] = {}
    counted: dict[str, set[str]] = {}
    with store.read() as conn:
        for pipeline, execution_id, name, started, finished in conn.execute(query):
            seen = counted.setdefault(pipeline, set())
            if execution_id not in seen and len(seen) >= per_pipeline:
                continue
            seen.add(execution_id)
            by_pipeline.setdefault(pipeline, {}).setdefault(name, []).append(
                max(0.0, finished - started)
            )
    return [
        PipelineDurations(
            pipeline=pipeline,
            executions=len(counted[pipeline]),
            steps=[
                StepDuration(
                    name=name,
                    count=len(times),
                    mean_s=round(sum(times) / len(times), 4),
                    max_s=round(max(times), 4),
                    last_s=round(times[0], 4),
                )
                for name, times in named.items()
            ],
        )
        for pipeline, named in sorted(by_pipeline.items())
    ]


@router.get("/pipelines/step-durations")
async def pipelines_step_durations(
    service: Service,
    per_pipeline: Annotated[int, Query(alias="executions", ge=1, le=100)] = 20,
) -> list[PipelineDurations]:
    """Per job pipeline, how long each step took in its newest ``executions`` completed
    executions (mean, max, newest), steps in the order they ran."""
    return await asyncio.to_thread(_durations, service.store, per_pipeline)
