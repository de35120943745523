"""Who may do what over ``/api`` and ``/ws``: the service's API token opens everything; an
execution token (:mod:`framepipe.server.execution_tokens`) reads one execution.

Guarantees:

* :func:`check_token` runs before every route behind the token: the API token (compared in
  constant time) passes; an execution token passes only on the ``GET`` routes marked
  :func:`open_to_execution_tokens` (``/api/executions/{id}``, ``/api/status/{id}``,
  ``/api/events?execution_id=``, ``/api/objects/{key}``), for the execution it names (403 otherwise,
  before the route reads or writes anything); anything else, an expired or tampered execution
  token included, is a 401. A token is never logged nor put in an answer;
* the objects an execution token may download are the execution's outputs
  (:func:`output_keys`): the object keys its steps recorded in its data that lie under a
  folder named by its full id, known from the state store when the request comes, never a
  prefix guessed from the key; text a job records cannot open another's objects;
* :func:`admit_live_socket` does the same for ``/ws``: an execution token is accepted with
  ``?execution_id=`` naming its execution by full id, and is refused (1008) without it, so
  it never gets the snapshot of every execution, a revoked one is refused, and a socket it
  opened ends when it expires (:func:`admitted_until`) or is revoked (:func:`admitted_as`);
* what an execution token reads of its execution (record, status, events, live feed) is
  passed through :func:`shown_execution` and :func:`shown_event`: its errors without their
  tracebacks (the service's code) and with the service's home and object store folders
  hidden, and without the file its pipeline was loaded from nor the process running it. The
  API token reads all of it.
"""

from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

from framepipe.errors import InvalidInputError, MissingDependencyError
from framepipe.jobs.models import ExecutionInfo
from framepipe.server import execution_tokens
from framepipe.server.execution_tokens import ExecutionGrant, is_execution_token
from framepipe.server.guard import admit_websocket, bearer_token, token_matches
from framepipe.server.state import ServiceState, service_state
from framepipe.server.token_revocations import is_revoked, revoked

try:
    from fastapi import HTTPException, Request, WebSocket
    from starlette.requests import HTTPConnection
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = [
    "Where",
    "admit_live_socket",
    "admitted_as",
    "admitted_until",
    "check_token",
    "open_to_execution_tokens",
    "output_keys",
    "shown_event",
    "shown_execution",
]

Where = Literal["path", "query", "object"]
"""How a route open to execution tokens names what it reads: its execution's full id as a
path or a query parameter, or an object key (a path parameter) that must be one of
:func:`output_keys`."""

_GRANT = "_framepipe_execution_token"
"""The attribute of a route's endpoint holding what :func:`open_to_execution_tokens` opened
it to, ``(where, name)``."""
_ADMITTED = "execution_grant"
"""The name under a connection's ``state`` of the grant it was admitted with (an execution
token's), absent for the API token."""
_OPERATOR_ONLY = ("pipeline_ref", "owner")
"""Fields of an execution record an execution token does not read: where the service loaded
the pipeline's code from, and which of its processes runs it."""
_TRACEBACK = "\n\nTraceback (most recent call last):"
"""What follows an error's first line in a stored error (``framepipe.jobs.outcomes``)."""

_UNAUTHORIZED = "missing or wrong bearer token (Authorization: Bearer ...)"

F = TypeVar("F", bound=Callable[..., Any])


def open_to_execution_tokens(where: Where, name: str) -> Callable[[F], F]:
    """Mark a ``GET`` route (below its ``@router.get``) as readable with an execution token
    for what its parameter ``name`` names (see :data:`Where`); a route not marked refuses
    them (403)."""

    def mark(endpoint: F) -> F:
        setattr(endpoint, _GRANT, (where, name))
        return endpoint

    return mark


def _strings(value: Any) -> Iterator[str]:
    """The strings of a data or input value: itself, or the strings of a list of them."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        yield from (v for v in value if isinstance(v, str))


def _in_own_folder(key: str, execution_id: str) -> bool:
    """Whether ``key`` lies under a folder named ``execution_id`` (``ml/<id>/output.mp4``)."""
    return execution_id in key.split("/")[:-1]


def output_keys(info: ExecutionInfo) -> frozenset[str]:
    """The object keys the execution ``info`` recorded as its outputs: each text value (or
    text in a list value) of its data, that is, of what its steps returned (``video``,
    ``thumbnail``, ``manifest``...), that lies under a folder named by its full id
    (``ml/<id>/output.mp4``), except the texts of its inputs (a key the submitter named, or
    text a step copied from its inputs, is not the execution's output). Data is what its
    steps made of what they were given (a video's title, a model's label), so a text
    naming another execution's object, an upload or any other key outside its own folder is
    not an output, whatever its steps recorded. An object the execution deleted since (an
    intermediate) is simply missing."""
    given = {s for v in info.inputs.values() for s in _strings(v)}
    return frozenset(
        s
        for v in info.data.values()
        for s in _strings(v)
        if s not in given and _in_own_folder(s, info.id)
    )


def _brief(error: Any, service: ServiceState) -> Any:
    """An error text without its traceback, and without the service's own folders."""
    if not isinstance(error, str):
        return error
    return service.public(error.partition(_TRACEBACK)[0])


def _names(grant: ExecutionGrant, named: object) -> bool:
    """Whether ``named`` (an id as a request gives it) is ``grant``'s execution: its full id,
    in any case; a prefix, another id or none is not."""
    return isinstance(named, str) and named.strip().lower() == grant.execution_id


def _by_execution_token(connection: HTTPConnection) -> bool:
    return getattr(connection.state, _ADMITTED, None) is not None


def admitted_until(connection: HTTPConnection) -> int | None:
    """When what ``connection`` was admitted with expires (unix seconds): its execution
    token's expiry, or None for the API token (or none needed)."""
    grant: ExecutionGrant | None = getattr(connection.state, _ADMITTED, None)
    return None if grant is None else grant.expires_at


def admitted_as(connection: HTTPConnection) -> str | None:
    """The :func:`~framepipe.server.execution_tokens.token_id` of the execution token
    ``connection`` was admitted with, or None for the API token (or none needed)."""
    grant: ExecutionGrant | None = getattr(connection.state, _ADMITTED, None)
    return None if grant is None else grant.token_id


def shown_execution(
    connection: HTTPConnection, service: ServiceState, record: dict[str, Any]
) -> dict[str, Any]:
    """``record`` (an execution with its steps, or its status) as the client of
    ``connection`` reads it: whole with the API token; for an execution token without
    :data:`_OPERATOR_ONLY` and with its ``error`` and each step's cut to the first line,
    the service's folders hidden (:meth:`ServiceState.public`)."""
    if not _by_execution_token(connection):
        return record
    out = {k: v for k, v in record.items() if k not in _OPERATOR_ONLY}
    if "error" in out:
        out["error"] = _brief(out["error"], service)
    if isinstance(out.get("steps"), list):
        out["steps"] = [
            {**step, "error": _brief(step.get("error"), service)} for step in out["steps"]
        ]
    return out


def shown_event(
    connection: HTTPConnection, service: ServiceState, event: dict[str, Any]
) -> dict[str, Any]:
    """``event`` (:meth:`Event.to_dict <framepipe.events.Event.to_dict>`) as the client of
    ``connection`` reads it: whole with the API token; for an execution token without
    ``data.traceback`` and with ``data.error`` cut as :func:`shown_execution` cuts errors."""
    data = event.get("data")
    if not _by_execution_token(connection) or not isinstance(data, dict):
        return event
    kept = {k: _brief(v, service) if k == "error" else v for k, v in data.items()}
    kept.pop("traceback", None)
    return {**event, "data": kept}


def _unauthorized(detail: str = _UNAUTHORIZED) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": "Bearer"})


def _forbidden(grant: ExecutionGrant, what: str) -> HTTPException:
    return HTTPException(
        403, f"an execution token reads its execution ({grant.execution_id}) only, not {what}"
    )


async def _admit_grant(request: Request, service: ServiceState, grant: ExecutionGrant) -> None:
    """Refuse (403) a request of an execution token outside what it grants."""
    endpoint = getattr(request.scope.get("route"), "endpoint", None)
    rule = getattr(endpoint, _GRANT, None)
    if rule is None or request.method not in ("GET", "HEAD"):
        raise _forbidden(grant, f"{request.method} {request.url.path}")
    where, name = rule
    if where == "object":
        key = str(request.path_params.get(name, ""))
        info = await service.jobs.get(grant.execution_id)
        if key not in output_keys(info):
            raise _forbidden(grant, "an object that is not one of its outputs")
        return
    named = (request.path_params if where == "path" else request.query_params).get(name)
    if not _names(grant, named):
        raise _forbidden(grant, "another execution, or every execution")


async def check_token(request: Request) -> None:
    """Refuse a request without the service's API token (401), when it has one, unless it
    carries an execution token valid for what it asks (see the module's guarantees)."""
    service = service_state(request)
    token = service.token
    if not token:
        return
    given = bearer_token(request.headers.get("authorization"))
    if token_matches(given, token):
        return
    if given is None or not is_execution_token(given):
        raise _unauthorized()
    try:
        grant = execution_tokens.read(token, given)
    except InvalidInputError as exc:
        raise _unauthorized(f"the execution token {exc.reason}") from None
    if await is_revoked(service.store, grant.execution_id, grant.token_id):
        raise _unauthorized("the execution token has been revoked; ask your backend for a new one")
    await _admit_grant(request, service, grant)
    setattr(request.state, _ADMITTED, grant)


async def admit_live_socket(
    websocket: WebSocket, service: ServiceState, execution_id: str | None
) -> bool:
    """Accept the ``/ws`` connection ``websocket`` (which asks for ``execution_id``, or every
    execution) if it presents the API token, or an execution token of that very execution;
    else close it with 1008 and return False."""
    token = service.token
    killed: set[str] = set()
    if token and execution_id is not None and len(execution_id.strip()) == 32:
        killed = await revoked(service.store, execution_id.strip().lower())

    def granted(given: str | None) -> bool:
        if not token or given is None:
            return False
        try:
            grant = execution_tokens.read(token, given)
        except InvalidInputError:
            return False
        if not _names(grant, execution_id) or grant.token_id in killed:
            return False
        setattr(websocket.state, _ADMITTED, grant)
        return True

    return await admit_websocket(websocket, token, also=granted)
