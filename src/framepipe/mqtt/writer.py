"""The MQTT sink's one writer task: :class:`Writer` connects to the broker, publishes what is
due and reconnects for as long as the sink is open.

Guarantees:

* On each connection: ``online`` (retained) on ``<prefix>/available``, then every retained
  count and health again, then what queued meanwhile; the broker's last will is ``offline``.
* Publishes in order: the cleared retained topics, the changed ones, then the queued events,
  each at the target's QoS (with QoS 1 or 2 each waits for the broker's acknowledgement), each
  given up as soon as the connection is lost, the message put back for the next connection.
* A message the client refuses for itself (not for the connection) is logged and dropped,
  never holding up the others.
* A broker that is away costs one warning when the outage begins (each further failed try is
  logged at DEBUG) and one line when it answers again; the URL is shown with its password
  masked, and so is every URL in an error's text.
* Once the sink is closed and nothing is queued, ``offline`` is published and the task ends;
  cancelled (the sink's close gave up waiting), it still tries ``offline`` (bounded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from types import ModuleType
from typing import TYPE_CHECKING

from framepipe.backoff import Backoff
from framepipe.logs import ComponentLogger
from framepipe.mqtt.cameras import Cameras
from framepipe.mqtt.pending import PendingEvents
from framepipe.mqtt_urls import MqttTarget
from framepipe.outage import Outage
from framepipe.urls import safe_text

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["Writer"]


class Writer:
    """Publishes ``cameras``' retained topics and the ``pending`` events to ``target`` as
    ``client_id``; ``url`` is the broker's URL, password masked, for the logs."""

    def __init__(
        self,
        mqtt: ModuleType,
        target: MqttTarget,
        *,
        url: str,
        client_id: str,
        pending: PendingEvents,
        cameras: Cameras,
        backoff: Backoff,
        health_interval: float,
        publish_timeout: float,
        log: ComponentLogger,
    ) -> None:
        self._mqtt = mqtt
        self.target = target
        self.url = url
        self.client_id = client_id
        self.pending = pending
        self.cameras = cameras
        self.backoff = backoff
        self.health_interval = health_interval
        self.publish_timeout = publish_timeout
        self.available_topic = f"{target.prefix}/available"
        self.published = 0
        """Event messages the broker acknowledged (retained counts and health not included)."""
        self.connects = 0
        self.connected = False
        self.task: asyncio.Task[None] | None = None
        self._wake: asyncio.Event | None = None
        self._outage = Outage()
        """The broker's outage under way: one warning when it begins, one line when it ends."""
        self._log = log

    def wake(self) -> None:
        """Start the task (in the running loop; RuntimeError outside one) or tell it that
        something is due."""
        if self.task is None:
            loop = asyncio.get_running_loop()
            self._wake = asyncio.Event()
            self.task = loop.create_task(self._run(), name="event-sink-mqtt")
        assert self._wake is not None
        self._wake.set()

    def _client(self) -> aiomqtt.Client:
        t = self.target
        tls = ssl.create_default_context(cafile=t.ca_file) if t.tls else None
        client: aiomqtt.Client = self._mqtt.Client(
            t.host,
            t.port,
            username=t.username,
            password=t.password,
            identifier=self.client_id,
            will=self._mqtt.Will(self.available_topic, b"offline", t.qos, retain=True),
            keepalive=t.keepalive,
            timeout=self.publish_timeout,
            tls_context=tls,
        )
        return client

    async def _run(self) -> None:
        attempt = 0
        while True:
            try:
                async with self._client() as client:
                    self.connected = True
                    self.connects += 1
                    tries, attempt = attempt, 0
                    self.pending.connected()
                    lasted = self._outage.answered()
                    if lasted is None:
                        self._log.info(
                            "connected to %s (topics %s/...)", self.url, self.target.prefix
                        )
                    else:
                        self._log.info(
                            "MQTT broker %s reachable again after %.1fs (%d failed tries); "
                            "publishing %d queued event(s)",
                            self.url,
                            lasted,
                            tries,
                            len(self.pending),
                        )
                    try:
                        await client.publish(self.available_topic, b"online", self.target.qos, True)
                        self.cameras.refresh_health(again=True)
                        self.cameras.retained.republish()
                        await self._serve(client)
                    except asyncio.CancelledError:
                        await self._say_offline(client)  # aclose gave up on the queue
                        raise
                    await client.publish(self.available_topic, b"offline", self.target.qos, True)
                    self.connected = False
                    return
            except Exception as exc:  # MqttError, OSError, ssl.SSLError, or a bug: never fatal
                self.connected = False
                if self.pending.closed and not self.pending:
                    return  # the broker sent the last will: 'offline'
                if not self._connection_error(exc):
                    self._log.exception("MQTT writer error")
                attempt += 1
                delay = self.backoff.delay(attempt)
                first = self._outage.failed(exc)
                self._log.log(
                    logging.WARNING if first else logging.DEBUG,
                    "MQTT broker %s: %s; %d event(s) queued, reconnecting in %.1fs",
                    self.url,
                    safe_text(str(exc)),
                    len(self.pending),
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
        cameras = self.cameras
        lost = asyncio.create_task(_until_disconnected(client))
        health_at = time.monotonic() + self.health_interval
        try:
            while True:
                if cameras.health_due or time.monotonic() >= health_at:
                    health_at = time.monotonic() + self.health_interval
                    cameras.refresh_health()
                await self._flush(client, lost)
                self._wake.clear()
                if self.pending or cameras.retained.due or cameras.health_due:
                    continue
                if self.pending.closed:
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
        retained = self.cameras.retained
        while retained.cleared:
            topic = retained.cleared.pop()
            try:
                await self._publish(client, lost, topic, b"", retain=True)
            except Exception as exc:
                if self._connection_error(exc):
                    retained.cleared.add(topic)
                    raise
                self._log.error("retained topic %r not cleared: %r", topic, exc)
            except BaseException:
                retained.cleared.add(topic)
                raise
        while retained.dirty:
            topic = retained.dirty.pop()
            try:
                await self._publish(client, lost, topic, retained.payloads[topic], retain=True)
            except Exception as exc:
                if self._connection_error(exc):
                    retained.dirty.add(topic)
                    raise
                retained.payloads.pop(topic, None)
                self._log.error("retained topic %r not published, dropped: %r", topic, exc)
            except BaseException:
                retained.dirty.add(topic)
                raise
        while self.pending:
            item = self.pending.take()
            try:
                await self._publish(client, lost, item[0], item[1], retain=False)
            except Exception as exc:
                if self._connection_error(exc):
                    self.pending.requeue(item)
                    raise
                self.pending.dropped += 1
                self._log.error("event on %r not published, dropped: %r", item[0], exc)
                continue
            except BaseException:
                self.pending.requeue(item)
                raise
            self.published += 1

    def _connection_error(self, exc: Exception) -> bool:
        """The connection's fault (retried after reconnecting), not the message's."""
        return isinstance(exc, self._mqtt.MqttError | OSError)

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
        raise self._mqtt.MqttError("connection lost while publishing")


async def _until_disconnected(client: aiomqtt.Client) -> None:
    """Return never; raise the client's ``MqttError`` once its connection is lost (the sink
    subscribes to nothing, so no message arrives)."""
    async for _ in client.messages:
        pass
