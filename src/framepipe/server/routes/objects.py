"""``PUT /api/objects/{key}`` (uploads) and ``GET /api/objects/{key}``: the object store.

Guarantees: an upload is streamed to a temporary file, never held in memory, and stored only
once it arrived whole; one over ``max_upload_bytes`` (declared or counted) is a 413 and stores
nothing; a download is copied from the store to a temporary file (removed at once, its space
freed when the response ends, however it ends) and streamed from there in chunks
(:mod:`framepipe.server.downloads`), so an object of any size (a result video) costs the
service no more memory than a chunk, whether the client reads fast, slowly or not at all; it is
sent as ``application/octet-stream`` with ``X-Content-Type-Options: nosniff``, so no browser
runs it as a page or script of the service's origin. The key is the path's tail as the client
sent it (:mod:`~framepipe.server.path_keys`): one that is not valid UTF-8 or that escapes the
store is a 400, a missing object a 404, a failure of the store itself a 500 naming the key,
never the store's paths (:func:`~framepipe.server.responses.object_store_errors`).
"""

import asyncio
import os
import tempfile
from typing import Any

from framepipe.backends.objects.base import validate_key
from framepipe.errors import MissingDependencyError
from framepipe.server.access import open_to_execution_tokens
from framepipe.server.downloads import open_copy, streamed
from framepipe.server.path_keys import ObjectKey
from framepipe.server.state import Service
from framepipe.server.store_errors import object_store_errors

try:
    from fastapi import APIRouter, HTTPException, Request
    from fastapi.responses import StreamingResponse
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["router"]

router = APIRouter(tags=["objects"])
"""Included under ``/api``."""


@router.put("/objects/{key:objectkey}", status_code=201)
async def objects_put(key: ObjectKey, request: Request, service: Service) -> dict[str, Any]:
    """Store the request body under ``key`` (at most ``max_upload_bytes``). The body is
    streamed to a temporary file, never held in memory, and stored only once complete:
    an upload cut short or over the limit stores nothing."""
    limit = service.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413,
            f"upload of {declared} bytes is over the limit of {limit} (FRAMEPIPE_MAX_UPLOAD_BYTES)",
        )
    obj = service.objects
    validate_key(key)
    fd, tmp = tempfile.mkstemp(prefix="framepipe-upload-")
    try:
        with os.fdopen(fd, "wb") as file:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(
                        413,
                        f"upload is over the limit of {limit} bytes (FRAMEPIPE_MAX_UPLOAD_BYTES)",
                    )
                file.write(chunk)
        with object_store_errors("store", key):
            info = await asyncio.to_thread(obj.put_file, key, tmp)
    finally:
        os.unlink(tmp)
    return {"key": info.key, "size": info.size, "version": info.version}


@router.get(
    "/objects/{key:objectkey}", responses={200: {"content": {"application/octet-stream": {}}}}
)
@open_to_execution_tokens("object", "key")
async def objects_get(key: ObjectKey, service: Service) -> StreamingResponse:
    """The object stored under ``key``, streamed (any size: the service holds a chunk of it at
    a time)."""
    obj = service.objects
    with object_store_errors("read", key):
        file = await asyncio.to_thread(open_copy, obj, key)
    return streamed(file, "application/octet-stream")
