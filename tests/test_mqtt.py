"""The MQTT event sink against real Mosquitto brokers.

The shared broker is the one on 127.0.0.1:1883 (or ``FRAMEPIPE_TEST_MQTT_URL``); tests that
stop or kill things start a private ``mosquitto`` on a free port, or run the publisher in a
process of its own. Each test publishes under a topic prefix of its own. When the broker (or
the ``mosquitto`` binary) is missing the tests skip with the reason, except under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from conftest import need_modules, service_missing
from framepipe import App, CommandSource, PatternSource, Segmenter, StreamPipeline
from framepipe.backoff import Backoff
from framepipe.config import Settings, load_settings
from framepipe.errors import ConfigError, MissingDependencyError
from framepipe.frames import Frame
from waiting import free_port, wait_until, wait_until_async

need_modules("aiomqtt", install="pip install 'framepipe[mqtt]'")

import aiomqtt  # noqa: E402

from framepipe.mqtt import MqttEventSink, parse_mqtt_url  # noqa: E402

MQTT_URL = os.environ.get("FRAMEPIPE_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
_BROKER = urlsplit(MQTT_URL)
HOST, PORT = _BROKER.hostname or "127.0.0.1", _BROKER.port or 1883


def unique_prefix(name: str) -> str:
    return f"fp-test/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def broker() -> tuple[str, int]:
    """The shared broker's address, once it answers."""
    try:
        with socket.create_connection((HOST, PORT), timeout=2):
            pass
    except OSError as exc:
        service_missing(f"Mosquitto at {HOST}:{PORT}", exc)
    return HOST, PORT


class Subscriber:
    """Collects every message of ``topic`` (QoS 1) from a background task."""

    def __init__(self, host: str, port: int, topic: str, **client: Any) -> None:
        self.host, self.port, self.topic, self.client = host, port, topic, client
        self.messages: list[tuple[str, bytes]] = []
        self._task: asyncio.Task[None] | None = None

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                self.messages.append((str(message.topic), message.payload))

    @contextlib.asynccontextmanager
    async def connected(self, *, subscribe: bool = True) -> AsyncIterator[Subscriber]:
        async with aiomqtt.Client(self.host, self.port, **self.client) as client:
            if subscribe:
                await client.subscribe(self.topic, qos=1)
            self._task = asyncio.create_task(self._read(client))
            try:
                yield self
            finally:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task

    def payloads(self, topic: str) -> list[bytes]:
        return [payload for t, payload in self.messages if t == topic]

    def events(self, prefix: str) -> list[dict[str, Any]]:
        return [json.loads(p) for p in self.payloads(f"{prefix}/events")]


async def retained(host: str, port: int, topic: str, expect: int) -> dict[str, bytes]:
    """The retained messages under ``topic`` as a new subscriber receives them."""
    sub = Subscriber(host, port, topic)
    async with sub.connected():
        await wait_until_async(
            f"{expect} retained message(s) on {topic}",
            lambda: len(sub.messages) >= expect,
            10,
            explain=lambda: sub.messages,
        )
    return dict(sub.messages)


def order_key(frame: Frame) -> str | None:
    """ORDER_1 on frames 1-20 (``seq`` counts from 1), ORDER_2 on 21-40, no tag after."""
    return "ORDER_1" if frame.seq <= 20 else "ORDER_2" if frame.seq <= 40 else None


# -- URLs and the setting ---------------------------------------------------------------------


def test_urls_carry_tls_credentials_prefix_and_qos_and_bad_ones_are_named_without_password() -> (
    None
):
    t = parse_mqtt_url("mqtts://ha%40home:s%3Acret@broker.lan/home/framepipe?qos=2&client_id=x")
    assert (t.host, t.port, t.tls, t.prefix, t.qos, t.client_id) == (
        "broker.lan",
        8883,
        True,
        "home/framepipe",
        2,
        "x",
    )
    assert (t.username, t.password) == ("ha@home", "s:cret")
    assert "s:cret" not in repr(t)
    assert parse_mqtt_url("mqtt://h?labels=segment:visitor,order:orders").labels == (
        ("segment", "visitor"),
        ("order", "orders"),
    )
    plain = parse_mqtt_url("mqtt://127.0.0.1")
    assert (plain.port, plain.tls, plain.prefix, plain.qos, plain.username) == (
        1883,
        False,
        "framepipe",
        1,
        None,
    )
    for url, problem in [
        ("http://u:hunter2@h/p", "scheme"),
        ("mqtt://u:hunter2@h/a/+/b", "prefix"),
        ("mqtt://u:hunter2@h/p?qos=3", "qos must be 0, 1 or 2"),
        ("mqtt://u:hunter2@h/p?retain=1", "unknown parameter"),
        ("mqtt://u:hunter2@:1883/p", "no host"),
        ("mqtt://u:hunter2@h/p?labels=segment", "label:name pairs"),
        ("mqtt://u:hunter2@h/a%01b", "control character"),
        ("mqtt://u:hunter2@h/a\udcffb", "lone surrogate"),
        ("mqtt://u:hunter2@h/p?labels=segment:vis%C2%85itor", "label:name pairs"),
    ]:
        with pytest.raises(ConfigError, match=problem) as caught:
            parse_mqtt_url(url)
        assert "hunter2" not in str(caught.value) and "***" in str(caught.value)
    with pytest.raises(ConfigError, match="FRAMEPIPE_MQTT_URL") as caught:
        load_settings(mqtt_url="mqtt://u:hunter2@h/p?qos=9")
    assert "hunter2" not in str(caught.value)
    assert load_settings(mqtt_url="").mqtt_url is None


def test_without_aiomqtt_the_sink_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "aiomqtt", None)  # what an absent package looks like
    with pytest.raises(MissingDependencyError, match=r"pip install 'framepipe\[mqtt\]'"):
        MqttEventSink("mqtt://127.0.0.1/x")


def test_a_sink_whose_broker_is_away_never_blocks_and_counts_what_it_drops() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}/{unique_prefix('away')}"  # nothing listens there

    async def main() -> MqttEventSink:
        app = App("away", settings=Settings(home=Path("/nonexistent-home")))
        sink = MqttEventSink(url, max_pending=50, backoff=Backoff(0.01, 2, 0.05, 0)).attach(app)
        for i in range(120):
            sink("order.completed", {"n": i, "station_id": "s1"})  # returns at once
        assert (sink.dropped, sink.pending, sink.connected) == (70, 50, False)
        metrics = app.metrics_text()
        assert 'framepipe_mqtt_dropped_total{broker="' in metrics
        assert "framepipe_mqtt_pending" in metrics and "framepipe_mqtt_connected" in metrics
        await asyncio.sleep(0.2)  # a few connection attempts fail meanwhile
        await sink.aclose(timeout=0.5)
        assert "framepipe_mqtt" not in app.metrics_text()  # detached
        sink("late", {})
        return sink

    sink = asyncio.run(main())
    assert (sink.published, sink.dropped, sink.pending) == (0, 121, 0)


def test_an_event_that_cannot_be_encoded_is_counted_as_dropped_and_the_rest_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}/{unique_prefix('odd')}"  # nothing listens there
    circular: dict[str, object] = {}
    circular["self"] = circular

    async def main() -> MqttEventSink:
        sink = MqttEventSink(url, max_pending=50, backoff=Backoff(0.01, 2, 0.05, 0))
        sink("order.completed", {"n": 1})
        sink("order.completed", {"loop": circular})  # JSON cannot hold it
        sink("order.completed", {"n": 3})
        counts = (sink.dropped, sink.pending)
        await sink.aclose(timeout=0.2)
        assert counts == (1, 2)
        return sink

    asyncio.run(main())
    assert any("cannot be encoded" in r.getMessage() for r in caplog.records)


# -- a real app on the shared broker ----------------------------------------------------------


def test_an_app_with_the_setting_publishes_events_counts_health_and_availability(
    broker: tuple[str, int], tmp_path: Path
) -> None:
    host, port = broker
    prefix = unique_prefix("app")
    settings = Settings(home=tmp_path, mqtt_url=f"mqtt://{host}:{port}/{prefix}")

    async def main() -> tuple[Subscriber, dict[str, bytes], App]:
        sub = Subscriber(host, port, f"{prefix}/#")
        async with sub.connected():
            app = App("counter", settings=settings)
            app.add_pipeline(
                StreamPipeline(
                    "station_1",
                    PatternSource("station_1", fps=50, count=60),
                    segmenter=Segmenter(order_key, timeout=0.2, label="order"),
                )
            )
            await app.start()
            assert app.mqtt is not None
            await wait_until_async(
                "ORDER_1 open on MQTT", lambda: b"1" in sub.payloads(f"{prefix}/station_1/order")
            )
            assert 'framepipe_mqtt_connected{broker="mqtt://' in app.metrics_text()
            await app.wait()  # the 60 frames end the pipeline
            await app.stop()  # publishes what is queued, then offline
            assert app.mqtt is None
            await wait_until_async(
                "offline", lambda: sub.payloads(f"{prefix}/available")[-1:] == [b"offline"]
            )
        # the retained state as Home Assistant finds it when it connects later
        state = await retained(host, port, f"{prefix}/#", 3)
        return sub, state, app

    sub, state, _ = asyncio.run(main())
    assert sub.payloads(f"{prefix}/available") == [b"online", b"offline"]
    events = sub.events(prefix)
    assert all(
        e["app"] == "counter" and e["camera"] == "station_1" and e["pipeline"] == "station_1"
        for e in events
    )
    assert all(isinstance(e["time"], float) and isinstance(e["data"], dict) for e in events)
    by_type = [(e["type"], e["event"]) for e in events]
    assert ("pipeline.started", "pipeline.started") in by_type
    assert ("pipeline.stopped", "pipeline.stopped") in by_type
    new = [e for e in events if e["type"] == "new"]
    end = [e for e in events if e["type"] == "end"]
    assert [e["after"]["id"] for e in new] == ["ORDER_1", "ORDER_2"]
    assert [e["after"]["id"] for e in end] == ["ORDER_1", "ORDER_2"]
    assert all(e["event"] == "segment.started" and e["before"] is None for e in new)
    first_end = end[0]
    assert first_end["event"] == "segment.completed"
    assert first_end["before"] == new[0]["after"]  # the segment as it was announced
    after = first_end["after"]
    assert {k: after[k] for k in ("camera", "label", "sub_label", "frames", "end_reason")} == {
        "camera": "station_1",
        "label": "order",
        "sub_label": "ORDER_1",
        "frames": 20,
        "end_reason": "key_changed",
    }
    assert after["start_time"] <= after["end_time"] and new[0]["after"]["end_time"] is None
    assert first_end["data"]["segment_id"] == "ORDER_1" and first_end["data"]["frames"] == 20
    counts = sub.payloads(f"{prefix}/station_1/order")
    assert counts[-1] == b"0" and b"1" in counts
    healths = [json.loads(p) for p in sub.payloads(f"{prefix}/station_1/health")]
    assert healths[0]["state"] in ("starting", "running")
    assert set(healths[0]) == {"state", "performance_score", "reason", "last_error", "updated_at"}
    assert healths[-1]["state"] == "stopped"
    assert state[f"{prefix}/available"] == b"offline"
    assert state[f"{prefix}/station_1/order"] == b"0"
    assert json.loads(state[f"{prefix}/station_1/health"])["state"] == "stopped"
    assert f"{prefix}/events" not in state  # events are not retained


def test_the_urls_labels_rename_a_segmenters_label_and_qos_0_publishes(
    broker: tuple[str, int], tmp_path: Path
) -> None:
    """The doorbell's visits: an activity segmenter (label ``segment``) counted as visitors."""
    host, port = broker
    prefix = unique_prefix("visitor")

    async def main() -> Subscriber:
        sub = Subscriber(host, port, f"{prefix}/#")
        async with sub.connected():
            app = App("doorbell", settings=Settings(home=tmp_path))
            app.add_pipeline(
                StreamPipeline(
                    "front door",  # not a valid topic level as it is: becomes front_door
                    PatternSource("front door", fps=50, count=10),
                    segmenter=Segmenter(None, timeout=5),
                )
            )
            url = f"mqtt://{host}:{port}/{prefix}?labels=segment:visitor"
            sink = MqttEventSink(url, qos=0).attach(app)
            await app.run()
            app.emit("visitor.unknown", {"source_id": "front door", "name": None})
            await sink.aclose()
            await wait_until_async(
                "offline", lambda: sub.payloads(f"{prefix}/available")[-1:] == [b"offline"]
            )
        return sub

    sub = asyncio.run(main())
    counts = sub.payloads(f"{prefix}/front_door/visitor")
    assert counts[-1] == b"0" and b"1" in counts
    events = sub.events(prefix)
    ends = [e for e in events if e["type"] == "end"]
    assert len(ends) == 1 and ends[0]["after"]["label"] == "visitor"
    assert ends[0]["after"]["end_reason"] == "end" and ends[0]["camera"] == "front door"
    visitor = events[-1]
    assert (visitor["type"], visitor["camera"], visitor["pipeline"]) == (
        "visitor.unknown",
        "front door",
        None,
    )


def test_every_name_becomes_a_topic_level_a_broker_takes() -> None:
    from framepipe.mqtt_urls import topic_level

    assert topic_level("front door/1+#") == "front_door_1__"
    assert topic_level("") == "_"
    unfit = "\0\x01\x1f\x7f\x85\x9f\ud800\udcff\ufdd0\ufdef\ufffe\uffff\U0001fffe\U0010ffff"
    assert topic_level(f"cam{unfit}") == "cam" + "_" * len(unfit)
    kept = "caméra-1.ü_\u00a0x\ufffd\U0001f600"  # NBSP is whitespace: made '_'
    assert topic_level(kept) == "caméra-1.ü__x\ufffd\U0001f600"
    topic_level(kept + unfit).encode("utf-8")  # strict UTF-8: no surrogate left


BAD_NAMES = ("s-\udcff", "c-\x01", "n-\uffff", "c1-\x9b")
"""A lone surrogate (paho cannot encode it), C0 and C1 controls and a non-character (Mosquitto
drops a client that publishes them)."""


def test_pipeline_names_no_topic_may_hold_never_stop_the_apps_other_messages(
    broker: tuple[str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    host, port = broker
    prefix = unique_prefix("names")
    # the pipelines' INFO lines are logged under loggers named after them: a captured lone
    # surrogate would make pytest-xdist fail to send this test's report
    caplog.set_level(logging.WARNING, logger="framepipe")

    async def main() -> tuple[Subscriber, MqttEventSink, dict[str, bytes]]:
        sub = Subscriber(host, port, f"{prefix}/#")
        async with sub.connected():
            app = App("names", settings=Settings(home=tmp_path))
            for name in ("cam-a", *BAD_NAMES):
                app.add_pipeline(StreamPipeline(name, PatternSource(name, fps=10)))
            sink = MqttEventSink(
                f"mqtt://{host}:{port}/{prefix}", backoff=Backoff(0.05, 2, 0.2, 0)
            ).attach(app)
            await app.start()
            try:
                await wait_until_async(
                    "every pipeline's health on MQTT",
                    lambda: len({t for t, _ in sub.messages if t.endswith("/health")}) == 5,
                    explain=lambda: (sink.stats(), sorted({t for t, _ in sub.messages})),
                )
                app.emit("custom.ping", {"pipeline": "cam-a"})
                await wait_until_async(
                    "the ping",
                    lambda: "custom.ping" in [e["type"] for e in sub.events(prefix)],
                    explain=sink.stats,
                )
            finally:
                await app.stop()
                await sink.aclose()
        state = await retained(host, port, f"{prefix}/+/health", 5)
        return sub, sink, state

    sub, sink, state = asyncio.run(main())
    assert sink.connects == 1 and sink.dropped == 0  # never dropped by the broker
    assert set(state) == {
        f"{prefix}/{level}/health" for level in ("cam-a", "s-_", "c-_", "n-_", "c1-_")
    }
    started = {e["pipeline"] for e in sub.events(prefix) if e["type"] == "pipeline.started"}
    assert started == {"cam-a", *BAD_NAMES}  # the JSON keeps the names as they are
    asyncio.run(_clear_retained(host, port, [*state, f"{prefix}/available"]))


async def _clear_retained(host: str, port: int, topics: list[str]) -> None:
    """Leave no retained message of the test on the shared broker."""
    async with aiomqtt.Client(host, port) as client:
        for topic in topics:
            await client.publish(topic, b"", qos=1, retain=True)


def test_a_topic_the_client_refuses_is_logged_and_dropped_and_the_events_go_on(
    broker: tuple[str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipeline name of 70 000 characters makes a health topic longer than MQTT allows
    (65 535 bytes): paho refuses it (ValueError), which is no reason to reconnect."""
    host, port = broker
    prefix = unique_prefix("refused")
    long_name = "x" * 70_000

    async def main() -> tuple[Subscriber, MqttEventSink]:
        sub = Subscriber(host, port, f"{prefix}/#")
        async with sub.connected():
            app = App("refused", settings=Settings(home=tmp_path))
            for name in ("cam-a", long_name):
                app.add_pipeline(StreamPipeline(name, PatternSource("cam", fps=10)))
            sink = MqttEventSink(
                f"mqtt://{host}:{port}/{prefix}", backoff=Backoff(0.05, 2, 0.2, 0)
            ).attach(app)
            await app.start()
            try:
                app.emit("custom.ping", {"pipeline": "cam-a"})
                await wait_until_async(
                    "the ping",
                    lambda: "custom.ping" in [e["type"] for e in sub.events(prefix)],
                    explain=lambda: (sink.stats(), caplog.text[-2000:]),
                )
                await wait_until_async(
                    "cam-a's health", lambda: sub.payloads(f"{prefix}/cam-a/health")
                )
            finally:
                await app.stop()
                await sink.aclose()
        return sub, sink

    with caplog.at_level(logging.WARNING, logger="framepipe"):
        sub, sink = asyncio.run(main())
    assert sink.connects == 1 and sink.dropped == 0
    refused = [r.getMessage() for r in caplog.records if "not published, dropped" in r.getMessage()]
    assert refused and all("xxxxxxxx/health" in m for m in refused)
    assert "pipeline.stopped" in [e["type"] for e in sub.events(prefix)]
    asyncio.run(_clear_retained(host, port, [f"{prefix}/cam-a/health", f"{prefix}/available"]))


def test_an_event_queued_outside_the_loop_is_published_at_close(broker: tuple[str, int]) -> None:
    host, port = broker
    prefix = unique_prefix("outside")
    sink = MqttEventSink(f"mqtt://{host}:{port}/{prefix}")
    sink("order.completed", {"station_id": "s1"})  # no running loop: it waits in the queue
    assert sink.pending == 1

    async def main() -> Subscriber:
        sub = Subscriber(host, port, f"{prefix}/events")
        async with sub.connected():
            await sink.aclose()
            await wait_until_async("the event", lambda: sub.events(prefix))
        return sub

    sub = asyncio.run(main())
    assert [e["type"] for e in sub.events(prefix)] == ["order.completed"]
    assert (sink.published, sink.dropped, sink.pending) == (1, 0, 0)
    asyncio.run(_clear_retained(host, port, [f"{prefix}/available"]))


def test_numbers_json_cannot_hold_are_published_as_null_so_every_json_parser_reads_it(
    broker: tuple[str, int],
) -> None:
    """A ``nan`` score or an infinite area in an event's data: the message stays JSON
    (RFC 8259, which ``JSON.parse`` in Node-RED and Home Assistant's parser hold to), with null
    there, as the stored events have it; the rest of the data is kept as emitted."""
    host, port = broker
    prefix = unique_prefix("finite")
    sink = MqttEventSink(f"mqtt://{host}:{port}/{prefix}")

    def strict(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    async def main() -> Subscriber:
        sub = Subscriber(host, port, f"{prefix}/events")
        async with sub.connected():
            sink(
                "tag.measured", {"camera": "c1", "score": float("nan"), "area": [float("-inf"), 2]}
            )
            await sink.aclose()
            await wait_until_async("the event", lambda: sub.payloads(f"{prefix}/events"))
        return sub

    sub = asyncio.run(main())
    [payload] = sub.payloads(f"{prefix}/events")
    message = json.loads(payload, parse_constant=strict)
    assert message["data"] == {"camera": "c1", "score": None, "area": [None, 2]}
    assert (sink.published, sink.dropped) == (1, 0)
    asyncio.run(_clear_retained(host, port, [f"{prefix}/available"]))


def test_a_close_that_gives_up_on_the_queue_still_says_offline(broker: tuple[str, int]) -> None:
    host, port = broker
    prefix = unique_prefix("gave-up")
    topic = f"{prefix}/available"

    async def main() -> tuple[MqttEventSink, dict[str, bytes]]:
        sink = MqttEventSink(f"mqtt://{host}:{port}/{prefix}", max_pending=5000)
        sink("order.completed", {"station_id": "s1"})
        await wait_until_async("the sink connected", lambda: sink.connected)
        for i in range(5000):
            sink("order.completed", {"n": i, "station_id": "s1"})
        await sink.aclose(timeout=0)  # gives up on what is queued: the writer is cancelled
        # the clean disconnect that follows makes the broker discard the last will
        return sink, await retained(host, port, topic, 1)

    sink, found = asyncio.run(main())
    assert found == {topic: b"offline"}
    assert sink.dropped > 0 and sink.published + sink.dropped == 5001
    asyncio.run(_clear_retained(host, port, [topic]))


def test_app_stop_closes_the_sink_even_when_its_snapshot_cannot_be_written(
    broker: tuple[str, int], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A pipeline named like a folder (its preview), an app whose snapshot cannot be written (a
    folder holds its place): stop() returns, and the sink it attached publishes 'offline' and
    is closed."""
    host, port = broker
    prefix = unique_prefix("stop")
    settings = Settings(home=tmp_path, mqtt_url=f"mqtt://{host}:{port}/{prefix}")
    (settings.run_dir / "apps" / "site.json").mkdir(parents=True)

    async def main() -> tuple[Subscriber, App]:
        sub = Subscriber(host, port, f"{prefix}/available")
        async with sub.connected():
            app = App("site", settings=settings, health_interval=0.1)
            pipeline = app.add_pipeline(StreamPipeline("gate/1", PatternSource("gate", fps=20)))
            await app.start()
            try:
                await wait_until_async("a frame", lambda: pipeline.latest_frame is not None)
                await wait_until_async("online", lambda: sub.payloads(f"{prefix}/available"))
            finally:
                await app.stop()
            await wait_until_async(
                "offline", lambda: sub.payloads(f"{prefix}/available")[-1:] == [b"offline"]
            )
        return sub, app

    with caplog.at_level(logging.ERROR, logger="framepipe"):
        sub, app = asyncio.run(main())
    assert app.mqtt is None and app.state.value == "stopped"
    assert any("health snapshot not written" in r.getMessage() for r in caplog.records)
    assert sub.payloads(f"{prefix}/available") == [b"online", b"offline"]
    asyncio.run(_clear_retained(host, port, [f"{prefix}/available"]))


@pytest.mark.slow
def test_a_failing_camera_turns_its_retained_health_failed_and_the_other_stays_running(
    broker: tuple[str, int], tmp_path: Path
) -> None:
    host, port = broker
    prefix = unique_prefix("health")
    settings = Settings(home=tmp_path, mqtt_url=f"mqtt://{host}:{port}/{prefix}")

    async def main() -> tuple[Subscriber, dict[str, bytes]]:
        sub = Subscriber(host, port, f"{prefix}/#")
        async with sub.connected():
            app = App("site", settings=settings, auto_recovery=False)
            app.add_pipeline(StreamPipeline("station_1", PatternSource("station_1", fps=25)))
            app.add_pipeline(
                StreamPipeline(
                    "station_2",
                    CommandSource(["sh", "-c", "echo lens cap on >&2; exit 3"], "station_2"),
                    backoff=Backoff(0.05, 2, 0.1, 0),
                    max_restarts=1,
                )
            )
            await app.start()
            try:
                await wait_until_async(
                    "station_2 failed on MQTT",
                    lambda: any(
                        json.loads(p)["state"] == "failed"
                        for p in sub.payloads(f"{prefix}/station_2/health")
                    ),
                )
                state = await retained(host, port, f"{prefix}/+/health", 2)
            finally:
                await app.stop()
        return sub, state

    sub, state = asyncio.run(main())
    failed = json.loads(state[f"{prefix}/station_2/health"])
    assert failed["state"] == "failed" and failed["performance_score"] == 0.0
    assert "exit code: 3" in failed["last_error"] and "failed" in failed["reason"]
    assert json.loads(state[f"{prefix}/station_1/health"])["state"] == "running"
    died = [e for e in sub.events(prefix) if e["type"] == "source.died"]
    assert died and {e["camera"] for e in died} == {"station_2"}
    assert "exit code: 3" in died[0]["data"]["error"]
    errors = [e for e in sub.events(prefix) if e["type"] == "system_error"]
    assert [e["camera"] for e in errors] == ["station_2"]


# -- processes and private brokers ------------------------------------------------------------


class PrivateMosquitto:
    """A ``mosquitto`` of the test's own on a free port, persisting to ``root`` (retained
    messages and persistent sessions survive a clean stop)."""

    def __init__(self, root: Path, config: str = "allow_anonymous true\n") -> None:
        binary = Path("/usr/sbin/mosquitto")
        found = str(binary) if binary.exists() else shutil.which("mosquitto")
        if found is None:
            service_missing("mosquitto (apt-get install mosquitto)", FileNotFoundError("mosquitto"))
            raise AssertionError("unreachable")
        self.binary = found
        self.port = free_port()
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n{config}"
            f"user {getpass.getuser()}\n"  # as root it would switch to 'mosquitto'
            f"persistence true\npersistence_location {root}/\n"
            f"log_dest file {root}/mosquitto.log\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def listening() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.log()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(f"mosquitto on port {self.port}", listening, 20, explain=self.log)

    def log(self) -> str:
        path = self.root / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """A clean stop (SIGTERM): mosquitto saves its retained messages and sessions."""
        proc = self.proc
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    server = PrivateMosquitto(tmp_path / "mosquitto")
    server.start()
    try:
        yield server
    finally:
        server.stop()


PUBLISHER = """
import asyncio, sys
from framepipe import App, CommandSource, PatternSource, Segmenter, StreamPipeline
from framepipe.config import Settings
from framepipe.mqtt import MqttEventSink

async def main():
    app = App("killed", settings=Settings(home=sys.argv[2]))
    app.add_pipeline(StreamPipeline("cam", PatternSource("cam", fps=10),
                                    segmenter=Segmenter(None, timeout=1)))
    sink = MqttEventSink(sys.argv[1], client_id="fp-test-killed").attach(app)
    await app.start()
    while not sink.connected:
        await asyncio.sleep(0.05)
    print("ready", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.mark.slow
def test_the_last_will_says_offline_when_the_publishing_process_is_killed(
    broker: tuple[str, int], tmp_path: Path
) -> None:
    host, port = broker
    prefix = unique_prefix("will")
    script = tmp_path / "publisher.py"
    script.write_text(textwrap.dedent(PUBLISHER))

    async def main() -> Subscriber:
        sub = Subscriber(host, port, f"{prefix}/available")
        async with sub.connected():
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                str(script),
                f"mqtt://{host}:{port}/{prefix}",
                str(tmp_path / "home"),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                assert proc.stdout is not None
                line = await asyncio.wait_for(proc.stdout.readline(), 60)
                assert line.strip() == b"ready", line + await proc.stdout.read(4000)
                await wait_until_async(
                    "online", lambda: sub.messages[-1:] == [(f"{prefix}/available", b"online")]
                )
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                await wait_until_async(
                    "the last will",
                    lambda: sub.messages[-1:] == [(f"{prefix}/available", b"offline")],
                    20,
                    explain=lambda: sub.messages,
                )
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        return sub

    sub = asyncio.run(main())
    assert [p for _, p in sub.messages] == [b"online", b"offline"]


@pytest.mark.slow
def test_a_broker_restart_queues_events_without_blocking_and_the_sink_publishes_again(
    mosquitto: PrivateMosquitto, tmp_path: Path
) -> None:
    prefix = unique_prefix("restart")
    port = mosquitto.port
    # a persistent session: the broker keeps what is published while the subscriber reconnects
    sub = Subscriber(
        "127.0.0.1",
        port,
        f"{prefix}/#",
        identifier=f"fp-sub-{uuid.uuid4().hex[:8]}",
        clean_session=False,
    )

    async def main() -> tuple[MqttEventSink, list[str], StreamPipeline]:
        app = App("restart", settings=Settings(home=tmp_path / "home"))
        pipeline = app.add_pipeline(
            StreamPipeline(
                "cam",
                PatternSource("cam", fps=50),
                segmenter=Segmenter(lambda f: f"K{f.seq // 10}", timeout=5, label="order"),
            )
        )
        outage: list[str] = []
        down = asyncio.Event()
        app.on(
            "segment.started",
            lambda _e, d: outage.append(d["segment_id"]) if down.is_set() else None,
        )
        sink = MqttEventSink(
            f"mqtt://127.0.0.1:{port}/{prefix}", backoff=Backoff(0.2, 2.0, 1.0, 0)
        ).attach(app)
        async with sub.connected():
            await app.start()
            await wait_until_async("segments on MQTT", lambda: len(sub.events(prefix)) >= 5)
        mosquitto.stop()
        down.set()
        await wait_until_async("the sink to notice", lambda: not sink.connected)
        frames = pipeline.frames_captured
        await wait_until_async("5 segments queued", lambda: sink.pending >= 5 and len(outage) >= 5)
        assert pipeline.frames_captured >= frames + 40  # the capture never waited for MQTT
        mosquitto.start()
        down.clear()
        async with sub.connected(subscribe=False):  # the session kept its subscription
            await wait_until_async(
                "the outage's segments",
                lambda: (
                    set(outage)
                    <= {e["after"]["id"] for e in sub.events(prefix) if e["type"] == "new"}
                ),
                30,
                explain=lambda: (outage, sink.stats()),
            )
            await wait_until_async(
                "online again", lambda: sub.payloads(f"{prefix}/available").count(b"online") >= 2
            )
            await app.stop()
            await sink.aclose()
            await wait_until_async(
                "offline", lambda: sub.payloads(f"{prefix}/available")[-1:] == [b"offline"]
            )
        return sink, outage, pipeline

    sink, outage, _ = asyncio.run(main())
    assert sink.connects == 2 and sink.dropped == 0
    new = [e["after"]["id"] for e in sub.events(prefix) if e["type"] == "new"]
    assert list(dict.fromkeys(i for i in new if i in outage)) == outage  # in emission order


async def retained_now(port: int, prefix: str) -> dict[str, bytes]:
    """Every retained message under ``prefix`` on the broker at 127.0.0.1:``port``: the broker
    sends them on the subscription, before a message published after it."""
    marker = f"{prefix}/marker-{uuid.uuid4().hex[:8]}"
    found: dict[str, bytes] = {}
    async with aiomqtt.Client("127.0.0.1", port) as client:
        await client.subscribe(f"{prefix}/#", qos=1)
        await client.publish(marker, b"", qos=1)
        async with asyncio.timeout(30):
            async for message in client.messages:
                if str(message.topic) == marker:
                    return found
                assert isinstance(message.payload, bytes)
                found[str(message.topic)] = message.payload
    raise AssertionError("unreachable")


@pytest.mark.slow
def test_a_removed_pipeline_s_retained_topics_are_cleared_and_never_republished(
    mosquitto: PrivateMosquitto, tmp_path: Path
) -> None:
    prefix = unique_prefix("removed")
    port = mosquitto.port

    async def main() -> tuple[dict[str, bytes], dict[str, bytes], MqttEventSink]:
        app = App("site", settings=Settings(home=tmp_path / "home"))
        for name in ("cam-a", "cam-b"):
            app.add_pipeline(
                StreamPipeline(
                    name,
                    PatternSource(name, fps=20),
                    segmenter=Segmenter(None, timeout=5, label="visitor"),
                )
            )
        sink = MqttEventSink(
            f"mqtt://127.0.0.1:{port}/{prefix}", backoff=Backoff(0.2, 2.0, 1.0, 0)
        ).attach(app)
        await app.start()
        try:
            every = {f"{prefix}/{c}/{t}" for c in ("cam-a", "cam-b") for t in ("health", "visitor")}
            await wait_until_async(
                "both cameras' retained topics",
                lambda: (
                    every <= set(sink._cameras.retained.payloads)
                    and not sink._cameras.retained.dirty
                ),
            )
            await app.remove("cam-b")

            async def cleared() -> dict[str, bytes]:
                found = await retained_now(port, prefix)
                return {} if any("cam-b" in topic for topic in found) else found

            after_remove = await wait_until_async(
                "cam-b's retained topics cleared", cleared, 20, explain=sink.stats
            )
            mosquitto.stop()  # persists what is retained; the sink reconnects and republishes
            await wait_until_async("the sink to notice", lambda: not sink.connected)
            mosquitto.start()
            await wait_until_async("reconnected", lambda: sink.connects == 2, 30)
            await wait_until_async("republished", lambda: not sink._cameras.retained.dirty)
            after_reconnect = await retained_now(port, prefix)
        finally:
            await app.stop()
            await sink.aclose()
        return after_remove, after_reconnect, sink

    after_remove, after_reconnect, sink = asyncio.run(main())
    kept = {f"{prefix}/available", f"{prefix}/cam-a/health", f"{prefix}/cam-a/visitor"}
    assert set(after_remove) == kept
    assert set(after_reconnect) == kept
    assert not any("cam-b" in topic for topic in sink._cameras.retained.payloads)


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca, cert, key) PEM files."""
    need_modules("cryptography", install="pip install cryptography")
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "framepipe test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.mark.slow
def test_tls_and_credentials_from_the_url_and_the_password_never_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        service_missing("mosquitto_passwd", FileNotFoundError("mosquitto_passwd"))
        raise AssertionError("unreachable")
    ca, cert, key = make_certificates(tmp_path / "tls")
    subprocess.run([passwd, "-b", "-c", str(tmp_path / "passwd"), "ha", "s3cret"], check=True)
    server = PrivateMosquitto(
        tmp_path / "mosquitto",
        f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
        f"cafile {ca}\ncertfile {cert}\nkeyfile {key}\n",
    )
    server.start()
    prefix = unique_prefix("tls")
    base = f"127.0.0.1:{server.port}/{prefix}?ca={ca}"
    tls = ssl.create_default_context(cafile=str(ca))
    sub = Subscriber(
        "127.0.0.1", server.port, f"{prefix}/#", username="ha", password="s3cret", tls_context=tls
    )

    async def main() -> tuple[MqttEventSink, MqttEventSink]:
        wrong = MqttEventSink(f"mqtts://ha:hunter2@{base}", backoff=Backoff(0.05, 2, 0.2, 0))
        wrong("order.completed", {"station_id": "s1"})
        await wait_until_async("a refused attempt", lambda: "***" in caplog.text)
        await wrong.aclose(timeout=0.2)
        async with sub.connected():
            sink = MqttEventSink(f"mqtts://ha:s3cret@{base}")
            sink("order.completed", {"station_id": "s1", "order_id": "ORDER_7"})
            await wait_until_async("the order over TLS", lambda: sub.events(prefix))
            await sink.aclose()
        return wrong, sink

    try:
        with caplog.at_level(logging.INFO, logger="framepipe"):
            wrong, sink = asyncio.run(main())
    finally:
        server.stop()
    assert (wrong.connects, wrong.published, wrong.dropped) == (0, 0, 1)
    assert (sink.connects, sink.published, sink.dropped) == (1, 1, 0)
    assert sub.payloads(f"{prefix}/available") == [b"online", b"offline"]
    event = sub.events(prefix)[0]
    assert (event["type"], event["camera"], event["app"]) == ("order.completed", "s1", None)
    assert f"mqtts://ha:***@{base}" in caplog.text
    assert "hunter2" not in caplog.text and "s3cret" not in caplog.text
