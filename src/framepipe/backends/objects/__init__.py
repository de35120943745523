"""Object store: where frames, videos and thumbnails live, addressed by ``/``-separated keys.

Open one with :func:`open_object_store` (``file:///path``, a plain directory path, or
``s3://bucket/prefix?endpoint=...``); every backend implements the :class:`ObjectStore`
contract. :class:`S3ObjectStore` needs ``pip install 'framepipe[s3]'``; its module is loaded on
first use, and boto3 only when a store is opened.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from framepipe.backends.objects.base import ObjectInfo, ObjectStore, validate_key
from framepipe.backends.objects.local import LocalObjectStore
from framepipe.backends.objects.opening import open_object_store

if TYPE_CHECKING:
    from framepipe.backends.objects.s3 import S3ObjectStore

__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "S3ObjectStore",
    "open_object_store",
    "validate_key",
]


def __getattr__(name: str) -> Any:
    if name == "S3ObjectStore":
        from framepipe.backends.objects.s3 import S3ObjectStore

        return S3ObjectStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
