"""Object keys taken from a request's path, as the client wrote them: :data:`ObjectKey`.

An HTTP server decodes a path's percent-escapes leniently: uvicorn turns bytes that are not
UTF-8 into U+FFFD, so ``k%ff`` and ``k%fe`` would both arrive as ``k\\ufffd``, two uploads
landing on one key, and the key could not be told from a real ``k\\ufffd`` (``k%EF%BF%BD``).
Starlette's ``path`` convertor does not match a newline, so a key holding one found no route
(a bare 404) and a key ending in one lost it (``k%0A`` was stored as ``k``).

Guarantees, for every route that takes its key as ``{key:objectkey}`` through
:data:`ObjectKey`: the key is the path's tail as the client sent it (``scope["raw_path"]``),
percent-decoded as strict UTF-8; a path that is not valid UTF-8 is a 400 whose detail says so
and shows the key's bytes (``object key is not valid UTF-8: 'k%FF' ...``), before the route
does anything; a key holding any control character, a newline included, reaches the route,
whose key check refuses it by name (400). A server that gives no ``raw_path`` (the ASGI spec
makes it optional) leaves its own decoding as the only one there is.
"""

from typing import Annotated
from urllib.parse import quote, unquote_to_bytes

from framepipe.errors import MissingDependencyError

try:
    from fastapi import Depends, HTTPException, Request
    from starlette.convertors import Convertor, register_url_convertor
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["ObjectKey", "object_key"]

_SHOWN = 120
"""Characters of a refused path shown in the detail at most."""


class _KeyConvertor(Convertor[str]):
    """The rest of the path, newlines included (``path``'s ``.*`` stops at one)."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("objectkey", _KeyConvertor())


def _shown(raw: bytes) -> str:
    """``raw`` with every byte that is not plain ASCII as its percent-escape, shortened."""
    text = quote(raw, safe="/")
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _not_utf8(path: str, key: str, raw: bytes) -> str:
    """The detail of a path that is not valid UTF-8: the key's bytes and what is wrong with
    them when the fault is in the key, else the whole path's."""
    decoded = unquote_to_bytes(raw)
    if path.endswith(key):
        # The segments before the key hold no '/' of their own (literal or one-segment
        # parameters), so the key starts after as many '/' as the decoded path has before it.
        depth = path[: len(path) - len(key)].count("/")
        parts = decoded.split(b"/", depth)
        if len(parts) > depth:
            try:
                parts[depth].decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"object key is not valid UTF-8: {_shown(parts[depth])} ({exc.reason} at "
                    f"byte {exc.start}); percent-escapes in a key must spell UTF-8 text"
                )
    return f"the request path is not valid UTF-8: {_shown(decoded)}"


def object_key(key: str, request: Request) -> str:
    """The key of the route's ``{key:objectkey}`` when the whole path the client sent decodes
    as strict UTF-8 (the server's lenient decoding then changed nothing); else a 400 naming
    the problem."""
    raw = request.scope.get("raw_path")
    if not isinstance(raw, bytes):
        return key
    try:
        unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, _not_utf8(request.scope["path"], key, raw)) from None
    return key


ObjectKey = Annotated[str, Depends(object_key)]
"""A route's object key (``{key:objectkey}`` in its path), exact or refused: :func:`object_key`."""
