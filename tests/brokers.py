"""The real job brokers for the tests: Redis (``conftest.REDIS_URL``) and RabbitMQ
(``AMQP_URL``: 127.0.0.1:5672, guest/guest, or ``FRAMEPIPE_TEST_AMQP_URL``).

:func:`broker_namespace` gives a test a namespace of its own on either and deletes what was
made under it; :class:`PrivateRabbitMQ` is a RabbitMQ node of the test's own, to crash and
restart. A broker that is missing skips the test with the reason, or fails it under CI=true.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from conftest import REDIS_URL, redis_namespace, service_missing
from waiting import free_port  # also imported from here by test modules

AMQP_URL = os.environ.get("FRAMEPIPE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
BROKERS = ("redis", "rabbitmq")


def queue_of(namespace: str) -> str:
    """The queue (or stream) of a namespace: what the deliveries name it."""
    return f"{namespace.rstrip(':')}:jobs:steps"


async def _amqp_delete(url: str, queue: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


def amqp_delete(url: str, queue: str) -> None:
    """Delete ``queue`` (and the messages in it) on the RabbitMQ at ``url``."""
    asyncio.run(_amqp_delete(url, queue))


@contextlib.contextmanager
def amqp_namespace(prefix: str, url: str = AMQP_URL) -> Iterator[str]:
    """A fresh queue-name prefix on the RabbitMQ at ``url``; its queue is deleted afterwards."""
    try:
        import aio_pika
    except ImportError as exc:
        service_missing("the aio-pika package (pip install 'framepipe[amqp]')", exc)
        raise

    async def ping() -> None:
        connection = await aio_pika.connect(url, timeout=3)
        await connection.close()

    try:
        asyncio.run(ping())
    except Exception as exc:
        service_missing(f"RabbitMQ at {url}", exc)
    namespace = f"{prefix}{uuid.uuid4().hex[:10]}:"
    try:
        yield namespace
    finally:
        with contextlib.suppress(Exception):  # a broker the test stopped is gone with it
            amqp_delete(url, queue_of(namespace))


@contextlib.contextmanager
def broker_namespace(kind: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(URL, namespace) on the real broker ``kind`` ('redis' or 'rabbitmq')."""
    if kind == "redis":
        with redis_namespace(prefix) as namespace:
            yield REDIS_URL, namespace
    elif kind == "rabbitmq":
        with amqp_namespace(prefix) as namespace:
            yield AMQP_URL, namespace
    else:
        raise ValueError(f"unknown broker {kind!r}")


class PrivateRabbitMQ:
    """A RabbitMQ node of the test's own: free ports (AMQP and Erlang distribution), its name,
    configuration, data and logs in a temporary folder, nothing shared with the machine's node
    but epmd. :meth:`crash` kills it with SIGKILL; :meth:`start` boots it again on its data."""

    def __init__(self) -> None:
        binary = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")  # not the wrapper, which su's
        found = str(binary) if binary.exists() else shutil.which("rabbitmq-server")
        if found is None:
            service_missing(
                "rabbitmq-server (apt-get install rabbitmq-server)",
                FileNotFoundError("rabbitmq-server"),
            )
            raise AssertionError("unreachable")
        self.binary = found
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="fp-rmq-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\n"
            "log.console = false\nlog.file.level = info\n"
        )
        (self.root / "rabbitmq-env.conf").write_text("")
        (self.root / "enabled_plugins").write_text("[].\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "RABBITMQ_NODENAME": f"fp-test-{uuid.uuid4().hex[:8]}@localhost",
            "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.root / "log"),
            "RABBITMQ_PID_FILE": str(self.root / "node.pid"),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_FLAGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        """Boot the node; returns once it accepts AMQP connections."""
        with open(self.root / "server.out", "ab") as out:
            self.proc = subprocess.Popen(
                [self.binary],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"rabbitmq-server exited with {self.proc.returncode}: {self.output()[-2000:]}"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError(
            f"rabbitmq-server did not listen within {timeout}s: {self.output()[-2000:]}"
        )

    def output(self) -> str:
        path = self.root / "server.out"
        return path.read_text(errors="replace") if path.exists() else ""

    def crash(self) -> None:
        """SIGKILL the node and everything it started (its own process group)."""
        proc = self.proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.proc = None

    def shutdown(self, timeout: float = 60.0) -> None:
        """Stop the node cleanly (SIGTERM): it writes down what it keeps in memory, such as
        the registry of its quorum queues (which a crash within minutes of declaring one may
        lose, RabbitMQ's own behaviour)."""
        proc = self.proc
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        finally:
            self.crash()

    def stop(self) -> None:
        """Stop the node and delete its folder."""
        self.crash()
        shutil.rmtree(self.root, ignore_errors=True)
