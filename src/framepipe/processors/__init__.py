"""Processors: units of work applied to frames (live stages) or items (jobs).

Remote processors (:class:`ProcessorClient`, :class:`ProcessorRegistry`,
:class:`RemoteProcessor`) need the ``redis`` extra (``pip install 'framepipe[redis]'``); they
are imported on first use, so the rest works without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from framepipe.processors.base import FunctionProcessor, Processor, as_processor

if TYPE_CHECKING:
    from framepipe.processors.client import ProcessorClient
    from framepipe.processors.registry import ProcessorInfo, ProcessorRegistry, ProcessorResult
    from framepipe.processors.remote import RemoteProcessor

__all__ = [
    "FunctionProcessor",
    "Processor",
    "ProcessorClient",
    "ProcessorInfo",
    "ProcessorRegistry",
    "ProcessorResult",
    "RemoteProcessor",
    "as_processor",
]

_LAZY = {
    "ProcessorClient": "framepipe.processors.client",
    "ProcessorInfo": "framepipe.processors.registry",
    "ProcessorRegistry": "framepipe.processors.registry",
    "ProcessorResult": "framepipe.processors.registry",
    "RemoteProcessor": "framepipe.processors.remote",
}


def __getattr__(name: str) -> Any:
    """Import the Redis-backed names on first use (they need the ``redis`` extra)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
