"""What is read of an event sink's counts (its health and metrics): a Protocol each event sink
(:mod:`framepipe.event_sinks`, :mod:`framepipe.mqtt`) meets, so the app's health and the
Prometheus collector read them without importing the sinks."""

from __future__ import annotations

from typing import Protocol

__all__ = ["SinkCounts"]


class SinkCounts(Protocol):
    """An event sink's kind, target and counts."""

    @property
    def kind(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def written(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def failing_since(self) -> float | None: ...
