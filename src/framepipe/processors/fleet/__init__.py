"""The processor fleet: services registered on Redis, and the registry routing frames to them."""

from __future__ import annotations

from framepipe.errors import MissingDependencyError

try:
    import redis  # noqa: F401 - checked here so that every module of the fleet says the same
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise MissingDependencyError("redis", "redis", "Remote processors") from _exc

from framepipe.processors.fleet.breaker import CircuitState
from framepipe.processors.fleet.client import ProcessorClient
from framepipe.processors.fleet.frame_entries import Routable, decode_image_data, frame_entry
from framepipe.processors.fleet.keys import (
    DEFAULT_NAMESPACE,
    DEFAULT_REDIS_URL,
    Keys,
    ProcessorState,
)
from framepipe.processors.fleet.registry import ProcessorInfo
from framepipe.processors.fleet.remote import RemoteProcessor
from framepipe.processors.fleet.result_entries import ProcessorResult
from framepipe.processors.fleet.routing import ProcessorRegistry

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_REDIS_URL",
    "CircuitState",
    "Keys",
    "ProcessorClient",
    "ProcessorInfo",
    "ProcessorRegistry",
    "ProcessorResult",
    "ProcessorState",
    "RemoteProcessor",
    "Routable",
    "decode_image_data",
    "frame_entry",
]
