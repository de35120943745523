"""``GET /api/pipelines``: the pipelines this service may start; ``GET
/api/pipelines/step-durations``: how long their steps took lately (the dashboard's bar charts).
"""

from typing import Annotated, Any

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


def _durations(rows: list[tuple[str, str, str, float]]) -> list[PipelineDurations]:
    by_pipeline: dict[str, dict[str, list[float]]] = {}
    counted: dict[str, set[str]] = {}
    for pipeline, execution_id, name, seconds in rows:
        counted.setdefault(pipeline, set()).add(execution_id)
        by_pipeline.setdefault(pipeline, {}).setdefault(name, []).append(seconds)
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
    return _durations(await service.jobs.step_durations(per_pipeline))
