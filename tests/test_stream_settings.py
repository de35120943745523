"""A pipeline refused for its settings takes nothing over: the source it was given keeps
announcing its events (``source.emit``) to the pipeline that runs it."""

from __future__ import annotations

from typing import Any

import pytest

from framepipe.processors import Processor
from framepipe.sources import PatternSource
from framepipe.stream import Stage, StreamPipeline


class Passthrough(Processor):
    name = "tag"

    def process(self, frame: Any) -> Any:
        return frame


@pytest.mark.parametrize(
    ("settings", "refusal"),
    [
        ({"stages": [Stage(Passthrough()), Stage(Passthrough())]}, "stage names must be unique"),
        ({"performance_window": 0}, "performance_window must be > 0, got 0"),
        ({"max_restarts": -1}, "max_restarts must be >= 0 or None, got -1"),
        ({"teardown_timeout": 0}, "teardown_timeout must be > 0, got 0"),
    ],
)
def test_a_refused_pipeline_leaves_the_sources_events_to_its_pipeline(
    settings: dict[str, Any], refusal: str
) -> None:
    source = PatternSource("cam-1", count=1)
    heard: list[tuple[str, dict[str, Any]]] = []
    StreamPipeline("running", source, on_event=lambda kind, data: heard.append((kind, data)))

    with pytest.raises(ValueError, match=refusal):
        StreamPipeline("refused", source, **settings)

    assert source.emit is not None
    source.emit("capture_changed", capture="ffmpeg")
    assert heard == [
        (
            "source.capture_changed",
            {"capture": "ffmpeg", "pipeline": "running", "source_id": "cam-1"},
        )
    ]


class CountsSetups(Processor):
    name = "model"

    def __init__(self) -> None:
        super().__init__()
        self.setups = 0

    def setup(self) -> None:
        self.setups += 1

    def process(self, frame: Any) -> Any:
        return frame


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        ({"stall_timeout": 0}, "stall_timeout must be > 0 or None, got 0"),
        ({"start_timeout": -1.0}, "start_timeout must be > 0 or None, got -1.0"),
        ({"healthy_after": -1.0}, "healthy_after must be >= 0, got -1.0"),
        ({"retry_delay": 0}, "retry_delay must be > 0 or None, got 0"),
    ],
)
def test_a_capture_setting_it_cannot_supervise_refuses_the_pipeline_when_made(
    setting: dict[str, Any], refusal: str
) -> None:
    """Refused when made, not at ``start()`` once its stages are set up and running (a run
    left half started: its models loaded, its tasks running, nothing to end them)."""
    model = CountsSetups()
    with pytest.raises(ValueError, match=refusal):
        StreamPipeline("cam", PatternSource("cam-1", count=1), [Stage(model)], **setting)
    assert model.setups == 0
