"""Opening an object store by URL: the one place that maps a URL to a backend."""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from framepipe.backends.objects.base import ObjectStore
from framepipe.backends.objects.local import LocalObjectStore
from framepipe.errors import ConfigError
from framepipe.urls import safe_url

if TYPE_CHECKING:
    from framepipe.backends.objects.s3_location import S3Location

__all__ = ["object_store_location", "open_object_store"]

_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def open_object_store(url: str) -> ObjectStore:
    """Open the object store at ``url``.

    A URL that is wrong (empty, an unknown scheme or option, a host in a file URL, credentials
    in it) raises :class:`ConfigError` naming the part that is wrong; a store that cannot be
    reached or opened raises :class:`ObjectStoreError`. No message shows a password or a
    secret query value of the URL (:func:`framepipe.urls.safe_url`).

    - ``file:///absolute/path`` or a plain directory path: :class:`LocalObjectStore` (the
      directory is created if missing);
    - ``s3://bucket[/prefix][?endpoint=URL&region=NAME&create=1]``, also ``connect_timeout``,
      ``read_timeout`` (seconds) and ``max_attempts``: :class:`S3ObjectStore`
      (``pip install 'framepipe[s3]'``); credentials come from the environment, never the URL.
    """
    where = object_store_location(url)
    if isinstance(where, Path):
        return LocalObjectStore(where)
    from framepipe.backends.objects.s3 import S3ObjectStore

    return S3ObjectStore.from_location(where)


def object_store_location(url: str) -> Path | S3Location:
    """Where ``url`` points, read and checked as :func:`open_object_store` reads it, without
    opening or contacting anything: a local directory's path or an S3 location. A URL that is
    wrong raises :class:`ConfigError` naming the part that is wrong (settings check this when
    they load, so a process refuses such a URL at start, not at its first object)."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(f"object store URL is empty ({url!r})")
    match = _URL_SCHEME.match(url)
    if match is None and not url.lower().startswith("file:"):
        return Path(url)
    scheme = match.group(1).lower() if match else "file"
    if scheme == "file":
        parts = urllib.parse.urlsplit(url)
        shown = f"object store URL {safe_url(url)!r}"
        if parts.netloc not in ("", "localhost"):
            host = parts.hostname  # never a password, also one with '/' in it
            named = f"names host {host!r}" if host else "names a host"
            raise ConfigError(f"{shown} {named}; use file:///absolute/path for a local directory")
        if parts.query or parts.fragment:
            raise ConfigError(f"{shown}: file URLs take no options")
        path = urllib.request.url2pathname(parts.path)
        if not path:
            raise ConfigError(f"{shown} has no path")
        return Path(path)
    if scheme == "s3":
        from framepipe.backends.objects.s3_location import parse_s3_url

        return parse_s3_url(url)
    raise ConfigError(
        f"unsupported object store URL {safe_url(url)!r}: scheme {scheme!r}; supported: "
        "file:///absolute/path, a plain directory path, or s3://bucket/prefix"
    )
