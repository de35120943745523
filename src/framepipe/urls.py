"""How a URL is shown in messages, logs and health: :func:`safe_url`, the one rule.

Guarantees: a password in the URL (``scheme://user:***@host``) and the value of every query
parameter whose name says it holds a secret are masked, in the URL and in every URL inside a
query value (``?endpoint=http://k:***@host``); everything else is left as written, so the URL
still says where it points. A name says so (:func:`secret_name`, on the percent-decoded name,
case-insensitive) when one of its words (split at ``_``, ``-``, ``.`` and case changes) is
``pass``, ``password``, ``pwd``, ``token``, ``secret``, ``key``, ``sig``, ``signature``,
``credential``, ``auth``, ``session`` and the like (``api_key``, ``X-Amz-Signature``,
``accessToken``), or it ends with one run together (``apikey``, ``clientsecret``); a word that
merely contains one is no secret (``keyframe``, ``design``, ``author``).

No part of a password is ever shown, even one written unescaped with ``/``, ``@``, ``?``,
``#`` or ``:`` in it (``rtsp://user:pa/ss@cam/1``), which a URL parser reads as a host, a path
or a query: a ``user:`` (no ``/``, ``?``, ``#``, ``:`` or ``[`` in it) right after ``//`` and an
``@`` anywhere after it are a password, masked from the ``:`` to the *last* ``@``. Where that is
ambiguous it masks too much, never too little: ``http://h:8080/x?to=a@b`` is shown
``http://h:***@b`` (a port followed by an ``@`` reads as a password).

:func:`safe_text` applies the same rule to every URL inside a text (a command's argument such
as ``location=rtsp://user:pw@cam/1``, a line a program printed): each ``scheme://`` and what
follows it up to the next whitespace is shown by :func:`safe_url`; :func:`safe_json` to every
string of a JSON-like value (an event's data, a health snapshot, an answer of the service).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote_plus

__all__ = ["safe_json", "safe_text", "safe_url", "secret_name"]

_SECRET_WORDS = frozenset(
    {
        "pass", "passwd", "password", "passphrase", "pwd", "token", "secret", "key", "apikey",
        "sig", "signature", "credential", "credentials", "auth", "authorization", "session",
        "sessionid", "cookie",
    }
)  # fmt: skip
_SECRET_ENDINGS = (
    "token", "secret", "password", "passwd", "apikey", "accesskey", "secretkey", "privatekey",
    "signature", "credential", "credentials", "sessionid", "authkey",
)  # fmt: skip
_WORD = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+")


def secret_name(name: str) -> bool:
    """Whether a query parameter named ``name`` (percent-decoded) holds a secret (see the
    module)."""
    words = {w.lower() for w in _WORD.findall(name)}
    if words & _SECRET_WORDS:
        return True
    joined = "".join(ch for ch in name.lower() if ch.isalnum())
    return joined.endswith(_SECRET_ENDINGS)


_PASSWORD = re.compile(
    r"(?P<user>(?:^|[A-Za-z][A-Za-z0-9+.-]*:)//[^/?#:\[\s]*:).*@",  # greedy: to the last '@'
    re.DOTALL,
)
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def safe_url(url: str) -> str:
    """``url`` with its secrets masked (see the module); it need not parse."""
    shown = _PASSWORD.sub(r"\g<user>***@", url)  # edited in place: nothing else is rewritten
    head, hash_mark, fragment = shown.partition("#")
    base, question_mark, query = head.partition("?")
    if not query:
        return shown
    query = "&".join(_masked(pair) for pair in query.split("&"))
    return f"{base}{question_mark}{query}{hash_mark}{fragment}"


def _masked(pair: str) -> str:
    name, sep, value = pair.partition("=")
    if sep and value and secret_name(unquote_plus(name)):
        return f"{name}=***"
    if "://" in value:  # a URL as a value: its own query's first parameter is in it
        return f"{name}{sep}{safe_url(value)}"
    return pair


def safe_text(text: str) -> str:
    """``text`` with every URL in it shown by :func:`safe_url` (a URL runs from its
    ``scheme://`` to the next whitespace; see the module)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: safe_url(match.group()), text)


def safe_json(value: Any) -> Any:
    """``value`` (JSON-like: dicts, lists, tuples, scalars) with :func:`safe_text` applied to
    every string in it, keys included; tuples come back as lists."""
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, dict):
        return {(safe_text(k) if isinstance(k, str) else k): safe_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [safe_json(v) for v in value]
    return value
