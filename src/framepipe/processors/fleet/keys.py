"""The names a fleet shares on Redis: its key names per namespace, the consumer group of every
processor stream, the states a processor's record holds, and the defaults of both sides.

Guarantees: every key is named by :func:`framepipe.redis.namespaced` under its namespace
(given with or without its trailing colon), and a frame entry's ``reply_to`` is accepted only
when it names a reply stream of that namespace (:meth:`Keys.reply_stream_of`), so no answer
(nor the expiry it sets) ever reaches another key. No Redis, no connection: only names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from framepipe.processors.fleet.field_values import BadEntryError, text
from framepipe.redis import namespaced

__all__ = ["DEFAULT_NAMESPACE", "DEFAULT_REDIS_URL", "GROUP", "Keys", "ProcessorState"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "framepipe:"
GROUP = "processors"
"""The consumer group on every processor stream."""


class ProcessorState:
    """Values of the ``state`` field of a processor's hash."""

    READY = "ready"
    """Registered and taking frames."""
    DRAINING = "draining"
    """Stopping: finishing its frames, takes no new one."""
    STOPPED = "stopped"
    """Stopped with entries left in its stream; the registry re-routes them and removes it."""
    DEAD = "dead"
    """Declared dead by the registry (no heartbeat for ``heartbeat_timeout``)."""


@dataclass(frozen=True)
class Keys:
    """The Redis key names of one namespace (given with or without its trailing colon)."""

    namespace: str = DEFAULT_NAMESPACE

    @property
    def processors(self) -> str:
        """The set of registered processor ids."""
        return namespaced(self.namespace, "processors")

    def proc(self, processor_id: str) -> str:
        """The hash describing one processor."""
        return namespaced(self.namespace, "proc", processor_id)

    def frames(self, processor_id: str) -> str:
        """The dedicated frame stream of one processor."""
        return namespaced(self.namespace, "proc", processor_id, "frames")

    def replies(self, registry_id: str) -> str:
        """The reply stream of one registry (router)."""
        return namespaced(self.namespace, "replies", registry_id)

    def reply_stream_of(self, fields: Mapping[bytes, bytes]) -> bytes | None:
        """The reply stream frame entry ``fields`` names in ``reply_to`` (None: it names
        none). Whoever answers an entry writes to that key and sets its expiry
        (:data:`~framepipe.redis.scripts.REPLY_STREAM_TTL`), so the entry may name only a
        reply stream of this namespace (``<ns>:replies:<registry id>``): any other key, such
        as another namespace's registry, raises :class:`BadEntryError` and is never written."""
        target = fields.get(b"reply_to")
        if not target:
            return None
        prefix = self.replies("").encode()
        if not target.startswith(prefix) or len(target) == len(prefix):
            raise BadEntryError(
                f"reply_to {text(target[:120])!r} is not a reply stream of namespace "
                f"{self.namespace!r} (a key {prefix.decode()}<registry id>)"
            )
        return target

    @property
    def results(self) -> str:
        """The default result stream of the processors of this namespace."""
        return namespaced(self.namespace, "results")
