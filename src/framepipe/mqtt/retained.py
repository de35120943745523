"""The MQTT sink's retained topics as the broker should hold them: :class:`RetainedTopics`.

Guarantees:

* A topic's payload is published again only when it changed (:meth:`RetainedTopics.retain`),
  or when every one is due again after a reconnect (:meth:`RetainedTopics.republish`: a broker
  restarted without persistence gets them back).
* A camera forgotten (:meth:`RetainedTopics.forget`) has each of its topics cleared on the
  broker once (an empty retained message) and never republished, unless it is retained again;
  a topic another camera's name shares is kept.
* What is due to be published or cleared is only marked here; the writer
  (:mod:`framepipe.mqtt.writer`) takes it and puts back what a lost connection did not send.
"""

from __future__ import annotations

__all__ = ["RetainedTopics"]


class RetainedTopics:
    """The retained topics of each camera, their payloads, and which are due on the broker."""

    def __init__(self) -> None:
        self.payloads: dict[str, bytes] = {}
        """Each retained topic's payload as last set."""
        self.dirty: set[str] = set()
        """Topics whose payload is due to be published."""
        self.cleared: set[str] = set()
        """Topics due to be cleared on the broker (an empty retained message)."""
        self._topics: dict[str, set[str]] = {}
        """Each camera's retained topics (counts, health), to clear when it is removed."""

    @property
    def due(self) -> bool:
        """Whether a topic is due to be published or cleared."""
        return bool(self.dirty or self.cleared)

    def retain(self, camera: str, topic: str, payload: bytes) -> None:
        """Set ``topic`` (one of ``camera``'s) to ``payload``; due when that changes it."""
        self._topics.setdefault(camera, set()).add(topic)
        self.cleared.discard(topic)
        if self.payloads.get(topic) != payload:
            self.payloads[topic] = payload
            self.dirty.add(topic)

    def forget(self, camera: str) -> None:
        """A removed camera: clear its topics on the broker and republish them never again (a
        topic another camera's name shares is kept)."""
        topics = self._topics.pop(camera, set())
        kept = set().union(*self._topics.values())
        for topic in topics - kept:
            self.payloads.pop(topic, None)
            self.dirty.discard(topic)
            self.cleared.add(topic)

    def republish(self) -> None:
        """Make every retained topic due again (a new connection)."""
        self.dirty |= set(self.payloads)
