"""The live pipelines' Prometheus metrics, as ``/metrics`` and ``App.metrics_text`` render them."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from framepipe import App, PatternSource, Settings, Stage, StreamPipeline
from framepipe.errors import ConfigError


def test_any_pipeline_name_keeps_the_exposition_valid_for_every_pipeline(tmp_path: Path) -> None:
    """A name made from a file name that is not UTF-8 (``os.fsdecode`` gives a lone
    surrogate) and one with a quote, a backslash and a newline: the scrape still renders,
    parses, and holds every pipeline's metrics."""
    latin1 = os.fsdecode(b"caf\xe9")  # 'caf\udce9'
    odd = 'dock "7"\\\nnorth'
    app = App("names", settings=Settings(home=tmp_path))

    async def add_all() -> None:
        for name in (latin1, odd, "plain"):
            pipeline = StreamPipeline(
                name, PatternSource(name, fps=5), stages=[Stage(lambda f: f, name="noop")]
            )
            await app.add(pipeline)

    asyncio.run(add_all())
    text = app.metrics_text()
    scores = {
        sample.labels["pipeline"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "framepipe_performance_score"
        for sample in family.samples
    }
    assert scores == {"caf\\udce9": 1.0, odd: 1.0, "plain": 1.0}
    assert 'framepipe_source_stalls_total{pipeline="caf\\\\udce9",source="caf\\\\udce9"}' in text


def test_a_sink_whose_url_is_not_utf8_is_refused_when_built(tmp_path: Path) -> None:
    """An MQTT or Redis user name from an environment variable holding bytes that are not
    UTF-8 could never be sent (both protocols send it as UTF-8): the sink is refused when built,
    naming what is wrong and not the password, instead of failing at every reconnect; the
    app's scrape renders without it."""
    from framepipe.event_sinks import RedisEventSink
    from framepipe.mqtt import MqttEventSink

    user = os.fsdecode(b"op\xe9rateur")
    app = App("mqtt-names", settings=Settings(home=tmp_path))
    builds: list[Callable[[], object]] = [
        lambda: MqttEventSink(f"mqtt://{user}:S3cretPW@127.0.0.1:1/x"),
        lambda: RedisEventSink(f"redis://{user}:S3cretPW@127.0.0.1:1/0", "events"),
    ]
    for build in builds:
        with pytest.raises(ConfigError, match="not UTF-8") as refused:
            build()
        assert "S3cretPW" not in str(refused.value)
    assert list(text_string_to_metric_families(app.metrics_text()))
