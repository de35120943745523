"""``GET /api/pipelines``: the pipelines this service may start."""

from typing import Any

from framepipe.errors import MissingDependencyError
from framepipe.server.state import Service

try:
    from fastapi import APIRouter
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
