"""The live pipelines' Prometheus metrics, as ``/metrics`` and ``App.metrics_text`` render them."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from framepipe import App, PatternSource, Settings, Stage, StreamPipeline


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


def test_an_mqtt_sink_whose_url_is_not_utf8_keeps_the_exposition_valid(tmp_path: Path) -> None:
    """An MQTT user name from an environment variable holding bytes that are not UTF-8: the
    sink's broker label is escaped like any other label, and the scrape renders."""
    from framepipe.mqtt import MqttEventSink

    user = os.fsdecode(b"op\xe9rateur")
    app = App("mqtt-names", settings=Settings(home=tmp_path))
    MqttEventSink(f"mqtt://{user}:pw@127.0.0.1:1/x").attach(app)
    text = app.metrics_text()
    brokers = {
        sample.labels["broker"]
        for family in text_string_to_metric_families(text)
        if family.name == "framepipe_mqtt_pending"
        for sample in family.samples
    }
    assert brokers == {"mqtt://op\\udce9rateur:***@127.0.0.1:1/x"}
    assert "pw@" not in text
