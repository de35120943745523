"""``GET /api/processors``: the processors registered on the broker's Redis."""

from typing import Any

from framepipe.errors import MissingDependencyError
from framepipe.server.state import Service

try:
    from fastapi import APIRouter
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["router"]

router = APIRouter(tags=["processors"])
"""Included under ``/api``."""


@router.get("/processors")
async def processors_list(service: Service) -> list[dict[str, Any]]:
    """Processors registered on the broker's Redis, with capacity and health."""
    registry = service.registry
    if registry is None:
        return []
    return [
        p.to_dict() | {"healthy": p.state == "ready" and p.circuit == "closed"}
        for p in registry.processors(include_departed=False)
    ]
