"""A redis-server of the test's own (:class:`PrivateRedis`), to stop, kill, restart, pause and
reconfigure under the code being tested without touching the machine's Redis.

It listens on a free loopback port (and, if asked, a unix socket), keeps its files in the
test's folder, takes only a password (``requirepass``), or only an ACL user, if given one
(:meth:`~PrivateRedis.change_password` changes it under the clients), and persists nothing
unless ``persistent`` (then its append-only file, synced
at every write, keeps the data across :meth:`~PrivateRedis.stop` and
:meth:`~PrivateRedis.start`). Without ``redis-server`` on PATH the test skips (laptop) or
fails (CI). The ``private_redis`` fixture (conftest) is one, started, stopped afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import service_missing
from waiting import free_port

__all__ = ["PrivateRedis", "running"]


class PrivateRedis:
    """A redis-server on ``127.0.0.1:<port>``; :attr:`url` has the credentials, if any: the
    ``password`` of the default user, or with ``user`` that of an ACL user allowed everything
    (the default user then disabled).

    ``extra`` holds more ``redis-server`` arguments (``["--maxclients", "1"]``); change it
    before :meth:`start`."""

    def __init__(
        self,
        workdir: Path,
        *,
        password: str | None = None,
        user: str | None = None,
        unixsocket: Path | None = None,
        persistent: bool = False,
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            service_missing(
                "redis-server (apt-get install redis-server)",
                FileNotFoundError("redis-server is not on PATH"),
            )
        assert binary is not None
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.user = user
        self.password = password
        self.url = self._url_with(password)
        self.extra: list[str] = []
        if user is not None:
            assert password, "an ACL user needs a password here"
            self.extra += ["--user", "default", "off"]
            self.extra += ["--user", user, "on", f">{password}", "~*", "&*", "+@all"]
        elif password:
            self.extra += ["--requirepass", password]
        if unixsocket is not None:
            self.extra += ["--unixsocket", str(unixsocket), "--unixsocketperm", "700"]
        self.persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if persistent
            else ["--appendonly", "no"]
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def _url_with(self, password: str | None) -> str:
        auth = f"{self.user or ''}:{password}@" if password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def change_password(self, new: str) -> None:
        """Change the password (``CONFIG SET requirepass``, or ``ACL SETUSER`` for the ACL
        user) and close every client's connection, as a server restarted with it would:
        clients connect again with the credentials they have. :attr:`url` gets the new one."""
        import redis

        with redis.Redis.from_url(self.url, socket_timeout=5) as admin:
            if self.user is None:
                admin.config_set("requirepass", new)
            else:
                admin.acl_setuser(
                    self.user, enabled=True, reset_passwords=True, passwords=[f"+{new}"]
                )
            admin.client_kill_filter(_type="normal", skipme=True)
        self.password = new
        self.url = self._url_with(new)

    def start(self, timeout: float = 15.0) -> None:
        """Start the server; returns once it answers PING at :attr:`url`."""
        import redis

        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *self.persistence,
                "--dir",
                str(self.workdir),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis.from_url(
                    self.url, socket_connect_timeout=2, socket_timeout=1
                ) as client:
                    client.ping()
                return
            except redis.RedisError:
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"the private redis-server exited with {self.proc.returncode}"
                    ) from None
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop it (SIGTERM, after SIGCONT: a paused server could not stop); nothing if it
        is not running."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL it: a crash, nothing written on the way out."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """:meth:`stop`, then :meth:`start` on the same port."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def running(server: PrivateRedis) -> Iterator[PrivateRedis]:
    """``server`` started, and stopped afterwards."""
    server.start()
    try:
        yield server
    finally:
        server.stop()
