"""Reaching a detector hub from ``framepipe worker`` processes, through Redis.

A step on a worker gets a :class:`RemoteDetectorHub` (from
:func:`framepipe.server.detector.get_hub`), which pushes its request to the list
``{namespace}:detector:{hub_id}:requests``; the service's :class:`Relay` takes it, makes the
request on its hub and pushes progress and the answer (or the error, with its class) to a reply
list of that request (kept 10 minutes). The service keeps ``...:alive`` set (5 s expiry) while
it runs, to a token of this run of the service (its *instance*, new at each start), so a worker
asking a stopped service fails at once with :class:`~framepipe.errors.DetectorUnavailableError`
instead of waiting. A request carries the instance the worker saw; a worker waiting for an
answer fails at once with :class:`~framepipe.errors.DetectorUnavailableError` when the
heartbeat is gone or names another instance (the service was restarted: whatever the earlier
run had taken is lost with it), and a relay drops a request addressed to another instance
(its worker fails it so), never serving work nobody waits for.

While Redis does not answer, the relay retries (waiting from half a second, doubling, at most
4 s, below the heartbeat's expiry) and logs one warning when it goes away, naming the URL with
its password masked and the error, and one line when it answers again: never a line per try.
Redis refusing the credentials (a wrong password or user) is a setting to fix: it fails
:meth:`Relay.start` at once with :class:`~framepipe.errors.ConfigError`; met later (the
password changed on the server) it is retried the same way and said in one error line, as
refused credentials rather than a Redis that does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from framepipe.backoff import Backoff
from framepipe.errors import DetectorError, DetectorUnavailableError, MissingDependencyError
from framepipe.logs import get_logger
from framepipe.outage import Outage, cause
from framepipe.redis import namespaced
from framepipe.urls import safe_text, safe_url

__all__ = ["ProgressCallback", "Relay", "RelayedHub", "RemoteDetectorHub"]

_log = get_logger("server.detector")

ProgressCallback = Callable[[Mapping[str, Any]], None]


class RelayedHub(Protocol):
    """What a :class:`Relay` uses of the hub whose requests it relays
    (:class:`~framepipe.server.detector.DetectorHub`)."""

    @property
    def id(self) -> str: ...
    async def send(self, session_id: str, message: Mapping[str, Any]) -> bool: ...
    async def request(
        self,
        session_id: str,
        message: Mapping[str, Any],
        *,
        answer_timeout: float | None = None,
        what: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]: ...


_ALIVE_TTL = 5
_REPLY_TTL = 600
_RETRY = Backoff(initial=0.5, factor=2.0, maximum=4.0)
"""The relay's waits between tries while Redis does not answer."""
_START_CHECK = 2.0
"""Seconds :meth:`Relay.start` gives Redis to answer whether it takes the credentials."""
_CONNECT_TIMEOUT = 5.0
"""Seconds a connection to Redis may take to open."""
_SOCKET_TIMEOUT = 10.0
"""Seconds a command may wait for Redis's answer (the relay's blocking reads block 1 s): a
Redis that stops answering (paused, a half-open connection) fails a command within it."""


def _connect(url: str) -> Any:
    try:
        from framepipe.redis.connection import connect
    except ImportError as exc:
        raise MissingDependencyError("redis", "redis", "detectors reached from workers") from exc
    return connect(
        url, retries=None, connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_SOCKET_TIMEOUT
    )


def _redis_trouble() -> tuple[type[BaseException], ...]:
    """What Redis's being away, silent or refusing raises (redis-py's errors, the socket's)."""
    from redis.exceptions import RedisError

    return (RedisError, OSError)


_CLEANUP_WAIT = 2.0
"""Seconds a request's clean-up (deleting its reply list) may take before it is left to the
list's expiry."""


def _text(value: bytes | str | None) -> str | None:
    """A Redis value as text (clients may or may not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value


def _keys(namespace: str, hub_id: str) -> tuple[str, str]:
    return (
        namespaced(namespace, "detector", hub_id, "requests"),
        namespaced(namespace, "detector", hub_id, "alive"),
    )


class _Outage:
    """Redis not answering, as the relay's loops find it: one warning when the first of them
    fails, one line once every loop that failed has been answered again; nothing between.
    Credentials refused are said once too, at error level, whenever in the outage they come."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._failing: set[str] = set()
        self._outage = Outage()

    def failed(self, doing: str, exc: BaseException) -> None:
        from framepipe.redis.connection import denied, refused_credentials

        self._failing.add(doing)
        refused = denied(exc)
        first = self._outage.failed(exc, refused=refused)
        if not first:
            return
        if refused:
            _log.error(
                "detector relay: %s (%s); retrying until they are accepted, workers "
                "cannot reach the detectors meanwhile",
                refused_credentials(self.url, exc),
                doing,
            )
        else:
            _log.warning(
                "detector relay: Redis at %s does not answer (%s: %s); retrying until it "
                "does, workers cannot reach the detectors meanwhile",
                safe_url(self.url),
                doing,
                self._outage.last_error,
            )

    def answered(self, doing: str) -> None:
        if doing not in self._failing:
            return
        self._failing.discard(doing)
        lasted = None if self._failing else self._outage.answered()
        if lasted is not None:
            _log.info(
                "detector relay: Redis at %s answers again after %.0fs; relaying",
                safe_url(self.url),
                lasted,
            )


class Relay:
    """The service's side: takes workers' requests from Redis, answers through Redis."""

    def __init__(self, hub: RelayedHub, url: str, namespace: str) -> None:
        self.hub = hub
        self.url = url
        self.requests, self.alive = _keys(namespace, hub.id)
        self.instance = uuid.uuid4().hex
        """This run of the relay: the heartbeat's value, what workers' requests name."""
        self._client: Any = None
        self._outage = _Outage(url)
        self._tasks: set[asyncio.Task[None]] = set()
        self._main: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Start relaying; Redis being away now is retried in the background, not fatal.
        Redis refusing the credentials raises :class:`~framepipe.errors.ConfigError` (naming
        the relay and the URL, its password masked), checked within ``_START_CHECK``
        seconds."""
        from framepipe.redis.connection import check_credentials

        client = _connect(self.url)
        try:
            await check_credentials(client, self.url, what="detector relay", within=_START_CHECK)
        except BaseException:
            await client.aclose()
            raise
        self._client = client
        self._main = [
            asyncio.create_task(self._take(), name="framepipe-detector-relay"),
            asyncio.create_task(self._beat(), name="framepipe-detector-alive"),
        ]

    async def stop(self) -> None:
        for task in [*self._main, *self._tasks]:
            task.cancel()
        for task in [*self._main, *self._tasks]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.delete(self.alive)
            await self._client.aclose()

    async def _beat(self) -> None:
        tries = 0
        while True:
            try:
                await self._client.set(self.alive, self.instance, ex=_ALIVE_TTL)
            except _redis_trouble() as exc:  # Redis away or restarting: tried again, less often
                tries += 1
                self._outage.failed("heartbeat", exc)
                await asyncio.sleep(_RETRY.delay(tries))
                continue
            tries = 0
            self._outage.answered("heartbeat")
            await asyncio.sleep(1.0)

    async def _take(self) -> None:
        tries = 0
        while True:
            try:
                item = await self._client.blpop([self.requests], timeout=1)
            except _redis_trouble() as exc:
                tries += 1
                self._outage.failed("reading requests", exc)
                await asyncio.sleep(_RETRY.delay(tries))
                continue
            tries = 0
            self._outage.answered("reading requests")
            if item is None:
                continue
            try:
                request = json.loads(item[1])
                reply_to = str(request["reply_to"])
            except (ValueError, KeyError, TypeError):
                _log.warning("detector relay: dropped a malformed request %r", item[1][:200])
                continue
            addressed = request.get("instance")
            if addressed is not None and addressed != self.instance:
                _log.info(
                    "detector relay: dropped %s, asked of an earlier run of this service "
                    "(its worker is told the service restarted)",
                    request.get("what"),
                )
                continue
            task = asyncio.create_task(self._serve(reply_to, request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _push(self, reply_to: str, answer: Mapping[str, Any]) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.rpush(reply_to, json.dumps(answer))
            pipe.expire(reply_to, _REPLY_TTL)
            await pipe.execute()

    async def _answer(
        self, reply_to: str, request: Mapping[str, Any], reply: Mapping[str, Any]
    ) -> None:
        """Push ``reply``; if Redis refuses it (gone meanwhile), say so in one warning: the
        worker's own wait then ends its request, with the service's heartbeat gone or its
        answer timeout, so nothing else is to be done here."""
        try:
            await self._push(reply_to, reply)
        except Exception as exc:
            _log.warning(
                "detector relay: the %s of %s could not be sent to the worker (%s: %s)",
                reply.get("kind"),
                request.get("what"),
                type(exc).__name__,
                safe_text(str(exc)),
            )

    async def _serve(self, reply_to: str, request: dict[str, Any]) -> None:
        session_id = str(request.get("session_id"))
        message = request.get("message") or {}
        try:
            if request.get("kind") == "send":
                sent = await self.hub.send(session_id, message)
                await self._answer(reply_to, request, {"kind": "answer", "message": {"sent": sent}})
                return
            progress: list[asyncio.Task[None]] = []

            def on_progress(update: Mapping[str, Any]) -> None:
                progress.append(
                    asyncio.create_task(
                        self._push(reply_to, {"kind": "progress", "message": dict(update)})
                    )
                )

            answer = await self.hub.request(
                session_id,
                message,
                answer_timeout=request.get("answer_timeout"),
                what=request.get("what"),
                on_progress=on_progress,
            )
            await asyncio.gather(*progress, return_exceptions=True)
            await self._answer(reply_to, request, {"kind": "answer", "message": answer})
        except DetectorError as exc:
            await self._answer(
                reply_to,
                request,
                {
                    "kind": "error",
                    "class": type(exc).__name__,
                    "reason": exc.reason,
                    "detector_id": exc.detector_id,
                    "session_id": exc.session_id,
                },
            )
        except Exception as exc:
            _log.exception("detector relay: request %s failed", request.get("what"))
            await self._answer(
                reply_to,
                request,
                {
                    "kind": "error",
                    "class": "DetectorError",
                    "reason": f"the service failed the request: {exc}",
                    "detector_id": None,
                    "session_id": session_id,
                },
            )


class RemoteDetectorHub:
    """A :class:`DetectorHub` of a service in another process, reached through Redis (what a
    step on a worker gets from :func:`get_hub`). Same calls, same errors: a detector error is
    raised here with its class and message; a service that is not running (no heartbeat) is a
    :class:`DetectorUnavailableError` at once; one that stops answering is one within
    ``_ALIVE_TTL`` seconds, and one restarted while a request waits (its heartbeat names
    another instance) is one within a second."""

    def __init__(
        self, hub_id: str, url: str, namespace: str, *, request_timeout: float = 600.0
    ) -> None:
        self.id = hub_id
        self.url = url
        self.namespace = namespace
        self.requests, self.alive = _keys(namespace, hub_id)
        self.request_timeout = request_timeout

    def owner(self, session_id: str) -> str | None:
        """Not known here (the service knows); None."""
        return None

    async def _call(
        self,
        kind: str,
        session_id: str,
        message: Mapping[str, Any],
        answer_timeout: float | None,
        what: str | None,
        on_progress: ProgressCallback | None,
    ) -> dict[str, Any]:
        client = _connect(self.url)
        reply_to = namespaced(self.namespace, "detector", "reply", uuid.uuid4().hex)
        what = what or str(message.get("type"))
        try:
            instance = _text(await client.get(self.alive))
            if instance is None:
                raise DetectorUnavailableError(
                    f"the service holding detector hub {self.id} is not running (no heartbeat "
                    f"on {self.alive}), so {what} cannot be asked for",
                    session_id=session_id,
                )
            await client.rpush(
                self.requests,
                json.dumps(
                    {
                        "kind": kind,
                        "reply_to": reply_to,
                        "instance": instance,
                        "session_id": session_id,
                        "message": dict(message),
                        "answer_timeout": answer_timeout,
                        "what": what,
                    }
                ),
            )
            limit = (self.request_timeout if answer_timeout is None else answer_timeout) + 120
            deadline = time.monotonic() + limit
            while True:
                item = await client.blpop([reply_to], timeout=1)
                if item is None:
                    if time.monotonic() > deadline:
                        raise DetectorError(
                            f"no answer to {what} within {limit:g}s", session_id=session_id
                        )
                    now = _text(await client.get(self.alive))
                    if now is None:
                        raise DetectorUnavailableError(
                            f"the service holding detector hub {self.id} stopped while "
                            f"waiting for {what}",
                            session_id=session_id,
                        )
                    if now != instance:
                        raise DetectorUnavailableError(
                            f"the service holding detector hub {self.id} was restarted while "
                            f"waiting for {what}; the request was lost with its earlier run",
                            session_id=session_id,
                        )
                    continue
                reply = json.loads(item[1])
                if reply["kind"] == "progress":
                    if on_progress is not None:
                        on_progress(reply["message"])
                    continue
                if reply["kind"] == "answer":
                    return dict(reply["message"])
                cls = (
                    DetectorUnavailableError
                    if reply.get("class") == "DetectorUnavailableError"
                    else DetectorError
                )
                raise cls(
                    str(reply.get("reason")),
                    detector_id=reply.get("detector_id"),
                    session_id=reply.get("session_id"),
                )
        except _redis_trouble() as exc:
            from framepipe.redis.connection import denied, refused_credentials

            why = (
                refused_credentials(self.url, exc)
                if denied(exc)
                else f"Redis at {safe_url(self.url)} does not answer ({cause(exc)})"
            )
            raise DetectorUnavailableError(
                f"{why}, so {what} cannot be asked of detector hub {self.id}",
                session_id=session_id,
            ) from exc
        finally:
            # Bounded: a Redis that accepts and never answers must not hold the caller past
            # its own timeout (send_sync's wait) for as long as the connection lasts.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.delete(reply_to), _CLEANUP_WAIT)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.aclose(), _CLEANUP_WAIT)

    async def request(
        self,
        session_id: str,
        message: Mapping[str, Any],
        *,
        answer_timeout: float | None = None,
        what: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """:meth:`DetectorHub.request`, made by the service on behalf of this process."""
        return await self._call("request", session_id, message, answer_timeout, what, on_progress)

    def request_sync(
        self,
        session_id: str,
        message: Mapping[str, Any],
        *,
        answer_timeout: float | None = None,
        what: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """:meth:`request` from a thread without a running event loop (a sync step)."""
        return asyncio.run(
            self.request(
                session_id,
                message,
                answer_timeout=answer_timeout,
                what=what,
                on_progress=on_progress,
            )
        )

    async def send(self, session_id: str, message: Mapping[str, Any]) -> bool:
        """:meth:`DetectorHub.send` through the service; False if the detector is away."""
        answer = await self._call("send", session_id, message, 30.0, str(message.get("type")), None)
        return bool(answer.get("sent"))

    def send_sync(self, session_id: str, message: Mapping[str, Any], *, wait: float = 10.0) -> bool:
        """:meth:`send` from a thread without a running event loop, waiting at most ``wait``
        seconds for the service's answer; past it a :class:`TimeoutError`, as from
        :meth:`DetectorHub.send_sync`. The message may still be delivered after that: the
        service takes it from Redis when it can."""
        return asyncio.run(self._send_within(session_id, message, wait))

    async def _send_within(self, session_id: str, message: Mapping[str, Any], wait: float) -> bool:
        limit = asyncio.timeout(wait)
        try:
            async with limit:
                return await self.send(session_id, message)
        except TimeoutError:
            if not limit.expired():
                raise
            raise TimeoutError(
                f"no answer from the service holding detector hub {self.id} to "
                f"{message.get('type')} within {wait:g}s"
            ) from None
