"""The browser-facing boundary: an ASGI middleware refusing what a hostile web page could
make the user's browser send, marking every response so that no other page can use it, and
answering the CORS of the web origins the operator allowed (see :class:`BrowserGuard`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from framepipe.logs import get_logger
from framepipe.server.guard import redact, split_host

__all__ = [
    "CORS_HEADERS",
    "CORS_MAX_AGE",
    "CORS_METHODS",
    "RESPONSE_HEADERS",
    "BrowserGuard",
    "Refusal",
]

_log = get_logger("server.guard")

_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD = frozenset({"0.0.0.0", "::", ""})
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_OTHER_SITES = frozenset({"cross-site", "same-site"})

RESPONSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'; sandbox"),
    (b"referrer-policy", b"no-referrer"),
)
"""The headers every HTTP response gets unless its route set them itself (the dashboard's
page and files set their own policy and caching): no type sniffing; no use by another
origin's page as an image, a video, a script or a style sheet (``Cross-Origin-Resource-Policy``);
nothing kept in a browser's cache (frames and objects are private); a response opened as a
document runs nothing and cannot be framed."""


CORS_METHODS = ("GET", "HEAD", "POST", "PUT")
"""The methods a page of an allowed origin may use (every method a route of the service has)."""
CORS_HEADERS = ("Authorization", "Content-Type")
"""The request headers a page of an allowed origin may send besides the ones every page may:
the bearer token and a body's type (``application/json``, or an upload's)."""
CORS_EXPOSED = ("Retry-After",)
"""The response headers beyond the always-readable ones an allowed page may read (a busy
thumbnail's 503 says when to ask again)."""
CORS_MAX_AGE = 600
"""Seconds a browser may keep a preflight's answer before asking again."""


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
    * **Embedding by another site** (a page's ``<img>``, ``<video>``, ``<script>``, ``<link>``
      or iframe, which send no ``Origin``): a request whose ``Sec-Fetch-Site`` (which
      browsers add to every request) says another site made it, and that carries no
      ``Origin`` allowed above, is refused unless it is a top-level navigation (``GET`` or
      ``HEAD``, ``Sec-Fetch-Mode: navigate``, ``Sec-Fetch-Dest: document``: the user following
      a link to the dashboard). Else 403, before any route runs (a foreign page cannot make
      the service read or decode anything). Every response also says
      ``Cross-Origin-Resource-Policy: same-origin`` (:data:`RESPONSE_HEADERS`) for browsers
      that send no ``Sec-Fetch-Site``.
    * **Simple requests** (CSRF without ``Origin``): a ``POST`` without ``Authorization``
      must say ``Content-Type: application/json``, which no page can send to another origin
      without a CORS preflight, which this service grants to ``allowed_origins`` only. Else
      415.
    * **Bodies** of ``POST``, ``PUT``, ``PATCH`` and ``DELETE`` are read at most
      ``max_json_bytes``, whatever their ``Content-Type`` (FastAPI parses a body without one,
      or of any ``*/*+json`` type, as JSON): a ``Content-Length`` over it is refused before
      reading, a body without one as soon as the bytes counted pass it; 413 naming
      ``FRAMEPIPE_MAX_INPUTS_BYTES``. The only exceptions are ``raw_bodies``, ``(method,
      path prefix)`` of routes that stream their body themselves under a limit of their own
      (the object upload: ``FRAMEPIPE_MAX_UPLOAD_BYTES``). A route that reads no body gets
      the same cap, which costs it nothing; a route added later is capped unless it is
      listed there.
    * **CORS** for ``allowed_origins`` only (:meth:`listed`, the same rule the ``Origin``
      check admits them by: exact scheme, host and port, compared case-insensitively; ``*`` is
      no wildcard): a preflight (``OPTIONS`` with ``Access-Control-Request-Method``) from one
      of them is answered 204 here, before the token check (a browser sends no token with
      it), allowing :data:`CORS_METHODS`, :data:`CORS_HEADERS` for :data:`CORS_MAX_AGE`
      seconds; every other answer to one of them, errors included, names that origin in
      ``Access-Control-Allow-Origin`` (never ``*``; no ``Access-Control-Allow-Credentials``:
      the token is a header, no cookie is ever used). The service's own origin needs no CORS
      and any other origin is refused as above, so neither gets these headers. With
      ``allowed_origins`` set, every response says ``Vary: Origin`` (a cache must not give
      one origin's answer to another). ``Cross-Origin-Resource-Policy: same-origin`` does not
      get in the way: browsers apply it to ``no-cors`` requests only (an ``<img>`` without
      ``crossorigin``, which sends no ``Origin`` and is refused above whatever its page), not
      to a CORS ``fetch`` or an ``<img crossorigin>`` of an allowed page.

    Requests from programs (no ``Origin`` nor ``Sec-Fetch-Site``, a right ``Host``) pass
    untouched; every HTTP response, refusals included, gets :data:`RESPONSE_HEADERS` (those
    its route did not set)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: Sequence[str] = (),
        allowed_origins: Sequence[str] = (),
        max_json_bytes: int,
        raw_bodies: Sequence[tuple[str, str]] = (),
    ) -> None:
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.hosts = {split_host(h) for h in allowed_hosts if h != "*"}
        self.origins = {_normal_origin(o) for o in allowed_origins}
        self.max_json_bytes = max_json_bytes
        self.raw_bodies = tuple((method.upper(), prefix) for method, prefix in raw_bodies)

    def _capped(self, scope: Scope) -> bool:
        """Whether the body of the request of ``scope`` is read at most ``max_json_bytes``."""
        method = scope["method"]
        if method not in _UNSAFE:
            return False
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # as the router matches: without the mount point
            path = path[len(root) :]
        return not any(method == m and path.startswith(p) for m, p in self.raw_bodies)

    def listed(self, origin: str) -> bool:
        """Whether ``origin`` (an ``Origin`` header) is one of ``allowed_origins``: the rule
        both the ``Origin`` check and CORS go by."""
        return _normal_origin(origin) in self.origins

    def _host_allowed(self, host: str, port: str | None, scope: Scope) -> bool:
        if self.any_host or host in _LOOPBACK_NAMES:
            return True
        server = scope.get("server")
        if server and host == str(server[0]).lower() and host not in _WILDCARD:
            return True
        return (host, None) in self.hosts or (host, port) in self.hosts

    def check(self, scope: Scope, headers: Headers | None = None) -> Refusal | None:
        """Why the request of ``scope`` is refused, or None."""
        headers = headers or Headers(scope=scope)
        host_header = headers.get("host", "")
        host, port = split_host(host_header)
        if not self._host_allowed(host, port, scope):
            return Refusal(
                400,
                f"the Host {host_header!r} is not one this service answers to "
                "(a DNS-rebinding guard); add it to FRAMEPIPE_ALLOWED_HOSTS "
                "if it is yours",
            )
        origin = headers.get("origin")
        if origin is not None:
            secure = scope.get("scheme") in ("https", "wss")
            own = f"{'https' if secure else 'http'}://{host_header.strip().lower()}"
            if _normal_origin(origin) != own and not self.listed(origin):
                return Refusal(
                    403,
                    f"requests from the web origin {origin!r} are refused; "
                    "allow it with FRAMEPIPE_ALLOWED_ORIGINS if it is yours",
                )
        elif headers.get("sec-fetch-site", "").strip().lower() in _OTHER_SITES and not _navigation(
            scope, headers
        ):
            return Refusal(
                403,
                "requests made by another site's page (an image, a video, a script or a "
                "frame of it) are refused; open the service's own page instead",
            )
        if scope["type"] == "http" and scope["method"] == "POST" and "authorization" not in headers:
            ctype = headers.get("content-type", "").split(";")[0].strip().lower()
            if ctype != "application/json":
                return Refusal(
                    415,
                    "a POST needs Content-Type: application/json (or the "
                    "bearer token): a form or text/plain body is what "
                    "another web site could send",
                )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["type"] == "http":
            send = _with_response_headers(send, vary_origin=bool(self.origins))
        refusal = self.check(scope, headers)
        if refusal is not None:
            _log.warning(
                "refused %s %s: %s",
                scope.get("method", "WEBSOCKET"),
                redact(scope.get("path", "")),
                refusal.detail,
            )
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await JSONResponse({"detail": refusal.detail}, refusal.status)(scope, receive, send)
            return
        origin = headers.get("origin")
        if scope["type"] == "http" and origin is not None and self.listed(origin):
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await _preflight(origin, headers)(scope, receive, send)
                return
            send = _with_cors(send, origin)
        if scope["type"] == "http" and self._capped(scope):
            await self._limited(scope, receive, send, headers)
            return
        await self.app(scope, receive, send)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, headers: Headers) -> None:
        limit = self.max_json_bytes
        too_big = JSONResponse(
            {
                "detail": f"the request body is over the limit of {limit} bytes "
                "(FRAMEPIPE_MAX_INPUTS_BYTES)"
            },
            413,
        )
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


def _normal_origin(origin: str) -> str:
    """``origin`` as the guard compares it: without white space or a trailing ``/``,
    lower-case."""
    return origin.strip().rstrip("/").lower()


def _preflight(origin: str, headers: Headers) -> Response:
    """The answer to a CORS preflight of ``origin`` (an allowed one): what it may send, for how
    long. The browser itself refuses a method or header outside the lists, and says which."""
    allowed = {
        "Access-Control-Allow-Origin": origin.strip(),
        "Access-Control-Allow-Methods": ", ".join(CORS_METHODS),
        "Access-Control-Allow-Headers": ", ".join(CORS_HEADERS),
        "Access-Control-Max-Age": str(CORS_MAX_AGE),
        "Vary": "Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
    }
    # Chromium asks a page before it reaches a more private address (a loopback service from a
    # page on the LAN): the operator allowed this origin, so it may.
    if headers.get("access-control-request-private-network", "").strip().lower() == "true":
        allowed["Access-Control-Allow-Private-Network"] = "true"
    return Response(status_code=204, headers=allowed)


def _with_cors(send: Send, origin: str) -> Send:
    """``send`` naming ``origin`` (an allowed one) in the start of the response, as the
    origin that may read it."""
    extra = [
        (b"access-control-allow-origin", origin.strip().encode("latin-1")),
        (b"access-control-expose-headers", ", ".join(CORS_EXPOSED).encode("latin-1")),
    ]

    async def allowed(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    return allowed


def _navigation(scope: Scope, headers: Headers) -> bool:
    """Whether the request is a browser's top-level navigation (a link followed, an address
    typed): a ``GET`` or ``HEAD`` for a document, not a frame, an image or a fetch."""
    return (
        scope["type"] == "http"
        and scope["method"] in ("GET", "HEAD")
        and headers.get("sec-fetch-mode", "").strip().lower() == "navigate"
        and headers.get("sec-fetch-dest", "").strip().lower() == "document"
    )


def _with_response_headers(send: Send, *, vary_origin: bool) -> Send:
    """``send`` adding to the start of a response the :data:`RESPONSE_HEADERS` it lacks and,
    with ``vary_origin``, ``Origin`` to its ``Vary``."""

    async def marked(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            present = {bytes(name).lower() for name, _ in headers}
            headers += [(n, v) for n, v in RESPONSE_HEADERS if n not in present]
            if vary_origin:
                headers = _vary_origin(headers)
            message = {**message, "headers": headers}
        await send(message)

    return marked


def _vary_origin(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` whose ``Vary`` names ``Origin`` (added to the one there, or a new one)."""
    for i, (name, value) in enumerate(headers):
        if bytes(name).lower() == b"vary":
            named = {v.strip().lower() for v in bytes(value).split(b",")}
            if b"origin" not in named and b"*" not in named:
                headers[i] = (name, bytes(value) + b", Origin")
            return headers
    return [*headers, (b"vary", b"Origin")]
