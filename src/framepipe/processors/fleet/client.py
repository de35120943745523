"""``ProcessorClient``: the base class of a frame-processing service that registers on Redis.

A service subclasses :class:`ProcessorClient` and implements only
``async def process_frame(self, frame_data: dict[bytes, bytes]) -> dict | None``; ``frame_data``
holds the fields of one frame entry (see :mod:`~framepipe.processors.fleet.protocol` for the
wire format and the keys), ``image_data`` as base64 of the image unless
``image_encoding="raw"``. Code written for the processor fleet's own ``ProcessorClient`` runs
as written: its constructor keywords and positional order, its defaults (capacity 10, base64
image data), the compose environment (``PROCESSOR_ID``, ``REDIS_HOST``/``REDIS_PORT``,
``ORCHESTRATOR_URL``; :mod:`~framepipe.processors.fleet.environment`), ``health_port``
(:mod:`~framepipe.processors.fleet.health`), and its main (``signal.signal`` handlers calling
``processor.stop()``, then ``asyncio.run(processor.start())``).

``await client.start()`` registers the processor, consumes its dedicated stream and returns
once the client was stopped (``await client.stop()``, or
SIGTERM/SIGINT after :meth:`ProcessorClient.install_signal_handlers`).

Guarantees:

* At most ``capacity`` frames are inside ``process_frame`` at any moment (XREADGROUP asks for
  no more than the free capacity).
* A frame entry is acknowledged only after its result was published, in one Lua script with
  the acknowledgement, to ``result_stream`` and to the router's reply stream. A frame whose handling
  is interrupted (the process killed, Redis lost for good, the shutdown timeout) stays pending in
  the processor's stream; the :class:`~framepipe.processors.fleet.registry.ProcessorRegistry`
  re-routes it to another processor. Delivery is at least once.
* A malformed entry (missing field, image that is not JPEG/PNG bytes or base64 of them, bad
  metadata JSON, a ``reply_to`` that is not a reply stream of its namespace: never written
  to), a ``process_frame`` that raises (or exceeds ``frame_timeout``) and a result
  that is not a JSON-serialisable dict each give an error result for that frame (``status``
  ``error``, ``error_kind`` ``input``/``processor``/``output``, the error text), are acked and
  logged; the consumer goes on. So is a result Redis rejects for good (``result_stream`` a key
  of another type, an ACL without it): an ``output`` error naming the result stream, on the
  router's reply stream. A ``result_stream`` that is a key of another type at start fails the
  start with :class:`~framepipe.errors.ConfigError` naming it.
* Redis unreachable at start: :class:`~framepipe.errors.RegistryConnectionError` naming the URL
  after ``connect_retries`` retries; its credentials refused (a wrong password): a
  :class:`~framepipe.errors.ConfigError` at once (later, said once at error level and waited
  out); never a hang. Redis lost later, or refusing for a while
  (``LOADING`` after a restart, ``BUSY``, ``OOM``, ``READONLY``:
  :mod:`~framepipe.processors.fleet.outages`): the client reconnects with exponential backoff
  (for as long as it runs; cut short by the first heartbeat that goes through, so that it
  reads its stream again within a heartbeat period of Redis's return), registers again,
  takes back the entries it held and publishes the results it finished meanwhile.
* Entries pending in its stream that it does not hold are taken back: at start (an earlier
  life's), after reconnecting, and whenever a heartbeat finds entries of its stream held by
  another consumer (the registry takes the entries of a processor it declared dead; when none
  can take them over and the processor turns out alive, they are answered here). Each taking
  back is a delivery: an entry already delivered ``max_attempts`` times (its router's setting,
  :class:`~framepipe.processors.fleet.frame_entries.Attempts`) is not run again but answered with
  an error result (``error_kind`` ``lost``) and acknowledged, so a frame that kills the process
  stops after ``max_attempts`` restarts under the same id.
* A ``process_frame`` that raises while ``image_encoding`` was left to its default gets a
  hint in its error text when the error is plausibly about reading the image (a decoder's
  error, or one naming an image, decoding or base64:
  :func:`~framepipe.processors.fleet.handling.about_image`): the image data is base64 unless
  ``image_encoding="raw"``. Its log does not get a traceback per frame: the first error of
  each kind at once, then one line per 10 s with the count of frames failed so
  (:class:`~framepipe.processors.fleet.handling.Raised`); every frame still gets its error.
* One process per id: a start under an id a live process holds fails with
  :class:`~framepipe.errors.ConfigError` naming it (the record of one that died without
  deregistering is taken over, once its heartbeat is seen standing still:
  :mod:`~framepipe.processors.fleet.identity`). A process whose id was taken over so while it
  was only cut off from Redis finds it at its first heartbeat back (the record holds another
  client's ``instance``): it stops without touching the other's record or stream, and
  ``start()`` raises :class:`~framepipe.errors.ConfigError` naming the holder.
* A frame read or taken back past its deadline (its sender stopped waiting for it: a call's
  result timeout, a route's ``max_age``; judged on Redis's clock) is acknowledged and deleted
  without running ``process_frame`` and without a result, counted in :attr:`expired` and
  logged at most once per 10 s with the count (:mod:`~framepipe.processors.fleet.deadlines`).
  So a processor that was away does not spend its return on frames nobody waits for.
* Heartbeats every ``health_interval`` (``last_heartbeat``, ``in_flight``, ``processed``,
  ``failed``, ``expired`` in the processor's hash). A processor declared dead by the registry
  (silent too long) that turns out alive registers again at its next heartbeat.
* ``stop()`` / SIGTERM: the state becomes ``draining`` at once (routers send nothing more), the
  client takes no new frame, finishes the frames in flight (bounded by ``shutdown_timeout``;
  unfinished ones stay pending and are re-routed), deregisters and ``start()`` returns.

Connections: the processor's blocking ``XREADGROUP`` and its publish script run on two
:class:`~framepipe.redis.wire.Wire` connections; registration and heartbeats use redis-py.

The module holds the client as its user sees it (its constructor's arguments, stop, run, the
helpers for subclasses); its layers have modules of their own: its state
(:mod:`~framepipe.processors.fleet.client_state`), the answering of one frame
(:mod:`~framepipe.processors.fleet.answering`) and its life: start, consume, reconnect,
drain, deregister (:mod:`~framepipe.processors.fleet.serving`). Its parts too: its record in
Redis (registration, heartbeats, giving way to a process that took its id over:
:mod:`~framepipe.processors.fleet.membership`), its options
(:mod:`~framepipe.processors.fleet.options`),
the reading of its stream and the taking back of pending entries
(:mod:`~framepipe.processors.fleet.consuming`), the handling of one frame
(:mod:`~framepipe.processors.fleet.handling`), the publishing of its results
(:mod:`~framepipe.processors.fleet.publishing`) and the wire format
(:mod:`~framepipe.processors.fleet.protocol`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
from collections.abc import Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from framepipe.processors.fleet.options import (
    DEFAULT_CAPACITY,
    DEFAULT_HEALTH_HOST,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_IMAGE_ENCODING,
)
from framepipe.processors.fleet.serving import Serving

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_HEALTH_HOST",
    "DEFAULT_HEALTH_INTERVAL",
    "DEFAULT_IMAGE_ENCODING",
    "ProcessorClient",
]


class _StopWaiter:
    """What :meth:`ProcessorClient.stop` returns: await it to wait for the end, or ignore it."""

    def __init__(self, client: ProcessorClient) -> None:
        self._client = client

    def __await__(self) -> Generator[Any, None, None]:
        return self._client._wait_stopped().__await__()


class ProcessorClient(Serving):
    """A frame-processing service registered on Redis. Subclass it and implement
    :meth:`process_frame`; see the module docstring for the guarantees.

    The positional order is the processor fleet's: ``processor_id``, ``capabilities``,
    ``orchestrator_url``, ``capacity``, ``redis_client``, ``redis_url``, ``result_stream``,
    ``health_port``, ``health_check_interval``; everything else is keyword-only.

    ``processor_id`` must be unique in the namespace (one process per id); ``PROCESSOR_ID`` in
    the environment wins over it. ``capabilities`` are the names a router matches
    (``["face_detection", "face_recognition"]``). ``capacity`` is the number of frames processed
    at once (10). ``redis_url`` (``redis://host:6379/0``) defaults to ``REDIS_URL``, else
    ``REDIS_HOST``/``REDIS_PORT``, else ``127.0.0.1:6379``; ``redis_client`` is used instead when
    given (not closed by the client). ``orchestrator_url`` (default ``ORCHESTRATOR_URL``) is
    reported and never contacted: registration goes through Redis (a ``redis://`` URL there
    names the Redis when nothing else does). ``result_stream`` (default ``<ns>:results``)
    receives every result, trimmed to about ``result_maxlen`` entries (None: never trimmed).
    ``health_port`` serves ``GET /health`` on ``health_host``
    (:mod:`~framepipe.processors.fleet.health`). ``health_check_interval`` (or its other name
    ``health_interval``) is the heartbeat period in seconds (5); the registry waits
    ``max(heartbeat_timeout, 3 x the period)`` before declaring it dead. ``namespace`` defaults
    to ``FRAMEPIPE_NAMESPACE``, else ``framepipe:``. ``image_encoding`` chooses what
    ``frame_data[b"image_data"]`` holds: ``base64`` of the image (the default, the processor
    fleet's frame format), or the ``raw`` bytes; :meth:`decode_image` reads either (the wire
    carries raw bytes either way). ``frame_timeout`` bounds one ``process_frame`` call.
    ``environ`` is the environment read for the settings above (default ``os.environ``; ``{}``
    reads none).
    """

    # -- helpers for subclasses -------------------------------------------------------------

    def decode_image(self, frame_data: Mapping[bytes, bytes]) -> npt.NDArray[np.uint8]:
        """The frame's image as a BGR array (OpenCV); raises :class:`FrameError` on bad data."""
        from framepipe.frames import decode_jpeg

        data = frame_data[b"image_data"]
        if self.image_encoding == "base64":
            data = base64.b64decode(data)
        return decode_jpeg(data)

    @staticmethod
    def metadata(frame_data: Mapping[bytes, bytes]) -> dict[str, Any]:
        """The entry's ``metadata`` JSON object ({} when absent)."""
        raw = frame_data.get(b"metadata")
        return dict(json.loads(raw)) if raw else {}

    # -- lifecycle ----------------------------------------------------------------------------

    async def wait_registered(self) -> None:
        """Wait until the processor is registered (bound it with ``asyncio.timeout``)."""
        await self._registered.wait()

    def install_signal_handlers(
        self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
    ) -> None:
        """Stop gracefully on ``signals`` (call inside the running loop, before ``start``)."""
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> _StopWaiter:
        """Ask the client to stop (see the module docstring). Safe from a signal handler or
        another thread; ``await client.stop()`` also waits until ``start()`` has finished."""
        self._stop_requested = True
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_stop)
        return _StopWaiter(self)

    async def _wait_stopped(self) -> None:
        if self._stopped_event is not None and self._running:
            await self._stopped_event.wait()

    async def run(self) -> None:
        """:meth:`start` with SIGTERM/SIGINT handlers installed (the service's main)."""
        self.install_signal_handlers()
        await self.start()
