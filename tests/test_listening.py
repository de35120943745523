"""The socket a service is given: bound and already listening when its address is printed, so
a client that connects at once (a browser opening the printed link, a test) waits in the
backlog instead of being refused while the server starts."""

from __future__ import annotations

import socket

import pytest

from framepipe.errors import ConfigError
from framepipe.listening import listen


def test_a_connection_made_before_the_service_accepts_waits_in_the_backlog() -> None:
    sock = listen("127.0.0.1", 0)
    try:
        host, port = sock.getsockname()
        assert port != 0
        with socket.create_connection((host, port), timeout=5) as client:
            client.sendall(b"hello")
            accepted, _ = sock.accept()  # what the service does once it runs
            with accepted:
                assert accepted.recv(5) == b"hello"
    finally:
        sock.close()


def test_a_busy_port_is_refused_naming_it_unless_another_may_be_taken() -> None:
    taken = listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"cannot listen on 127.0.0.1:{port}: .*\(hint\)"):
            listen("127.0.0.1", port, busy_hint="hint")
        other = listen("127.0.0.1", port, exact=False)
        with other:
            assert other.getsockname()[1] not in (0, port)
    finally:
        taken.close()
