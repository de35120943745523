"""Who may talk to the service: the bearer token, the ``Host`` and ``Origin`` a browser sends.

The service is reachable from every web page its user opens (a page can make the browser send
requests to ``127.0.0.1``), so the token alone is not the boundary: :class:`BrowserGuard`
(:mod:`framepipe.server.browser_guard`) refuses foreign hosts and origins before any route
runs, with or without a token. This module loads without the server extra (the detector hub
uses the token checks on workers).

Guarantees:

* :func:`token_matches` compares in constant time and never raises, whatever bytes a client
  sends (a non-ASCII ``Authorization`` header is a wrong token, not a server error);
* a WebSocket presents its token as the subprotocol ``framepipe.token.<base64url(token)>``
  (what a browser can send without putting the secret in the URL), as
  ``Authorization: Bearer`` (other clients), or, for older clients, as ``?token=`` (which
  the access log then shows redacted: :func:`redact` matches parameter names as the service
  decodes them, so ``?%74oken=`` is hidden too, and hides a value up to the next ``&``,
  whatever it holds); :func:`admit_websocket` accepts the connection only
  with the right token, echoing the subprotocol it was given, and closes it with 1008
  otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

__all__ = [
    "TOKEN_SUBPROTOCOL",
    "RedactTokens",
    "admit_websocket",
    "bearer_token",
    "hide_tokens_in_access_log",
    "redact",
    "split_host",
    "token_matches",
]


TOKEN_SUBPROTOCOL = "framepipe.token."


def token_matches(given: str | None, token: str) -> bool:
    """True when ``given`` is ``token`` (constant time; any text, never raises)."""
    if given is None:
        return False
    return hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    scheme, _, value = (authorization or "").partition(" ")
    return value if scheme.lower() == "bearer" else None


def _subprotocol_token(websocket: WebSocket) -> tuple[str | None, str | None]:
    for offered in websocket.scope.get("subprotocols") or ():
        if offered.startswith(TOKEN_SUBPROTOCOL):
            encoded = offered[len(TOKEN_SUBPROTOCOL) :]
            try:
                raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
                return raw.decode("utf-8", "surrogateescape"), offered
            except (binascii.Error, ValueError):
                return "", offered
    return None, None


async def admit_websocket(
    websocket: WebSocket, token: str | None, *, also: Callable[[str | None], bool] | None = None
) -> bool:
    """Accept ``websocket`` if it presents ``token`` (or no token is configured), or a token
    ``also`` accepts (the route's own rule: an execution token); else close it with 1008 and
    return False."""
    given, subprotocol = _subprotocol_token(websocket)
    if given is None:
        given = bearer_token(websocket.headers.get("authorization"))
    if given is None:
        given = websocket.query_params.get("token")
    if token and not token_matches(given, token) and not (also is not None and also(given)):
        await websocket.close(code=1008, reason="missing or wrong token")
        return False
    await websocket.accept(subprotocol=subprotocol)
    return True


# -- hosts and logs ----------------------------------------------------------------------

# A query parameter: its name runs to "=", its value to the next "&" (or "#", or white space:
# the end of the path in a formatted log line); a '"' does not end it.
_PARAMETER = re.compile(r"([?&])([^=&?#\s]*)=([^&#\s]*)")


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


def _hide_token(match: re.Match[str]) -> str:
    # The name as the service reads it (Starlette decodes "%74oken" and "+"), in any case.
    if unquote_plus(match[2]).strip().lower() == "token":
        return f"{match[1]}{match[2]}=***"
    return match[0]


def redact(text: str) -> str:
    """``text`` with the value of every query parameter whose name, once percent-decoded, is
    ``token`` (``?token=``, ``?%74oken=``, ``&TOKEN=``) replaced by ``***``, all of it up to
    the next ``&`` (a ``"`` or an escape inside it included)."""
    return _PARAMETER.sub(_hide_token, text)


class RedactTokens(logging.Filter):
    """A log filter hiding ``?token=`` values (see :func:`redact`) in access-log lines
    (uvicorn's ``args``)."""

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
