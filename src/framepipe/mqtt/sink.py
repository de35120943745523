"""The MQTT event sink: :class:`MqttEventSink` (the topics and guarantees are in
:mod:`framepipe.mqtt`). It feeds an app's events to its parts: :mod:`framepipe.mqtt.cameras`
shapes the messages and keeps the retained topics, :mod:`framepipe.mqtt.pending` queues the
events and :mod:`framepipe.mqtt.writer` publishes them."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any, Protocol

from prometheus_client.registry import CollectorRegistry

from framepipe.backoff import Backoff
from framepipe.errors import MissingDependencyError
from framepipe.logs import get_logger
from framepipe.mqtt.cameras import HEALTH_EVENTS, AppView, Cameras, encode
from framepipe.mqtt.metrics import SinkCollector
from framepipe.mqtt.pending import PendingEvents
from framepipe.mqtt.writer import Writer
from framepipe.mqtt_urls import MqttTarget, parse_mqtt_url
from framepipe.urls import safe_url

__all__ = ["AttachableApp", "MqttEventSink"]


class AttachableApp(AppView, Protocol):
    """What :meth:`MqttEventSink.attach` uses of an app (:class:`framepipe.App` is one): its
    events, its metrics registry, its name, pipelines and health."""

    @property
    def registry(self) -> CollectorRegistry: ...

    def on(
        self, event: str, callback: Callable[[str, dict[str, Any]], Any]
    ) -> Callable[[], None]: ...


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
        target = parse_mqtt_url(url)
        if qos is not None:
            if qos not in (0, 1, 2):
                raise ValueError(f"qos must be 0, 1 or 2, not {qos}")
            target = replace(target, qos=qos)
        if client_id is not None:
            target = replace(target, client_id=client_id)
        if max_pending < 1 or health_interval <= 0 or publish_timeout <= 0:
            raise ValueError("max_pending must be >= 1, health_interval and publish_timeout > 0")
        self.url = safe_url(url)
        """The URL with its password masked."""
        client_id = target.client_id or (
            f"framepipe-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        )
        self.app: AttachableApp | None = None
        self._log = get_logger("events.mqtt")
        self._cameras = Cameras(target.prefix, {**dict(target.labels), **(labels or {})})
        self._pending = PendingEvents(max_pending, self.url, self._log)
        self._writer = Writer(
            aiomqtt,
            target,
            url=self.url,
            client_id=client_id,
            pending=self._pending,
            cameras=self._cameras,
            backoff=backoff or Backoff(0.5, 2.0, 10.0, 0.1),
            health_interval=health_interval,
            publish_timeout=publish_timeout,
            log=self._log,
        )
        self._detach: Callable[[], None] | None = None
        self._collector: SinkCollector | None = None

    # Each setting has one owner, read through these (none can be changed once made: a
    # new sink takes new settings).

    @property
    def target(self) -> MqttTarget:
        """The broker, prefix, QoS and client id the URL named."""
        return self._writer.target

    @property
    def prefix(self) -> str:
        """The topic prefix (``framepipe``, ``home/framepipe``)."""
        return self._cameras.prefix

    @property
    def labels(self) -> Mapping[str, str]:
        """Segmenter labels renamed in the topics (``segment`` -> ``visitor``)."""
        return MappingProxyType(self._cameras.labels)

    @property
    def max_pending(self) -> int:
        """The most event messages queued; past it the oldest is dropped."""
        return self._pending.max_pending

    @property
    def client_id(self) -> str:
        """The MQTT client id."""
        return self._writer.client_id

    @property
    def backoff(self) -> Backoff:
        """The delays between connection attempts."""
        return self._writer.backoff

    @property
    def health_interval(self) -> float:
        """Seconds between health messages."""
        return self._writer.health_interval

    @property
    def publish_timeout(self) -> float:
        """Seconds a publish may take before the connection is taken for lost."""
        return self._writer.publish_timeout

    @property
    def available_topic(self) -> str:
        """``<prefix>/available``."""
        return self._writer.available_topic

    @property
    def pending(self) -> int:
        """Event messages queued, not yet acknowledged."""
        return len(self._pending)

    @property
    def published(self) -> int:
        """Event messages the broker acknowledged (retained counts and health not included)."""
        return self._writer.published

    @property
    def dropped(self) -> int:
        """Event messages dropped: the queue was full, they could not be encoded or sent, or
        the sink closed before they were published."""
        return self._pending.dropped

    @property
    def connects(self) -> int:
        """Connections made to the broker."""
        return self._writer.connects

    @property
    def connected(self) -> bool:
        """Whether the writer is connected to the broker."""
        return self._writer.connected

    # -- feeding --------------------------------------------------------------------------------

    def attach(self, app: AttachableApp) -> MqttEventSink:
        """Receive every event of ``app`` (``app.on("*", self)``), name segment labels after
        its pipelines' segmenters, publish its pipelines' health and add the sink's counters
        to its metrics; starts publishing at once when called inside the event loop."""
        if self.app is not None:
            raise RuntimeError(f"the MQTT sink is attached to app {self.app.name!r} already")
        self.app = app
        self._detach = app.on("*", self)
        self._collector = SinkCollector(self)
        app.registry.register(self._collector)
        self._cameras.attach(app)
        with contextlib.suppress(RuntimeError):  # no loop yet: the first event starts it
            self._writer.wake()
        return self

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        """Queue one event (an ``App.on`` callback); never blocks, never raises."""
        if self._pending.closed:
            self._pending.dropped += 1
            return
        try:
            payload = encode(self._cameras.message(event, data))
        except Exception:  # data JSON cannot hold (circular, odd keys): counted as dropped
            self._pending.dropped += 1
            self._log.exception("event %s not queued for MQTT: it cannot be encoded", event)
            return
        try:
            self._pending.put(f"{self.prefix}/events", payload)
            if event.startswith(HEALTH_EVENTS):
                self._cameras.health_due = True
            self._writer.wake()
        except RuntimeError:  # called outside a running loop: it waits for the writer
            pass
        except Exception:
            self._log.exception("event %s not queued for MQTT", event)

    # -- closing --------------------------------------------------------------------------------

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Publish what is queued (bounded by ``timeout``), then ``offline``; disconnect and
        detach from the app. Events after this are counted in ``dropped``."""
        self._pending.close()
        if self._writer.task is None and self._pending:
            self._writer.wake()  # events queued outside a running loop had no writer yet
        writer = self._writer.task
        if writer is not None:
            self._writer.wake()
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout)
            except TimeoutError:
                self._log.warning(
                    "%d event(s) not published to %s before close", len(self._pending), self.url
                )
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
            self._pending.drop_all()
            self._writer.connected = False
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
