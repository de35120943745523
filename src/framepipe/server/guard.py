"""Who may talk to the service: the bearer token, the ``Host`` and ``Origin`` a browser sends.

The service is reachable from every web page its user opens (a page can make the browser send
requests to ``127.0.0.1``), so the token alone is not the boundary: :class:`BrowserGuard`
refuses foreign hosts and origins before any route runs, with or without a token. This
module loads without the server extra (the detector hub uses the token checks on workers);
only :class:`BrowserGuard` needs Starlette.

Guarantees:

* :func:`token_matches` compares in constant time and never raises, whatever bytes a client
  sends (a non-ASCII ``Authorization`` header is a wrong token, not a server error);
* a WebSocket presents its token as the subprotocol ``framepipe.token.<base64url(token)>``
  (what a browser can send without putting the secret in the URL), as
  ``Authorization: Bearer`` (other clients), or, for older clients, as ``?token=`` (which
  the access log then shows redacted); :func:`admit_websocket` accepts the connection only
  with the right token, echoing the subprotocol it was given, and closes it with 1008
  otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from framepipe.logs import get_logger

if TYPE_CHECKING:
    from starlette.datastructures import Headers
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
    from starlette.websockets import WebSocket

__all__ = ["TOKEN_SUBPROTOCOL", "BrowserGuard", "RedactTokens", "admit_websocket",
           "bearer_token", "hide_tokens_in_access_log", "redact", "split_host",
           "token_matches"]

_log = get_logger("server.guard")

TOKEN_SUBPROTOCOL = "framepipe.token."


def token_matches(given: str | None, token: str) -> bool:
    """True when ``given`` is ``token`` (constant time; any text, never raises)."""
    if given is None:
        return False
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"),
                               token.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, value = (authorization or "").partition(" ")
    return value if scheme.lower() == "bearer" else None


def _subprotocol_token(websocket: WebSocket) -> tuple[str | None, str | None]:
    for offered in websocket.scope.get("subprotocols") or ():
        if offered.startswith(TOKEN_SUBPROTOCOL):
            encoded = offered[len(TOKEN_SUBPROTOCOL):]
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                return raw.decode("utf-8", "surrogateescape"), offered
            except (binascii.Error, ValueError):
                return "", offered
    return None, None


async def admit_websocket(websocket: WebSocket, token: str | None) -> bool:
    """Accept ``websocket`` if it presents ``token`` (or no token is configured); else close
    it with 1008 and return False."""
    given, subprotocol = _subprotocol_token(websocket)
    if given is None:
        given = bearer_token(websocket.headers.get("authorization"))
    if given is None:
        given = websocket.query_params.get("token")
    if token and not token_matches(given, token):
        await websocket.close(code=1008, reason="missing or wrong token")
        return False
    await websocket.accept(subprotocol=subprotocol)
    return True


# -- the browser-facing boundary: Host, Origin, simple requests, body size -----------------

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::", ""})
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REDACT = re.compile(r"(?i)([?&]token=)[^&\s\"]*")


def split_host(value: str) -> tuple[str, str | None]:
    """``(host, port)`` of a ``Host`` header or an origin's authority, the host lower-case
    and without IPv6 brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") else None
    if value.count(":") == 1:
        host, _, port = value.partition(":")
        return host, port
    return value, None


def redact(text: str) -> str:
    """``text`` with the value of every ``token=`` query parameter replaced by ``***``."""
    return _REDACT.sub(r"\1***", text)


class RedactTokens(logging.Filter):
    """A log filter hiding ``?token=`` values in access-log lines (uvicorn's ``args``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def hide_tokens_in_access_log() -> None:
    """Install :class:`RedactTokens` on uvicorn's loggers (once): the access log, and the
    error log, where uvicorn writes WebSocket handshakes with their query."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


@dataclass(frozen=True)
class Refusal:
    status: int
    detail: str


class BrowserGuard:
    """ASGI middleware refusing what a hostile web page could make a browser send.

    * **Host** (DNS rebinding): the ``Host`` header must name ``localhost``, a loopback
      address, the address the connection arrived on, or one of ``allowed_hosts`` (an entry
      with a port matches that port only; ``*`` allows any). Else 400 (HTTP) or a refused
      WebSocket handshake (403).
    * **Origin** (cross-site requests, cross-site WebSocket hijacking): a request carrying
      ``Origin`` must come from the service's own origin (scheme and the ``Host`` it asked
      for) or one of ``allowed_origins``; ``Origin: null`` is foreign. Else 403.
    * **Simple requests** (CSRF without ``Origin``): a ``POST`` without ``Authorization``
      must say ``Content-Type: application/json``, which no page can send to another origin
      without a CORS preflight this service never grants. Else 415.
    * **JSON bodies** are read at most ``max_json_bytes`` (a ``Content-Length`` over it is
      refused before reading): 413 naming ``FRAMEPIPE_MAX_INPUTS_BYTES``.

    Requests from programs (no ``Origin``, a right ``Host``) pass untouched."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: Sequence[str] = (),
                 allowed_origins: Sequence[str] = (), max_json_bytes: int) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {split_host(h) for h in allowed_hosts if h != "*"}
        self.origins = {o.strip().rstrip("/").lower() for o in allowed_origins}
        self.max_json_bytes = max_json_bytes

    def _host_allowed(self, host: str, port: str | None, scope: Scope) -> bool:
        if self.any_host or host in _LOOPBACK_NAMES:
            return True
        server = scope.get("server")
        if server and host == str(server[0]).lower() and host not in _WILDCARD:
            return True
        return (host, None) in self.hosts or (host, port) in self.hosts

    def check(self, scope: Scope) -> Refusal | None:
        """Why the request of ``scope`` is refused, or None."""
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        host_header = headers.get("host", "")
        host, port = split_host(host_header)
        if not self._host_allowed(host, port, scope):
            return Refusal(400, f"the Host {host_header!r} is not one this service answers to "
                                "(a DNS-rebinding guard); add it to FRAMEPIPE_ALLOWED_HOSTS "
                                "if it is yours")
        origin = headers.get("origin")
        if origin is not None:
            secure = scope.get("scheme") in ("https", "wss")
            own = f"{'https' if secure else 'http'}://{host_header.strip().lower()}"
            if origin.strip().rstrip("/").lower() not in (own, *self.origins):
                return Refusal(403, f"requests from the web origin {origin!r} are refused; "
                                    "allow it with FRAMEPIPE_ALLOWED_ORIGINS if it is yours")
        if scope["type"] == "http" and scope["method"] == "POST" \
                and "authorization" not in headers:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return Refusal(415, "a POST needs Content-Type: application/json (or the "
                                    "bearer token): a form or text/plain body is what "
                                    "another web site could send")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        refusal = self.check(scope)
        if refusal is not None:
            _log.warning("refused %s %s: %s", scope.get("method", "WEBSOCKET"),
                         redact(scope.get("path", "")), refusal.detail)
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"detail": refusal.detail}, refusal.status)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] in _UNSAFE:
            headers = Headers(scope=scope)
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype == "application/json":
                await self._limited(scope, receive, send, headers)
                return
        await self.app(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send,
                       headers: Headers) -> None:
        from starlette.responses import JSONResponse

        limit = self.max_json_bytes
        too_big = JSONResponse({"detail": f"the JSON body is over the limit of {limit} bytes "
                                          "(FRAMEPIPE_MAX_INPUTS_BYTES)"}, 413)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await too_big(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_big(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
