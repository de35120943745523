"""Processors: units of work applied to frames (live stages) or items (jobs)."""

from framepipe.processors.base import FunctionProcessor, Processor, as_processor

__all__ = ["FunctionProcessor", "Processor", "as_processor"]
