"""How a URL is shown in messages, logs and health: :func:`safe_url`, the one rule.

Guarantees: a password in the URL (``scheme://user:***@host``) and the value of every query
parameter whose name says it holds a secret (``?api_key=***``, ``password``, ``token``,
``secret``, ``signature``, ``credential``, ``auth``, ``session``, any ``*key*``; matched on the
percent-decoded name, case-insensitive) are masked; everything else is left as written, so the
URL still says where it points.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit, urlunsplit

__all__ = ["safe_url"]

_SECRET_NAME = re.compile(r"pass|pwd|token|secret|key|sig|credential|auth|session", re.I)
_USERINFO = re.compile(r"//[^/?#@]*@")


def safe_url(url: str) -> str:
    """``url`` with its secrets masked (see the module); a URL that does not parse keeps
    only what no password can be in (its userinfo, if any, is masked whole)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return _USERINFO.sub("//***@", url)
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = "&".join(_masked(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _masked(pair: str) -> str:
    name, sep, value = pair.partition("=")
    if sep and value and _SECRET_NAME.search(unquote_plus(name)):
        return f"{name}=***"
    return pair
