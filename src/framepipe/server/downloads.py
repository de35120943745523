"""Objects sent whole to a client, at any size: :func:`open_copy` and :func:`streamed`.

Guarantees: an object is copied from its store to a temporary file whose name is removed at
once (its space freed when the file is closed, however the response ends) and sent from there
in chunks of :data:`CHUNK` bytes, so an object of any size costs the service no more memory
than a chunk, whether the client reads fast, slowly or not at all; the response says its
length, its type and ``nosniff``.
"""

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import BinaryIO

from framepipe.backends.objects import ObjectStore
from framepipe.errors import MissingDependencyError

try:
    from fastapi.responses import StreamingResponse
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["CHUNK", "open_copy", "streamed"]

CHUNK = 1024 * 1024
"""Bytes of a download read and sent at a time."""


def open_copy(store: ObjectStore, key: str) -> BinaryIO:
    """The object ``key`` as an open temporary copy whose name is already removed (raises
    what ``store.get_file`` raises). Blocking: call it in a thread."""
    folder = tempfile.mkdtemp(prefix="framepipe-download-")
    try:
        return open(store.get_file(key, os.path.join(folder, "object")), "rb")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _chunks(file: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await asyncio.to_thread(file.read, CHUNK):
            yield chunk
    finally:
        file.close()


def streamed(
    file: BinaryIO, media_type: str, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """A response sending ``file`` (from :func:`open_copy`) chunk by chunk, closing it at the
    end, as ``media_type`` with its length, ``nosniff`` and ``headers``."""
    return StreamingResponse(
        _chunks(file),
        media_type=media_type,
        headers={
            **(headers or {}),
            "Content-Length": str(os.fstat(file.fileno()).st_size),
            "X-Content-Type-Options": "nosniff",
        },
    )
