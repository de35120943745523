"""Processors: the processor contract (``base``), model adapters, dlib faces and the Redis fleet.

Model adapters (:class:`ModelAdapter`, :class:`PythonModel`, :class:`SubprocessModel`,
:class:`HttpModel`, :class:`MockModel`, :func:`as_step_progress`)
live in :mod:`framepipe.processors.adapters`, also imported on first use.

Remote processors (:class:`ProcessorClient`, :class:`ProcessorRegistry`,
:class:`RemoteProcessor`: the fleet, :mod:`framepipe.processors.fleet`) need the ``redis``
extra (``pip install 'framepipe[redis]'``); they are imported on first use, so the rest works
without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from framepipe.processors.base import FunctionProcessor, Processor, as_processor

if TYPE_CHECKING:
    from framepipe.processors.adapters import (
        HttpModel,
        MockModel,
        ModelAdapter,
        ModelProcessor,
        ModelResult,
        OnnxModel,
        PythonModel,
        SubprocessModel,
        as_step_progress,
    )
    from framepipe.processors.fleet import (
        ProcessorClient,
        ProcessorInfo,
        ProcessorRegistry,
        ProcessorResult,
        RemoteProcessor,
    )

__all__ = [
    "FunctionProcessor",
    "HttpModel",
    "MockModel",
    "ModelAdapter",
    "ModelProcessor",
    "ModelResult",
    "OnnxModel",
    "Processor",
    "ProcessorClient",
    "ProcessorInfo",
    "ProcessorRegistry",
    "ProcessorResult",
    "PythonModel",
    "RemoteProcessor",
    "SubprocessModel",
    "as_processor",
    "as_step_progress",
]

_LAZY = {
    "HttpModel": "framepipe.processors.adapters",
    "MockModel": "framepipe.processors.adapters",
    "ModelAdapter": "framepipe.processors.adapters",
    "ModelProcessor": "framepipe.processors.adapters",
    "OnnxModel": "framepipe.processors.adapters",
    "ModelResult": "framepipe.processors.adapters",
    "PythonModel": "framepipe.processors.adapters",
    "SubprocessModel": "framepipe.processors.adapters",
    "as_step_progress": "framepipe.processors.adapters",
    "ProcessorClient": "framepipe.processors.fleet",
    "ProcessorInfo": "framepipe.processors.fleet",
    "ProcessorRegistry": "framepipe.processors.fleet",
    "ProcessorResult": "framepipe.processors.fleet",
    "RemoteProcessor": "framepipe.processors.fleet",
}


def __getattr__(name: str) -> Any:
    """Import the Redis-backed names (they need the ``redis`` extra) and the model adapters
    on first use."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
