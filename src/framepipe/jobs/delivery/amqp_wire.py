"""What the RabbitMQ delivery's two connections share: a connection opened and closed
(:class:`Link`), the quorum queue's arguments and a message's format.

A message names up to :data:`BATCH` ready steps of one execution, as JSON ``{"e": execution
id, "k": [step keys]}`` (:func:`batches`, :func:`message_body`, :func:`parse`); the publishing
connection writes them, the consuming one takes them apart (:class:`Taken`) and settles each
once all its steps are (:func:`settle_message`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection
from aio_pika.connection import make_url
from aio_pika.exceptions import CONNECTION_EXCEPTIONS, ChannelInvalidStateError
from aiormq.abc import DeliveredMessage
from pamqp.common import FieldTable

from framepipe.errors import BrokerError
from framepipe.jobs.rounds import Delivery
from framepipe.redis import safe_url

__all__ = [
    "BATCH",
    "PERSISTENT",
    "QUORUM",
    "Link",
    "Taken",
    "batches",
    "channel_closed_by_server",
    "delivery_count",
    "message_body",
    "parse",
    "server_version",
    "settle_message",
    "tag_of",
]

# aiormq logs every failure it meets, with a traceback, and then raises it; here it becomes one
# BrokerError that the caller reports (the worker: one line, and it retries). So only its
# critical records are kept.
logging.getLogger("aiormq").setLevel(logging.CRITICAL)
BATCH = 16
"""Steps per message at most."""
QUORUM: FieldTable = {"x-queue-type": "quorum"}
"""The arguments the queue is declared with (by either connection)."""
PERSISTENT = aiormq.spec.Basic.Properties(content_type="application/json", delivery_mode=2)
"""The properties of every message published."""


class Link:
    """One connection to RabbitMQ at ``url``, named ``name`` (what the management UI shows),
    opened by :meth:`connect` and used only on the delivery's loop thread.

    A connection is replaced only once its ``close()`` was awaited here, also one that
    RabbitMQ closed or whose closing the timeout cut short: one left to aio-pika's finaliser is
    closed from whichever thread collects it, where no event loop runs ("RuntimeWarning:
    coroutine 'Connection.close' was never awaited", once per outage). ``on_closed`` is called
    when RabbitMQ closes the current connection: what lived on it is to be forgotten."""

    def __init__(
        self, url: str, name: str, *, timeout: float, on_closed: Callable[[], None]
    ) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        self.name = name
        self.timeout = timeout
        self.conn: AbstractConnection | None = None
        self._on_closed = on_closed
        # Connections RabbitMQ closed (a broker gone, a forced close), to close here too.
        self._stale: list[AbstractConnection] = []

    async def connect(self) -> AbstractConnection:
        """Open a new connection (the current one must have been forgotten or closed)."""
        conn = aio_pika.Connection(
            make_url(self.url), client_properties={"connection_name": self.name}
        )
        try:
            await conn.connect(timeout=self.timeout)
        except BaseException as exc:
            await conn.close()  # or aio-pika closes it from its finaliser, in any thread
            if _refused_open(exc):
                raise BrokerError(
                    f"job broker {self.safe_url}: RabbitMQ refused to open the connection: "
                    f"the virtual host {vhost_of(self.url)!r} does not exist, or user "
                    f"{make_url(self.url).user or 'guest'!r} may not use it",
                    url=self.safe_url,
                ) from exc
            raise
        conn.close_callbacks.add(self._on_close)
        self.conn = conn
        return conn

    def forget(self) -> AbstractConnection | None:
        """The current connection, no longer current: the caller closes it (:meth:`close`)."""
        conn, self.conn = self.conn, None
        return conn

    async def close(self, conn: AbstractConnection | None) -> bool:
        """Close ``conn``, then every connection RabbitMQ closed, each waiting a timeout at
        most (a blocked or frozen one never answers). A close cut short is finished at once
        (aio-pika let go of the transport when it began, so nothing more is sent). True when
        RabbitMQ answered each close (its ``Close-Ok`` came) within the timeout."""
        answered = await self._close(conn)
        while self._stale:
            answered = await self._close(self._stale.pop()) and answered
        return answered

    async def _close(self, conn: AbstractConnection | None) -> bool:
        if conn is None or conn.is_closed:
            return True
        # aiormq ends its reader when Close-Ok comes, and cancels it when it gives up waiting
        # (after 2 s, and returns as if closed): only the first is an answer.
        transport = conn.transport
        reader: asyncio.Task[Any] | None = getattr(
            transport.connection if transport is not None else None, "_reader_task", None
        )
        answered = True
        for _ in range(2):
            if conn is None or conn.is_closed:
                break
            try:
                async with asyncio.timeout(self.timeout):
                    await conn.close()
            except TimeoutError:
                answered = False
            except CONNECTION_EXCEPTIONS:
                pass
        if reader is not None and (not reader.done() or reader.cancelled()):
            answered = False
        return answered

    def _on_close(self, sender: AbstractConnection | None, *_args: Any) -> None:
        """A connection closed under the delivery (RabbitMQ closed it, or went away; one
        closed here was forgotten first): forgotten at once, and kept to be closed here by the
        next :meth:`close`."""
        if sender is not None and sender is self.conn:
            self._stale.append(sender)
            self.conn = None
            self._on_closed()


@dataclass(eq=False)
class Taken:
    """A message whose steps were taken apart: settled when every one of them is."""

    message: DeliveredMessage
    size: int
    unsettled: int = field(init=False)
    handed_back: int = 0
    done: bool = False  # acknowledged or handed back whole: its other steps settle nothing

    def __post_init__(self) -> None:
        self.unsettled = self.size


def batches(deliveries: Sequence[Delivery]) -> list[tuple[str, list[str]]]:
    """(execution id, up to :data:`BATCH` keys) per message, in the order given."""
    by_execution: dict[str, list[str]] = {}
    for d in deliveries:
        by_execution.setdefault(d.execution_id, []).append(d.key)
    return [
        (e, keys[i : i + BATCH])
        for e, keys in by_execution.items()
        for i in range(0, len(keys), BATCH)
    ]


def message_body(execution_id: str, keys: list[str]) -> bytes:
    """The body of a message naming the steps ``keys`` of one execution."""
    return json.dumps({"e": execution_id, "k": keys}).encode()


def parse(body: bytes) -> list[Delivery]:
    """The steps a message names: ``{"e": "...", "k": ["...", ...]}`` (or ``"k": "..."``);
    empty when it is not that."""
    try:
        fields = json.loads(body)
    except ValueError:
        return []
    if not isinstance(fields, dict):
        return []
    e, keys = fields.get("e"), fields.get("k")
    if isinstance(keys, str):
        keys = [keys]
    if not (
        isinstance(e, str)
        and e
        and isinstance(keys, list)
        and keys
        and all(isinstance(k, str) and k for k in keys)
    ):
        return []
    return [Delivery(e, k) for k in keys]


def delivery_count(message: DeliveredMessage) -> int:
    """How often a quorum queue had the message come back before this delivery (its
    ``x-delivery-count`` header; 0 when absent, as on a first delivery)."""
    headers = message.header.properties.headers or {}
    count = headers.get("x-delivery-count")
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def server_version(message: DeliveredMessage) -> str | None:
    """The RabbitMQ version the server that delivered ``message`` announced, if it did."""
    connection = getattr(message.channel, "connection", None)
    properties = getattr(connection, "server_properties", None) or {}
    version = properties.get("version") if isinstance(properties, dict) else None
    if isinstance(version, bytes):
        version = version.decode(errors="replace")
    return version if isinstance(version, str) and version else None


def tag_of(message: DeliveredMessage) -> int:
    """The delivery tag of a message delivered to a consumer."""
    tag = message.delivery_tag
    assert tag is not None  # a delivery to a consumer always has one
    return tag


async def settle_message(message: DeliveredMessage, *, requeue: bool | None) -> None:
    """Ack (``requeue`` None) or nack one message; a message whose channel is gone was
    requeued by RabbitMQ already. The frame is queued for writing, not waited for."""
    with contextlib.suppress(ChannelInvalidStateError):
        if requeue is None:
            await message.channel.basic_ack(tag_of(message), wait=False)
        else:
            await message.channel.basic_nack(tag_of(message), requeue=requeue, wait=False)


_REPLY_CODES = {cls: code for code, cls in aiormq.channel.EXCEPTION_MAPPING.items()}


def channel_closed_by_server(exc: BaseException | None) -> str | None:
    """The reply with which RabbitMQ closed a channel (``406 PRECONDITION_FAILED - unknown
    delivery tag 7``) when ``exc`` is that, else None (a channel closed by the client, or
    with its connection: the connection's own handling covers those)."""
    if not isinstance(exc, aiormq.exceptions.ChannelClosed) or not exc.args:
        return None
    code = _REPLY_CODES.get(type(exc))
    if code is not None:  # aiormq keeps only the reply text for the codes it maps
        return f"{code} {exc.args[0]}"
    if len(exc.args) == 2 and exc.args[0] is not None:
        return f"{exc.args[0]} {exc.args[1]}"
    return None


def _refused_open(exc: BaseException) -> bool:
    """RabbitMQ answered the opening of a connection (after the login) by closing it: aiormq
    then raises an error that only shows the frame's repr, not its reason."""
    return isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc)


def vhost_of(url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when its path is empty)."""
    path = make_url(url).path
    return path[1:] if len(path) > 1 else "/"
