"""The checks of single setting values, which :mod:`framepipe.config`'s sections run as field
validators (and :func:`url_beginning`, how a refused URL is described).

Each check returns the value as the setting keeps it, or raises ValueError saying what is
wrong with it (pydantic reports it, and :func:`framepipe.config.load_section` names the
variable); a message never repeats a secret (a URL is described by its scheme alone, a
token not at all). Nothing is opened or contacted: a database or MQTT URL is parsed, an
object store URL's scheme read, a home's folders looked at.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import Any

from framepipe.errors import ConfigError, StateStoreError
from framepipe.mqtt_urls import parse_mqtt_url
from framepipe.urls import not_utf8, safe_url

__all__ = [
    "DEFAULT_HOME",
    "FINISHED_STATUSES",
    "check_api_token",
    "check_database_url",
    "check_home",
    "check_input_roots",
    "check_log_level",
    "check_mqtt_url",
    "check_objects_url",
    "check_prune_objects",
    "check_utf8",
    "comma_list",
    "default_home_when_blank",
    "finished_statuses",
    "url_beginning",
]

_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:/{0,2}")


def url_beginning(url: str) -> str:
    """How ``url`` begins, for a message about its scheme: the scheme and the slashes after it,
    never what follows (a password may)."""
    match = _SCHEME.match(url)
    return f"it begins {match.group()!r}" if match else "it has no scheme"


DEFAULT_HOME = Path(".framepipe")
"""The home when none is set: ``.framepipe`` in the current folder."""


def default_home_when_blank(value: Any) -> Any:
    """:data:`DEFAULT_HOME` for a blank home (``FRAMEPIPE_HOME=""``), as a blank setting is
    unset everywhere (``Path("")`` would be the current folder itself); anything else as given
    (run before the field's type is checked)."""
    if isinstance(value, str) and not value.strip():
        return DEFAULT_HOME
    return value


def check_home(value: Path) -> Path:
    """The home, unless it (or a folder it would be in) exists and is not a folder."""
    for folder in (value, *value.absolute().parents):
        if folder.exists():
            if not folder.is_dir():
                what = "is not a folder" if folder == value else f"is inside {folder}, a file"
                raise ValueError(f"{value} {what}")
            break
    return value


def check_database_url(value: str | None) -> str | None:
    """The state database URL, unless it does not parse, names neither SQLite nor
    PostgreSQL, or names an in-memory SQLite database (``sqlite://``, ``sqlite:///:memory:``,
    ``file::memory:`` or ``mode=memory``): each connection of the pool would open its own,
    empty one, without the tables another made, and all of it is lost at exit."""
    if not value:
        return value
    from framepipe.backends.state.store import parse_database_url

    try:
        parsed = parse_database_url(value)
    except StateStoreError as exc:
        raise ValueError(str(exc)) from None
    if parsed.get_backend_name() == "sqlite" and _in_memory(
        parsed.database or "", str(parsed.query.get("mode", ""))
    ):
        raise ValueError(
            "an in-memory SQLite database cannot be the state database: each connection would "
            "get its own empty database; give a file path (sqlite:///path/to/state.db)"
        )
    return value


def _in_memory(database: str, mode: str) -> bool:
    return database in ("", ":memory:") or database.startswith("file::memory:") or mode == "memory"


def check_objects_url(value: str | None) -> str | None:
    """The object store URL, unless :func:`~framepipe.backends.objects.opening.
    object_store_location` refuses it (a wrong scheme, option, bucket name, credentials in
    it ...); nothing is opened or contacted here."""
    if not value:
        return value
    from framepipe.backends.objects.opening import object_store_location

    try:
        object_store_location(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


def check_prune_objects(value: str | None) -> str | None:
    """A prefix template naming one execution's objects (None when blank): it holds
    ``{execution_id}`` and may hold ``{pipeline}``, each without a format spec or conversion,
    and no other field. Without ``{execution_id}``, or with ``{execution_id:.4}``, it would
    name other executions' objects too."""
    if value is None or not value.strip():
        return None
    import string

    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(value)]
    except ValueError as exc:
        raise ValueError(f"{value!r}: {exc}") from None
    if any(spec or conv for f, spec, conv in parsed if f is not None):
        raise ValueError(
            f"{value!r}: a field takes no format or conversion "
            "({execution_id:.4} would name other executions' objects)"
        )
    fields = {f for f, _, _ in parsed if f is not None}
    unknown = sorted(fields - {"execution_id", "pipeline"})
    if unknown:
        raise ValueError(
            f"{value!r}: unknown field(s) {', '.join(unknown)}; use {{execution_id}} and "
            "{pipeline}"
        )
    if "execution_id" not in fields:
        raise ValueError(
            f"{value!r} does not hold {{execution_id}}: it would name the objects of every "
            "execution"
        )
    return value


FINISHED_STATUSES = ("completed", "failed", "cancelled", "interrupted")
"""The statuses of an execution that runs no more (what retention may delete)."""


def finished_statuses(value: Any) -> list[str]:
    """A comma-separated list (or a list) of finished statuses, lower-cased; blank: all of
    :data:`FINISHED_STATUSES`. Anything else is a ValueError naming it (``pending`` and
    ``running`` executions are never deleted)."""
    items = comma_list(value)
    if not isinstance(items, list):
        items = [items]
    statuses = [str(item).strip().lower() for item in items]
    wrong = [s for s in statuses if s not in FINISHED_STATUSES]
    if wrong:
        raise ValueError(
            f"{', '.join(map(repr, wrong))}: use {', '.join(FINISHED_STATUSES)} "
            "(pending and running executions are never pruned)"
        )
    return statuses or list(FINISHED_STATUSES)


_NOT_UTF8 = (
    "holds bytes that are not UTF-8 (an environment value or file in another encoding); "
    "write it in UTF-8"
)


def check_utf8(value: Any) -> Any:
    """The value (a text, a list of texts or None), unless a text :func:`not_utf8`: a broker
    name, a Redis key or a Host header is sent as UTF-8, so it could never be used. The value
    is not shown (it may hold a secret)."""
    texts = value if isinstance(value, list) else [value]
    if any(isinstance(text, str) and not_utf8(text) for text in texts):
        raise ValueError(_NOT_UTF8)
    return value


def check_mqtt_url(value: str | None) -> str | None:
    """The MQTT URL (None when blank), unless :func:`framepipe.mqtt_urls.parse_mqtt_url`
    refuses it (its host, user name, password or client id not UTF-8 among the reasons)."""
    if not value:
        return None
    try:
        parse_mqtt_url(value)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return value


def comma_list(value: Any) -> Any:
    """A comma-separated string as its items, stripped, blanks dropped (run before the
    field's type is checked); anything else as given."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def check_input_roots(value: list[Path]) -> list[Path]:
    """The input roots, unless one is not an absolute path. They bound what HTTP clients may
    read; a relative one would name a different folder for each directory the service is
    started in (and a submit resolves it against the directory of that moment), so it is
    refused rather than resolved. ``~`` is not expanded."""
    for root in value:
        if not root.is_absolute():
            raise ValueError(
                f"{str(root)!r} is not an absolute path: give absolute folders (a relative one "
                "would depend on the directory the service is started in)"
            )
    return value


def check_allowed_origins(value: list[str]) -> list[str]:
    """The web origins, unless one is not ``scheme://host[:port]`` as a browser sends it in
    ``Origin``: ``*``, a path, a query or a user would match no request, silently."""
    for origin in value:
        parts = urllib.parse.urlsplit(origin.rstrip("/"))
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or not port_ok
            or "@" in parts.netloc
            or parts.path
            or parts.query
            or parts.fragment
        ):
            raise ValueError(
                f"{safe_url(origin)!r} is not a web origin: write scheme://host[:port], as a "
                "browser sends it (e.g. https://app.example.com or http://localhost:5173); no "
                "'*', path or user"
            )
    return value


def check_api_token(value: str | None) -> str | None:
    """The bearer token (None when blank), unless it is blank, has spaces around it or is
    not printable ASCII."""
    if value is None or value == "":
        return None
    if not value.strip() or value != value.strip():
        raise ValueError("the token is blank or has spaces around it")
    if not value.isascii() or not value.isprintable():
        raise ValueError("the token must be printable ASCII (it travels in an HTTP header)")
    return value


def check_log_level(value: str) -> str:
    """The log level in capitals, unless it is none of Python's level names."""
    value = value.upper()
    if value not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
        raise ValueError(f"unknown log level {value!r}")
    return value
