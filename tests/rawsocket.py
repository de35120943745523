"""A WebSocket client that stops reading: a raw socket with a small receive buffer that
completes the handshake (and may send text frames) but never reads what the service sends, so
the service's sends back up soon. A library's client would keep reading in the background."""

from __future__ import annotations

import base64
import os
import socket


def stalled_websocket(port: int, path: str, token: str) -> socket.socket:
    """A connection to ``ws://127.0.0.1:{port}{path}``, upgraded (``Authorization: Bearer
    token``), that reads nothing after the handshake's status line."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


def send_text(sock: socket.socket, text: str) -> None:
    """One masked text frame (a client's frames are masked), of under 126 bytes."""
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
