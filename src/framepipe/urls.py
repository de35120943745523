"""How a URL is shown in messages, logs and health: :func:`safe_url`, the one rule.

Guarantees: a password in the URL (``scheme://user:***@host``) and the value of every query
parameter whose name says it holds a secret (``?api_key=***``, ``password``, ``token``,
``secret``, ``signature``, ``credential``, ``auth``, ``session``, any ``*key*``; matched on the
percent-decoded name, case-insensitive) are masked; everything else is left as written, so the
URL still says where it points.

:func:`safe_text` applies the same rule to every URL inside a text (a command's argument such
as ``location=rtsp://user:pw@cam/1``, a line a program printed): each ``scheme://`` and what
follows it up to the next whitespace is shown by :func:`safe_url`.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_plus, urlsplit

__all__ = ["safe_text", "safe_url"]

_SECRET_NAME = re.compile(r"pass|pwd|token|secret|key|sig|credential|auth|session", re.I)
_USERINFO = re.compile(r"//[^/?#@]*@")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S*")


def safe_url(url: str) -> str:
    """``url`` with its secrets masked (see the module); a URL that does not parse keeps
    only what no password can be in (its userinfo, if any, is masked whole)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return _USERINFO.sub("//***@", url)
    shown = url  # edited in place: urlunsplit would rewrite what it does not mask
    if password is not None:
        user, _, host = parts.netloc.rpartition("@")
        shown = shown.replace(f"//{parts.netloc}", f"//{user.partition(':')[0]}:***@{host}", 1)
    if parts.query:
        head, _, rest = shown.partition("?")
        query, hash_mark, fragment = rest.partition("#")
        query = "&".join(_masked(pair) for pair in query.split("&"))
        shown = f"{head}?{query}{hash_mark}{fragment}"
    return shown


def _masked(pair: str) -> str:
    name, sep, value = pair.partition("=")
    if sep and value and _SECRET_NAME.search(unquote_plus(name)):
        return f"{name}=***"
    return pair


def safe_text(text: str) -> str:
    """``text`` with every URL in it shown by :func:`safe_url` (a URL runs from its
    ``scheme://`` to the next whitespace; see the module)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: safe_url(match.group()), text)
