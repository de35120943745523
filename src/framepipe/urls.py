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

Secrets in the path (a webhook's ``/services/T0/B0/<secret>``, a bot's ``/bot<id>:<secret>/``,
``/key/<secret>``) are masked segment by segment (``/services/T0/B0/***``); scheme, host,
port and every other segment are shown. A segment is a secret (:func:`secret_segment`) when
it is at least 8 characters of letters, digits and ``-_~:+=%`` with a digit among them and
the segment before it is a secret's name (``/token/<x>``, ``/api-key/<x>``; ``/auth/login``
is shown), or when it looks random: at least 16 such characters (no ``.``: a file name is
shown), with a digit, an upper-case and a lower-case letter among them. So a key of
mixed-case letters and digits is hidden, and names, dates, file names and lower-case ids (an
execution's 32 hexadecimal digits, a UUID) are shown; a secret that is a single case of
letters with digits (hexadecimal) is hidden only after a secret's name. The path of a local
file (a ``file:``, ``unix:`` or ``sqlite:`` URL, or a path without a scheme) is shown whole:
a folder or file name is no secret, and the user needs it to find the file.

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
from urllib.parse import SplitResult, unquote, unquote_plus, urlsplit

from framepipe.errors import ConfigError

__all__ = ["safe_json", "safe_text", "safe_url", "secret_name", "secret_segment"]

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


_RANDOM_SEGMENT = re.compile(r"(?=.*[0-9])(?=.*[a-z])(?=.*[A-Z])[A-Za-z0-9_~:+=%-]{16,}")
_NAMED_SEGMENT = re.compile(r"(?=.*[0-9])[A-Za-z0-9_~:+=%-]{8,}")
_LOCAL_SCHEME = re.compile(r"file|unix|sqlite(?:\+[A-Za-z0-9_]+)?", re.IGNORECASE)


def secret_segment(segment: str, before: str = "") -> bool:
    """Whether the path segment ``segment`` (as written), which follows the segment
    ``before``, is a secret (see the module)."""
    if _RANDOM_SEGMENT.fullmatch(segment):
        return True
    return bool(before and _NAMED_SEGMENT.fullmatch(segment) and secret_name(unquote_plus(before)))


def _masked_path(base: str) -> str:
    """``base`` (a URL without its query and fragment) with its secret path segments masked;
    what precedes the path (``scheme://user:***@host:port``) is left as written, and a
    local file's path is left whole."""
    scheme, sep, _ = base.partition("://")
    if (not sep and not base.startswith("//")) or (sep and _LOCAL_SCHEME.fullmatch(scheme)):
        return base
    start = 0
    scheme_end = base.find("://")
    if scheme_end >= 0:
        start = base.find("/", scheme_end + 3)
        if start < 0:
            return base
    head, segments = base[:start], base[start:].split("/")
    shown = [
        "***" if secret_segment(seg, segments[i - 1] if i else "") else seg
        for i, seg in enumerate(segments)
    ]
    return head + "/".join(shown)


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
    base = _masked_path(base)
    if query:
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


def scheme_only(url: str) -> str:
    """``url`` shown by its scheme alone (``redis://***``; ``***`` when it has no plain scheme):
    for a URL whose password cannot be told from the rest."""
    scheme, sep, _rest = url.partition("://")
    if not sep:
        scheme, sep, _rest = url.partition(":")
    plain = sep and scheme.isascii() and scheme.replace("+", "").isalnum()
    return f"{scheme}{sep}***" if plain else "***"


def split_url(url: str, what: str) -> SplitResult:
    """``url`` split, its port read; a :class:`~framepipe.errors.ConfigError` naming ``what``
    when its host and port do not parse. Nothing after the scheme is shown then: a URL that
    does not parse is one whose user name and password cannot be told from its host
    (:func:`safe_url` may not find them), and urllib's own message repeats the host part,
    which holds the password when it was read wrongly."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - reading it is the check
    except ValueError:
        raise ConfigError(
            f"{what} {scheme_only(url)!r} (the rest hidden): its host and port do not parse "
            "(a user name or password holding '/', '?', '#', '@', '[' or a space, or a full-width "
            "form of one, must be percent-encoded: '/' is %2F, '?' %3F, '#' %23, '@' %40, "
            "'[' %5B, ' ' %20)"
        ) from None
    return parts


def not_utf8(text: str) -> bool:
    """Whether ``text`` holds a lone surrogate, which no UTF-8 encoder takes: how Python reads
    a byte of an environment value that is not UTF-8 (U+DC80-U+DCFF)."""
    return any(0xD800 <= ord(char) <= 0xDFFF for char in text)


def check_sent_url(url: str, what: str) -> None:
    """A :class:`~framepipe.errors.ConfigError` naming ``what`` (no part of the URL but its
    scheme shown) when a client could never connect with ``url``: its host and port do not
    parse (:func:`split_url`), or its user name, password, host or options, percent-decoded,
    are no UTF-8 text (a lone surrogate: an environment byte in another encoding; or a
    ``%FF``), which a client sends as UTF-8 or, leniently read, as another text. A ``unix:``
    socket's path is a file name: any bytes will do there."""
    socket = url.startswith("unix:")
    parts = urlsplit(url) if socket else split_url(url, what)
    sent = [parts.query]
    sent += (
        [parts.netloc]
        if socket
        else [parts.username or "", parts.password or "", parts.hostname or ""]
    )
    if not all(_utf8_text(text) for text in sent):
        raise ConfigError(
            f"{what} {scheme_only(url)!r}: its user name, password, host or "
            "options hold bytes that are not UTF-8 (an environment value in another encoding, "
            "or a %XX escape of such a byte); write it in UTF-8"
        )


def _utf8_text(text: str) -> bool:
    """Whether ``text``, percent-decoded, is UTF-8 text."""
    try:
        return not not_utf8(unquote(text, errors="strict"))
    except UnicodeDecodeError:
        return False
