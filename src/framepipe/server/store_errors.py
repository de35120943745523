"""An object store's own failures, as routes answer them: :func:`object_store_errors`.

Guarantee: a failure of the store itself (not a bad key, not a missing object, not a key that
conflicts with the store's folders: those are the client's, answered 400, 404 and 409) is a
500 whose detail names the key and never the store's message, which may show the server's
paths or the store's endpoint; that message goes to the log only.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from framepipe.errors import (
    InvalidKeyError,
    MissingDependencyError,
    ObjectKeyConflictError,
    ObjectNotFoundError,
    ObjectStoreError,
)
from framepipe.logs import get_logger

try:
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "starlette", "server", "the HTTP service") from exc

__all__ = ["object_store_errors", "store_failure_detail"]

_log = get_logger("server")

_STORE_FAILED = "the object store failed to {action}{key} (the server's log has the cause)"


def store_failure_detail(action: str, key: str | None = None) -> str:
    """The detail a client gets for a failure of the store itself: what was being done and the
    key (when known), nothing of the store's own message."""
    return _STORE_FAILED.format(action=action, key="" if key is None else f" {key!r}")


@contextmanager
def object_store_errors(action: str, key: str) -> Iterator[None]:
    """Around a route's use of an object store for ``key``: a failure of the store itself
    (not a bad key, not a missing object: those are the client's, answered 400 and 404) is a
    500 naming ``key``, and its cause, which may show the server's paths or the store's
    endpoint, goes to the log only."""
    try:
        yield
    except (InvalidKeyError, ObjectNotFoundError):
        raise
    except ObjectKeyConflictError as exc:  # the client's: its message names only the key
        raise StarletteHTTPException(409, str(exc)) from None
    except ObjectStoreError as exc:
        _log.error("object store error (%s %r): %s", action, key, exc)
        raise StarletteHTTPException(500, store_failure_detail(action, key)) from exc
