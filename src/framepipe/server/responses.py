"""How the service answers: JSON that always encodes, and errors as a status code with a
``detail``.

Guarantees: no stored value can make a response fail (text that cannot be encoded is sent as
its JSON escape); framepipe's errors map to fixed codes (unknown execution or object 404, a
state that forbids the call 409, too large 413, a bad definition or input 422, a bad key 400,
the object store failing 500, the state database 503) with details that never show the
server's home or object store: an object store's own failure is answered with a fixed text
(naming the key, where the route knows it:
:func:`~framepipe.server.store_errors.object_store_errors`), its message, which
holds paths or endpoints, goes to the log only; a request that fails validation is a 422 that
lists what is wrong without echoing the input; no URL in an answer shows its password or a
secret query value (:mod:`framepipe.server.public`).
"""

from typing import Any

from framepipe.errors import (
    ExecutionNotFoundError,
    ExecutionStateError,
    FramepipeError,
    InputTooLargeError,
    InvalidInputError,
    InvalidKeyError,
    MissingDependencyError,
    ObjectKeyConflictError,
    ObjectNotFoundError,
    ObjectStoreError,
    PipelineDefinitionError,
    StateStoreError,
)
from framepipe.logs import get_logger
from framepipe.server.public import public_json
from framepipe.server.state import service_state
from framepipe.server.store_errors import store_failure_detail
from framepipe.untrusted import dumps

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from sqlalchemy.exc import SQLAlchemyError
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = ["SafeJSONResponse", "install_error_handlers"]

_log = get_logger("server")


class SafeJSONResponse(JSONResponse):
    """JSON that always encodes: a lone surrogate stored before it was refused at the
    boundary is sent as its ``\\uXXXX`` escape instead of failing the whole response; the
    secrets of the URLs in its strings are masked (:mod:`framepipe.server.public`)."""

    def render(self, content: Any) -> bytes:
        return dumps(public_json(content)).encode("utf-8")


async def _framepipe_error(request: Request, exc: FramepipeError) -> Response:
    status = 400
    if isinstance(exc, ObjectNotFoundError):
        detail = f"no object {exc.key!r}" if exc.key is not None else "no such object"
        return SafeJSONResponse({"detail": detail}, status_code=404)
    if isinstance(exc, ObjectKeyConflictError):
        return SafeJSONResponse({"detail": str(exc)}, status_code=409)
    if isinstance(exc, ObjectStoreError) and not isinstance(exc, InvalidKeyError):
        # Reached only where no route named the key (see object_store_errors).
        _log.error("object store error: %s", exc)
        detail = store_failure_detail("answer")
        return SafeJSONResponse({"detail": detail}, status_code=500)
    if isinstance(exc, ExecutionNotFoundError):
        status = 404
    elif isinstance(exc, ExecutionStateError):
        status = 409
    elif isinstance(exc, InputTooLargeError):
        status = 413
    elif isinstance(exc, (PipelineDefinitionError, InvalidInputError)):
        status = 422
    elif isinstance(exc, InvalidKeyError):
        status = 400
    elif isinstance(exc, StateStoreError):
        _log.error("state database error: %s", exc)
        status = 503
    return SafeJSONResponse({"detail": service_state(request).public(str(exc))}, status_code=status)


async def _database_error(request: Request, exc: SQLAlchemyError) -> Response:
    _log.error("state database error: %s", exc)
    reason = str(getattr(exc, "orig", None) or type(exc).__name__)
    detail = service_state(request).public(f"the state database failed: {reason}")
    return SafeJSONResponse({"detail": detail}, status_code=503)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code in (204, 304):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return SafeJSONResponse(
        {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


async def _invalid_request(_request: Request, exc: RequestValidationError) -> Response:
    # Not the input itself: it can be megabytes (and it is the client's own).
    errors = [{k: v for k, v in err.items() if k in ("type", "loc", "msg")} for err in exc.errors()]
    return SafeJSONResponse({"detail": errors}, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Answer framepipe's errors, the state database's, HTTP errors and invalid requests on
    ``app`` as described above."""
    app.exception_handler(FramepipeError)(_framepipe_error)
    app.exception_handler(SQLAlchemyError)(_database_error)
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_invalid_request)
