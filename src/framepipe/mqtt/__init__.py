"""A live app's events on MQTT, in the shape Frigate users know (Home Assistant, Node-RED).

``MqttEventSink("mqtt://user:pass@broker:1883/framepipe").attach(app)`` (or the setting
``FRAMEPIPE_MQTT_URL``, which makes every :class:`~framepipe.App` attach one while it runs)
publishes under the URL's path, the topic prefix (default ``framepipe``):

* ``<prefix>/events``: one JSON message per event, ``{"type", "event", "app", "pipeline",
  "camera", "time", "data"}``; ``segment.started`` is ``type: "new"`` and
  ``segment.completed`` ``type: "end"``, both with ``before``/``after`` segment objects
  (``id``, ``camera``, ``label``, ``sub_label``, ``start_time``, ``end_time`` ...); every
  other event has its own name as ``type``. ``data`` is the event's data as emitted (a NaN
  or an infinity, which JSON cannot hold, as null).
* ``<prefix>/<camera>/<label>``: retained, the number of segments open on that camera (its
  pipeline), ``label`` being the segmenter's label (``order``, ``segment``; renamed with
  ``labels={"segment": "visitor"}``).
* ``<prefix>/<camera>/health``: retained JSON (``state``, ``performance_score``, ``reason``,
  ``last_error``, ``updated_at``), published when the state or the score's first decimal
  changes (checked every ``health_interval`` seconds and at once on source and pipeline
  events). Needs :meth:`MqttEventSink.attach`.
* On ``pipeline.removed`` (:meth:`App.remove <framepipe.app.App.remove>`) the pipeline's count
  and health topics are cleared (an empty retained message) and not published again.
* ``<prefix>/available``: ``online`` (retained) on each connection, ``offline`` on a clean
  :meth:`~MqttEventSink.aclose` and, as the last will, when the process dies or loses the
  broker.

Guarantees:

* Calling the sink never blocks and never raises: the message is queued (bounded: past
  ``max_pending`` the oldest is dropped and counted in ``dropped``, also in the app's metrics
  as ``framepipe_mqtt_dropped``).
* One writer task publishes the queued events in the order they were emitted (QoS ``qos``,
  default 1: each publish waits for the broker's acknowledgement before the next).
* A broker that is away costs one warning when the outage begins (each further failed try is
  logged at DEBUG) and one line when it answers again, never the app: the writer reconnects
  with backoff for as long as the sink is open, then publishes ``online``, every retained
  count and health again (a broker restarted without persistence gets them back) and what
  queued meanwhile.
* Camera and label names become valid topic levels (``/``, ``+``, ``#``, whitespace, control
  characters, lone surrogates and Unicode non-characters are made ``_``), so no name gets the
  sink disconnected; a message the client refuses for itself (not for the connection) is
  logged and dropped, never holding up the others.
* :meth:`MqttEventSink.aclose` publishes what is queued (bounded by ``timeout``), then
  ``offline``, and disconnects; what could not be published is counted in ``dropped``.
* The password never appears in logs or errors (:func:`safe_url`).
"""

from framepipe.mqtt.sink import MqttEventSink
from framepipe.mqtt_urls import MqttTarget, parse_mqtt_url
from framepipe.urls import safe_url

__all__ = ["MqttEventSink", "MqttTarget", "parse_mqtt_url", "safe_url"]
