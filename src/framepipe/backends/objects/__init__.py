"""Object store: where frames, videos and thumbnails live, addressed by ``/``-separated keys.

Open one with :func:`open_object_store` (``file:///path`` or a plain directory path); every
backend implements the :class:`ObjectStore` contract.
"""

from __future__ import annotations

from framepipe.backends.objects.base import (
    ObjectInfo,
    ObjectStore,
    open_object_store,
    validate_key,
)
from framepipe.backends.objects.local import LocalObjectStore

__all__ = [
    "LocalObjectStore",
    "ObjectInfo",
    "ObjectStore",
    "open_object_store",
    "validate_key",
]
