"""The MQTT event sink: :class:`MqttEventSink` (the topics and guarantees are in
:mod:`framepipe.mqtt`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from framepipe.backoff import Backoff
from framepipe.errors import MissingDependencyError
from framepipe.logs import get_logger
from framepipe.mqtt.metrics import SinkCollector
from framepipe.mqtt.urls import parse_mqtt_url, topic_level
from framepipe.outage import Outage
from framepipe.urls import safe_text, safe_url

if TYPE_CHECKING:
    import aiomqtt

    from framepipe.app import App

__all__ = ["MqttEventSink"]

_HEALTH_EVENTS = ("source.", "pipeline.", "stage.crashed", "system_error", "performance_warning")


def _json(value: Any) -> bytes:
    return json.dumps(value, default=str, separators=(",", ":")).encode()


def _seconds(ms: object) -> float | None:
    return ms / 1000.0 if isinstance(ms, int | float) else None


class MqttEventSink:
    """Publishes an app's events, open-segment counts, health and availability on MQTT (see
    the module docstring). ``qos`` and ``client_id`` override the URL's; ``labels`` renames
    segmenter labels in the count topics and segment objects (as the URL's ``labels`` does);
    ``backoff`` paces reconnects
    (default 0.5 s doubling to 10 s); ``publish_timeout`` bounds each connect and publish."""

    def __init__(
        self,
        url: str,
        *,
        qos: int | None = None,
        client_id: str | None = None,
        labels: Mapping[str, str] | None = None,
        max_pending: int = 10_000,
        backoff: Backoff | None = None,
        health_interval: float = 2.0,
        publish_timeout: float = 10.0,
    ) -> None:
        try:
            import aiomqtt
        except ImportError as exc:
            raise MissingDependencyError("aiomqtt", "mqtt", "events on MQTT") from exc
        self._aiomqtt = aiomqtt
        target = parse_mqtt_url(url)
        if qos is not None:
            if qos not in (0, 1, 2):
                raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
            target = replace(target, qos=qos)
        if client_id is not None:
            target = replace(target, client_id=client_id)
        if max_pending < 1 or health_interval <= 0 or publish_timeout <= 0:
            raise ValueError("max_pending must be >= 1, health_interval and publish_timeout > 0")
        self.target = target
        self.url = safe_url(url)
        """The URL with its password masked."""
        self.prefix = target.prefix
        self.labels = {**dict(target.labels), **(labels or {})}
        self.max_pending = max_pending
        self.backoff = backoff or Backoff(0.5, 2.0, 10.0, 0.1)
        self.health_interval = health_interval
        self.publish_timeout = publish_timeout
        self.client_id = target.client_id or (
            f"framepipe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.published = 0
        """Event messages the broker acknowledged (retained counts and health not included)."""
        self.dropped = 0
        self.connects = 0
        self.connected = False
        self.app: App | None = None
        self._pending: deque[tuple[str, bytes]] = deque()
        self._retained: dict[str, bytes] = {}
        self._dirty: set[str] = set()
        self._topics: dict[str, set[str]] = {}
        """Each camera's retained topics (counts, health), to clear when it is removed."""
        self._cleared: set[str] = set()
        """Retained topics to clear on the broker (an empty retained message)."""
        self._open: dict[str, dict[str, dict[str, Any]]] = {}
        self._health_key: dict[str, tuple[Any, ...]] = {}
        self._health_due = False
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self._detach: Callable[[], None] | None = None
        self._collector: SinkCollector | None = None
        self._warned_drop = False
        self._outage = Outage()
        """The broker's outage under way: one warning when it begins, one line when it ends."""
        self._log = get_logger("events.mqtt")

    @property
    def available_topic(self) -> str:
        """``<prefix>/available``."""
        return f"{self.prefix}/available"

    @property
    def pending(self) -> int:
        """Event messages queued, not yet acknowledged."""
        return len(self._pending)

    # -- feeding --------------------------------------------------------------------------------

    def attach(self, app: App) -> MqttEventSink:
        """Receive every event of ``app`` (``app.on("*", self)``), name segment labels after
        its pipelines' segmenters, publish its pipelines' health and add the sink's counters
        to its metrics; starts publishing at once when called inside the event loop."""
        if self.app is not None:
            raise RuntimeError(f"the MQTT sink is attached to app {self.app.name!r} already")
        self.app = app
        self._detach = app.on("*", self)
        self._collector = SinkCollector(self)
        app.registry.register(self._collector)
        for name, pipeline in app.pipelines.items():
            if pipeline.segmenter is not None:
                self._set_count(name, self._label(name))
        self._health_due = True
        with contextlib.suppress(RuntimeError):  # no loop yet: the first event starts it
            self._ensure_writer()
        return self

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Queue one event (an ``App.on`` callback); never blocks, never raises."""
        if self._closed:
            self.dropped += 1
            return
        try:
            payload = _json(self._message(event, data))
        except Exception:  # data JSON cannot hold (circular, odd keys): counted as dropped
            self.dropped += 1
            self._log.exception("event %s not queued for MQTT: it cannot be encoded", event)
            return
        try:
            self._queue(payload)
            if event.startswith(_HEALTH_EVENTS):
                self._health_due = True
            self._ensure_writer()
        except RuntimeError:  # called outside a running loop: it waits for the writer
            pass
        except Exception:
            self._log.exception("event %s not queued for MQTT", event)

    def _queue(self, payload: bytes) -> None:
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped += 1
            if not self._warned_drop:
                self._warned_drop = True
                self._log.warning(
                    "MQTT queue full (%d): dropping the oldest events until %s takes them",
                    self.max_pending,
                    self.url,
                )
        self._pending.append((f"{self.prefix}/events", payload))

    def _ensure_writer(self) -> None:
        if self._writer is None:
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self._writer = loop.create_task(self._run(), name="event-sink-mqtt")
        assert self._wake is not None
        self._wake.set()

    # -- the message shapes ---------------------------------------------------------------------

    def _label(self, pipeline: str | None) -> str:
        found = self.app.pipelines.get(pipeline) if self.app and pipeline else None
        label = found.segmenter.label if found is not None and found.segmenter else "segment"
        return self.labels.get(label, label)

    def _segmented(self, pipeline: str | None) -> bool:
        found = self.app.pipelines.get(pipeline) if self.app and pipeline else None
        return found is not None and found.segmenter is not None

    def _message(self, event: str, data: dict[str, Any]) -> dict[str, Any]:
        pipeline = data.get("pipeline")
        camera = next(
            (
                data[key]
                for key in ("pipeline", "camera", "station_id", "source_id")
                if data.get(key)
            ),
            None,
        )
        message: dict[str, Any] = {
            "type": event,
            "event": event,
            "app": self.app.name if self.app is not None else None,
            "pipeline": pipeline,
            "camera": camera,
            "time": time.time(),
            "data": data,
        }
        if camera is None:
            return message
        cam = str(camera)
        if event == "segment.started":
            after = self._segment(cam, pipeline, data, end=False)
            self._open.setdefault(cam, {})[after["id"]] = after
            self._set_count(cam, after["label"])
            message.update(type="new", before=None, after=after)
        elif event == "segment.completed":
            before = self._open.get(cam, {}).pop(str(data.get("segment_id")), None)
            after = self._segment(cam, pipeline, data, end=True)
            self._set_count(cam, after["label"])
            message.update(type="end", before=before, after=after)
        elif event == "pipeline.started" and self._segmented(pipeline):
            self._set_count(cam, self._label(pipeline))
        elif event in ("pipeline.stopped", "pipeline.failed"):
            segments = self._open.pop(cam, {})
            for label in {s["label"] for s in segments.values()}:
                self._set_count(cam, label)
        elif event == "pipeline.removed":
            self._forget(cam)
        return message

    def _segment(
        self, camera: str, pipeline: str | None, data: dict[str, Any], *, end: bool
    ) -> dict[str, Any]:
        start = _seconds(data.get("first_ts_ms"))
        last = _seconds(data.get("last_ts_ms"))
        return {
            "id": str(data.get("segment_id")),
            "camera": camera,
            "label": self._label(pipeline),
            "sub_label": data.get("key"),
            "start_time": start,
            "end_time": last if end else None,
            "frame_time": last if last is not None else start,
            "frames": data.get("frames", 0),
            "end_reason": data.get("reason"),
            "latency_s": data.get("latency_s"),
            "stored": data.get("stored", []),
            "selected": data.get("selected", []),
            "meta": data.get("meta", {}),
        }

    def _set_count(self, camera: str, label: str) -> None:
        count = sum(1 for s in self._open.get(camera, {}).values() if s["label"] == label)
        topic = f"{self.prefix}/{topic_level(camera)}/{topic_level(label)}"
        self._retain(camera, topic, str(count).encode())

    def _retain(self, camera: str, topic: str, payload: bytes) -> None:
        self._topics.setdefault(camera, set()).add(topic)
        self._cleared.discard(topic)
        if self._retained.get(topic) != payload:
            self._retained[topic] = payload
            self._dirty.add(topic)

    def _forget(self, camera: str) -> None:
        """A removed pipeline: clear its retained topics on the broker and republish them
        never again (a topic another camera's name shares is kept)."""
        topics = self._topics.pop(camera, set())
        kept = set().union(*self._topics.values())
        for topic in topics - kept:
            self._retained.pop(topic, None)
            self._dirty.discard(topic)
            self._cleared.add(topic)
        self._health_key.pop(camera, None)
        self._open.pop(camera, None)

    def _refresh_health(self) -> None:
        self._health_due = False
        app = self.app
        if app is None:
            return
        for name, status in app.health().pipeline_status.items():
            performance = status.get("performance") or {}
            score = float(status.get("performance_score", 1.0))
            key = (status.get("state"), round(score, 1), status.get("last_error"))
            if self._health_key.get(name) == key:
                continue
            self._health_key[name] = key
            self._retain(
                name,
                f"{self.prefix}/{topic_level(name)}/health",
                _json(
                    {
                        "state": status.get("state"),
                        "performance_score": score,
                        "reason": performance.get("reason"),
                        "last_error": status.get("last_error"),
                        "updated_at": time.time(),
                    }
                ),
            )

    # -- the writer -----------------------------------------------------------------------------

    def _client(self) -> aiomqtt.Client:
        t = self.target
        tls = ssl.create_default_context(cafile=t.ca_file) if t.tls else None
        return self._aiomqtt.Client(
            t.host,
            t.port,
            username=t.username,
            password=t.password,
            identifier=self.client_id,
            will=self._aiomqtt.Will(self.available_topic, b"offline", t.qos, retain=True),
            keepalive=t.keepalive,
            timeout=self.publish_timeout,
            tls_context=tls,
        )

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._client() as client:
                    self.connected = True
                    self.connects += 1
                    tries, attempt = attempt, 0
                    self._warned_drop = False
                    lasted = self._outage.answered()
                    if lasted is None:
                        self._log.info("connected to %s (topics %s/...)", self.url, self.prefix)
                    else:
                        self._log.info(
                            "MQTT broker %s reachable again after %.1fs (%d failed tries); "
                            "publishing %d queued event(s)",
                            self.url,
                            lasted,
                            tries,
                            len(self._pending),
                        )
                    try:
                        await client.publish(self.available_topic, b"online", self.target.qos, True)
                        self._health_key.clear()
                        self._refresh_health()
                        self._dirty |= set(self._retained)
                        await self._serve(client)
                    except asyncio.CancelledError:
                        await self._say_offline(client)  # aclose gave up on the queue
                        raise
                    await client.publish(self.available_topic, b"offline", self.target.qos, True)
                    self.connected = False
                    return
            except Exception as exc:  # MqttError, OSError, ssl.SSLError, or a bug: never fatal
                self.connected = False
                if self._closed and not self._pending:
                    return  # the broker sent the last will: 'offline'
                if not isinstance(exc, self._aiomqtt.MqttError | OSError):
                    self._log.exception("MQTT writer error")
                attempt += 1
                delay = self.backoff.delay(attempt)
                first = self._outage.failed(exc)
                self._log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "MQTT broker %s: %s; %d event(s) queued, reconnecting in %.1fs",
                    self.url,
                    safe_text(str(exc)),
                    len(self._pending),
                    delay,
                )
                await asyncio.sleep(delay)

    async def _say_offline(self, client: aiomqtt.Client) -> None:
        """Publish ``offline`` on a connection about to be closed while the writer is
        cancelled: the clean disconnect that follows makes the broker discard the last will,
        so without it ``available`` would stay ``online``. Bounded (``publish_timeout``, at
        most 1 s); a failure is logged."""
        self.connected = False
        try:
            await asyncio.wait_for(
                client.publish(self.available_topic, b"offline", self.target.qos, True),
                min(1.0, self.publish_timeout),
            )
        except Exception as exc:
            self._log.warning("'offline' not published to %s on close: %r", self.url, exc)

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Publish until the sink is closed and empty; raises ``MqttError`` on a lost
        connection (noticed at once through the client's message iterator, also while a
        publish waits for its acknowledgement)."""
        assert self._wake is not None
        lost = asyncio.create_task(_until_disconnected(client))
        health_at = time.monotonic() + self.health_interval
        try:
            while True:
                if self._health_due or time.monotonic() >= health_at:
                    health_at = time.monotonic() + self.health_interval
                    self._refresh_health()
                await self._flush(client, lost)
                self._wake.clear()
                if self._pending or self._dirty or self._cleared or self._health_due:
                    continue
                if self._closed:
                    return
                woken = asyncio.ensure_future(self._wake.wait())
                try:
                    await asyncio.wait(
                        {woken, lost},
                        timeout=max(0.0, health_at - time.monotonic()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    woken.cancel()
                if lost.done():
                    lost.result()  # raises the client's MqttError
        finally:
            lost.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await lost

    async def _flush(self, client: aiomqtt.Client, lost: asyncio.Task[None]) -> None:
        """Clear the retained topics of removed pipelines, publish the retained topics that
        changed, then the queued events. A lost connection puts the message back and raises; a
        message the client refuses (an error that is not the connection's: a topic or payload
        it cannot send) is logged and dropped, so it never holds up the others."""
        while self._cleared:
            topic = self._cleared.pop()
            try:
                await self._publish(client, lost, topic, b"", retain=True)
            except Exception as exc:
                if self._connection_error(exc):
                    self._cleared.add(topic)
                    raise
                self._log.error("retained topic %r not cleared: %r", topic, exc)
            except BaseException:
                self._cleared.add(topic)
                raise
        while self._dirty:
            topic = self._dirty.pop()
            try:
                await self._publish(client, lost, topic, self._retained[topic], retain=True)
            except Exception as exc:
                if self._connection_error(exc):
                    self._dirty.add(topic)
                    raise
                self._retained.pop(topic, None)
                self._log.error("retained topic %r not published, dropped: %r", topic, exc)
            except BaseException:
                self._dirty.add(topic)
                raise
        while self._pending:
            item = self._pending.popleft()
            try:
                await self._publish(client, lost, item[0], item[1], retain=False)
            except Exception as exc:
                if self._connection_error(exc):
                    self._requeue(item)
                    raise
                self.dropped += 1
                self._log.error("event on %r not published, dropped: %r", item[0], exc)
                continue
            except BaseException:
                self._requeue(item)
                raise
            self.published += 1

    def _requeue(self, item: tuple[str, bytes]) -> None:
        if len(self._pending) < self.max_pending:
            self._pending.appendleft(item)
        else:
            self.dropped += 1

    def _connection_error(self, exc: Exception) -> bool:
        """The connection's fault (retried after reconnecting), not the message's."""
        return isinstance(exc, self._aiomqtt.MqttError | OSError)

    async def _publish(
        self,
        client: aiomqtt.Client,
        lost: asyncio.Task[None],
        topic: str,
        payload: bytes,
        *,
        retain: bool,
    ) -> None:
        """One publish, given up with the connection's ``MqttError`` as soon as the connection
        is lost (the client would wait for the acknowledgement until ``publish_timeout``)."""
        publish = asyncio.ensure_future(client.publish(topic, payload, self.target.qos, retain))
        try:
            await asyncio.wait({publish, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not publish.done():
                publish.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await publish
        if publish.done() and not publish.cancelled():
            publish.result()  # raises the publish's own error
            return
        lost.result()  # raises the client's MqttError
        raise self._aiomqtt.MqttError("connection lost while publishing")

    # -- closing --------------------------------------------------------------------------------

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Publish what is queued (bounded by ``timeout``), then ``offline``; disconnect and
        detach from the app. Events after this are counted in ``dropped``."""
        self._closed = True
        if self._writer is None and self._pending:
            self._ensure_writer()  # events queued outside a running loop had no writer yet
        writer = self._writer
        if writer is not None:
            assert self._wake is not None
            self._wake.set()
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except TimeoutError:
                self._log.warning(
                    "%d event(s) not published to %s before close", len(self._pending), self.url
                )
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            self.dropped += len(self._pending)
            self._pending.clear()
            self.connected = False
        if self._detach is not None:
            self._detach()
            self._detach = None
        if self.app is not None and self._collector is not None:
            with contextlib.suppress(KeyError):
                self.app.registry.unregister(self._collector)
            self._collector = None

    def stats(self) -> dict[str, Any]:
        """Connected, connects, published, dropped, pending (also the app's metrics)."""
        return {
            "url": self.url,
            "connected": self.connected,
            "connects": self.connects,
            "published": self.published,
            "dropped": self.dropped,
            "pending": len(self._pending),
        }


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Return never; raise the client's ``MqttError`` once its connection is lost (the sink
    subscribes to nothing, so no message arrives)."""
    async for _ in client.messages:
        pass
