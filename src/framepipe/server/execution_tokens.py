"""Execution tokens: signed, expiring, read-only capabilities for one execution, which a
backend holding the service's API token hands to a browser.

A token reads ``fpx1.<payload>.<signature>``: ``payload`` is the base64url of a JSON object
naming the execution's full id (``e``), the scope (``s``, only :data:`READ` exists), the
expiry (``x``, unix seconds) and a random nonce (``n``, so no two tokens are the same and each
is revoked alone); ``signature`` is the base64url of HMAC-SHA256 over
``fpx1.<payload>`` with a key derived from the service's API token (:func:`_key`). So:

* only a holder of the API token can make one: the service (``POST
  /api/executions/{id}/tokens``) or the backend itself, offline, with :func:`mint`;
* an API token shorter than :data:`MIN_API_TOKEN_LENGTH` signs none and accepts none
  (:func:`signing_problem`): whoever holds an execution token (a browser) can try API tokens
  offline, as fast as HMAC-SHA256 runs, until one signs it, which finds a short one;
* changing the API token revokes every execution token made with it; one token is revoked
  by its :func:`token_id` (``POST /api/executions/{id}/tokens/revoke``), which the service
  records as an event of its execution (:mod:`framepipe.server.token_revocations`);
* :func:`read` checks the signature in constant time before it looks at anything the
  payload says, then the scope and the expiry; a token that fails any of these is refused
  with :class:`~framepipe.errors.InvalidInputError` saying which (never the token itself).

Which requests a token opens is :mod:`framepipe.server.access`'s rule. This module
uses the standard library only, so a backend can mint tokens without the ``server`` extra.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass

from framepipe.errors import InvalidInputError

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "MIN_API_TOKEN_LENGTH",
    "PREFIX",
    "READ",
    "ExecutionGrant",
    "is_execution_token",
    "mint",
    "read",
    "signing_problem",
    "token_id",
]

PREFIX = "fpx1."
"""How every execution token begins (format version 1)."""
READ = "read"
"""The scope of a token that reads its execution (status, events, outputs) and nothing else."""
DEFAULT_LIFETIME = 3600
"""Seconds a token lives when its maker names no lifetime."""
MAX_LIFETIME = 7 * 86_400
"""The longest lifetime a token may be given, in seconds (a week)."""
MAX_LENGTH = 512
"""Characters of the longest text read as a token; a longer one is refused unread."""

MIN_API_TOKEN_LENGTH = 32
"""Characters of the shortest API token that signs execution tokens (``framepipe serve`` makes
one of 32 random URL-safe characters, 192 bits)."""

_KEY_LABEL = b"framepipe execution token key v1"
_EXECUTION_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class ExecutionGrant:
    """What a valid execution token allows: reading ``execution_id`` until ``expires_at``."""

    execution_id: str
    """The execution's full id (32 lower-case hexadecimal digits)."""
    scope: str
    expires_at: int
    """Unix seconds after which the token is refused."""
    token_id: str
    """The token's :func:`token_id`, by which it is revoked."""


def signing_problem(api_token: str | None) -> str | None:
    """Why the API token ``api_token`` cannot sign execution tokens (none, or too short to
    stand an offline search from a token it signed), or None when it can."""
    if not api_token:
        return "there is no API token to sign with"
    if len(api_token) < MIN_API_TOKEN_LENGTH:
        return (
            f"the API token is too short: execution tokens need a random one of at least "
            f"{MIN_API_TOKEN_LENGTH} characters (python3 -c 'import secrets; "
            "print(secrets.token_urlsafe())'), since anyone holding one can search for the API "
            "token that signed it offline"
        )
    return None


def _key(api_token: str) -> bytes:
    """The signing key of the service whose API token is ``api_token``: derived from it, so
    it is never the token itself and changes with it."""
    return hmac.new(api_token.encode("utf-8"), _KEY_LABEL, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(api_token: str, signed: str) -> str:
    return _b64(hmac.new(_key(api_token), signed.encode("ascii"), hashlib.sha256).digest())


def token_id(token: str) -> str:
    """The id of the execution token ``token``, by which it is revoked alone: 32 hexadecimal
    digits of the SHA-256 of its signature, which differs for every token (it signs the
    payload, whose nonce is random) and tells nothing of it; the id of a text that is no
    token is that of its last ``.``-separated part."""
    signature = token.strip().rpartition(".")[2]
    return hashlib.sha256(signature.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def is_execution_token(text: str | None) -> bool:
    """Whether ``text`` has the form of an execution token (not whether it is valid)."""
    return text is not None and text.strip().startswith(PREFIX)


def mint(
    api_token: str,
    execution_id: str,
    *,
    lifetime: float = DEFAULT_LIFETIME,
    scope: str = READ,
    now: float | None = None,
) -> str:
    """A token reading the execution ``execution_id`` (its full id, as the service answers
    it) for ``lifetime`` seconds (1 to :data:`MAX_LIFETIME`), signed with the key of the
    service whose API token is ``api_token``. :class:`~framepipe.errors.InvalidInputError`
    for an API token that cannot sign (:func:`signing_problem`), an id that is not a full
    one, an unknown scope or a lifetime out of range."""
    problem = signing_problem(api_token)
    if problem is not None:
        raise InvalidInputError(problem, where="api_token")
    if not _EXECUTION_ID.fullmatch(execution_id):
        raise InvalidInputError(
            "must be a full execution id (32 lower-case hexadecimal digits)", where="execution_id"
        )
    if scope != READ:
        raise InvalidInputError(f"must be {READ!r}, not {scope!r}", where="scope")
    if not 1 <= lifetime <= MAX_LIFETIME:
        raise InvalidInputError(
            f"must be 1 to {MAX_LIFETIME} seconds, not {lifetime:g}", where="lifetime"
        )
    expires = int((time.time() if now is None else now) + lifetime)
    claims = {"e": execution_id, "n": secrets.token_urlsafe(9), "s": scope, "x": expires}
    payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode("ascii"))
    signed = PREFIX + payload
    return f"{signed}.{_signature(api_token, signed)}"


def _refused(reason: str) -> InvalidInputError:
    return InvalidInputError(reason, where="execution token")


def read(api_token: str, token: str, *, now: float | None = None) -> ExecutionGrant:
    """What ``token`` grants, if the service whose API token is ``api_token`` signed it and
    it has not expired; else :class:`~framepipe.errors.InvalidInputError` saying what is
    wrong (malformed, signature, scope, expired, or an API token that signs none:
    :func:`signing_problem`). The signature is compared in constant time before the payload
    is decoded."""
    token = token.strip()
    if not api_token or len(token) > MAX_LENGTH or not token.startswith(PREFIX):
        raise _refused("is not an execution token")
    if signing_problem(api_token) is not None:  # why is the service's own business
        raise _refused("is not accepted: this service makes no execution tokens")
    signed, dot, signature = token.rpartition(".")
    if not dot or signed == PREFIX.rstrip("."):
        raise _refused("is not an execution token")
    expected = _signature(api_token, signed) if signed.isascii() else ""
    if not hmac.compare_digest(
        signature.encode("utf-8", "surrogateescape"), expected.encode("ascii")
    ):
        raise _refused("has a signature this service did not make")
    try:
        claims = json.loads(_unb64(signed[len(PREFIX) :]))
        execution_id, scope, expires = claims["e"], claims["s"], claims["x"]
    except (binascii.Error, ValueError, TypeError, KeyError) as exc:
        raise _refused("is not an execution token") from exc
    if not (
        isinstance(execution_id, str)
        and _EXECUTION_ID.fullmatch(execution_id)
        and isinstance(expires, int)
        and not isinstance(expires, bool)
    ):
        raise _refused("is not an execution token")
    if scope != READ:
        raise _refused(f"has the scope {scope!r}, which this service does not know")
    if (time.time() if now is None else now) >= expires:
        raise _refused("has expired; ask your backend for a new one")
    return ExecutionGrant(
        execution_id=execution_id, scope=scope, expires_at=expires, token_id=token_id(token)
    )
