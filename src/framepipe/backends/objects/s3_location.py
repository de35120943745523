"""Where an S3 object store is: its ``s3://`` URL read and checked (:func:`parse_s3_url`), and
the bucket name, prefix and endpoint every :class:`~framepipe.backends.objects.s3.S3ObjectStore`
is checked with (:func:`check_location`). Nothing here contacts anything or needs boto3:
settings check an object store URL with it when they load."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from framepipe.backends.objects.base import _key_problem
from framepipe.backends.objects.s3_errors import CREDENTIAL_HINT
from framepipe.errors import ConfigError
from framepipe.urls import safe_text, safe_url

__all__ = ["S3Location", "check_location", "normalise_prefix", "parse_s3_url"]

_BUCKET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")  # botocore's rule, loosely
_URL_OPTIONS = ("endpoint", "region", "create", "connect_timeout", "read_timeout", "max_attempts")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def normalise_prefix(prefix: str) -> str:
    if not isinstance(prefix, str):
        raise ConfigError(f"S3 prefix must be a str, not {type(prefix).__name__}")
    stripped = prefix.removesuffix("/")
    if not stripped:
        return ""
    problem = _key_problem(stripped)
    if problem is not None:
        raise ConfigError(f"invalid S3 prefix {prefix!r}: {problem}")
    return stripped + "/"


def check_location(bucket: str, prefix: str, endpoint_url: str | None) -> None:
    """Refuse a bucket name, prefix or endpoint no store can have (:class:`ConfigError`)."""
    if not isinstance(bucket, str) or not _BUCKET_NAME.fullmatch(bucket):
        raise ConfigError(
            f"invalid S3 bucket name {bucket!r}: use letters, digits, '.', '-' and '_'"
        )
    normalise_prefix(prefix)
    if endpoint_url is not None:
        parts = urllib.parse.urlsplit(endpoint_url)
        shown = safe_url(endpoint_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"invalid S3 endpoint {shown!r}: use http(s)://host[:port]")
        if "@" in parts.netloc or shown != endpoint_url:  # a user, a password, a secret
            raise ConfigError(
                f"S3 endpoint {shown!r} carries credentials; "
                "pass access_key/secret_key (or set FRAMEPIPE_S3_ACCESS_KEY/"
                "FRAMEPIPE_S3_SECRET_KEY) instead"
            )


@dataclass(frozen=True)
class S3Location:
    """Where an ``s3://`` URL points (:func:`parse_s3_url`): checked, nothing opened."""

    bucket: str
    prefix: str
    endpoint_url: str | None
    region: str | None
    create_bucket: bool
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    max_attempts: int = 3


def _seconds(options: dict[str, str], name: str, default: float, shown: str) -> float:
    text = options.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise ConfigError(f"{shown}: {name}={text!r}, expected seconds above 0, at most 3600")
    return value


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket[/prefix][?endpoint=URL&region=NAME&create=1]`` read and checked without
    contacting anything (boto3 need not be installed). ``connect_timeout`` and
    ``read_timeout`` (seconds, 5 and 60 by default) and ``max_attempts`` (3) set how long a
    request may wait and how often it is tried in all: a frozen server holds a put for
    ``(read_timeout + 1 s) x max_attempts`` (the second waits for its ``100 Continue``). A
    URL that is wrong (credentials in it, no bucket, an unknown or repeated option, a bad
    ``create`` or number, a bucket name, prefix or endpoint no store can have) raises
    :class:`ConfigError` naming the wrong part, the URL shown by
    :func:`~framepipe.urls.safe_url`."""
    parts = urllib.parse.urlsplit(url)
    shown = f"object store URL {safe_url(url)!r}"
    # a password written with '/' in it ends the netloc early, at its ':'
    if "@" in parts.netloc or (":" in parts.netloc and "@" in url):
        raise ConfigError(f"{shown} carries credentials; {CREDENTIAL_HINT} instead")
    if parts.scheme.lower() != "s3":
        raise ConfigError(f"{shown} is not an s3:// URL")
    if not parts.netloc:
        raise ConfigError(f"{shown} names no bucket (s3://bucket/...)")
    if parts.fragment:
        raise ConfigError(f"{shown}: S3 URLs take no #fragment")
    try:
        pairs = urllib.parse.parse_qsl(
            parts.query, keep_blank_values=True, strict_parsing=bool(parts.query)
        )
    except ValueError as exc:
        raise ConfigError(f"{shown}: {safe_text(str(exc))}") from exc
    options: dict[str, str] = {}
    for name, value in pairs:
        if name not in _URL_OPTIONS:
            raise ConfigError(
                f"{shown}: unknown option {name!r}; S3 URLs take {', '.join(_URL_OPTIONS)}"
            )
        if name in options:
            raise ConfigError(f"{shown}: option {name!r} given twice")
        options[name] = value
    create = options.get("create", "").lower()
    if create not in _TRUE | _FALSE:
        raise ConfigError(f"{shown}: create={options['create']!r}, expected 1 or 0")
    attempts = options.get("max_attempts", "3")
    if not (attempts.isascii() and attempts.isdigit() and 1 <= int(attempts) <= 20):
        raise ConfigError(f"{shown}: max_attempts={attempts!r}, expected a whole number 1-20")
    location = S3Location(
        parts.netloc,
        prefix=urllib.parse.unquote(parts.path.lstrip("/")),
        endpoint_url=options.get("endpoint") or None,
        region=options.get("region") or None,
        create_bucket=create in _TRUE,
        connect_timeout=_seconds(options, "connect_timeout", 5.0, shown),
        read_timeout=_seconds(options, "read_timeout", 60.0, shown),
        max_attempts=int(attempts),
    )
    check_location(location.bucket, location.prefix, location.endpoint_url)
    return location
