"""``/api/executions``: submit, list, show, retry and cancel executions.

Guarantees: an execution exists only once its submission was committed (an unknown pipeline
is a 404, invalid inputs a 422 naming the field); listings carry no inputs, steps or data, so
their size does not depend on what clients submitted; ids may be unique prefixes. An
execution token (``POST /api/executions/{id}/tokens``) is made only with the API token, for an
execution that exists, and lives at most a week; one is revoked alone with the API token
(``POST /api/executions/{id}/tokens/revoke``). Ids,
pipeline names and statuses are checked before any store is asked
(:mod:`framepipe.server.params`: a 422 naming the parameter).
"""

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from framepipe.errors import InvalidInputError, MissingDependencyError
from framepipe.jobs.client import ExecutionSummary
from framepipe.server import execution_tokens
from framepipe.server.access import open_to_execution_tokens, shown_execution
from framepipe.server.execution_tokens import DEFAULT_LIFETIME, MAX_LIFETIME
from framepipe.server.params import MAX_NAME, ExecutionId, PipelineName, StatusName
from framepipe.server.state import Service
from framepipe.server.token_revocations import revoke

try:
    from fastapi import APIRouter, HTTPException, Query, Request
    from pydantic import BaseModel, ConfigDict, Field
except ModuleNotFoundError as exc:
    raise MissingDependencyError(exc.name or "fastapi", "server", "the HTTP service") from exc

__all__ = [
    "CancelAnswer",
    "ExecutionToken",
    "RevokeBody",
    "Revoked",
    "SubmitBody",
    "Submitted",
    "TokenBody",
    "router",
    "summaries",
]

router = APIRouter(tags=["executions"])
"""The executions, included under ``/api``."""


class SubmitBody(BaseModel):
    """``POST /api/executions``."""

    model_config = ConfigDict(extra="forbid")
    pipeline: PipelineName = Field(
        min_length=1, max_length=MAX_NAME, description="A registered pipeline."
    )
    inputs: dict[str, Any] = Field(default_factory=dict, description="The execution's inputs.")


class Submitted(BaseModel):
    """The created execution."""

    id: str
    pipeline: str
    status: str


def summaries(rows: Sequence[ExecutionSummary]) -> list[dict[str, Any]]:
    """A listing as the API shows it (read without inputs: each carries no inputs, steps or
    data, so its size does not depend on what clients submitted)."""
    return [row.to_dict() for row in rows]


@router.post("/executions", status_code=201)
async def executions_submit(body: SubmitBody, service: Service) -> Submitted:
    """Start an execution of a registered pipeline."""
    known = service.pipelines
    pipeline = known.get(body.pipeline)
    if pipeline is None:
        raise HTTPException(
            404, f"unknown pipeline {body.pipeline!r} (known: {', '.join(sorted(known)) or 'none'})"
        )
    execution_id = await service.jobs.submit(
        pipeline, body.inputs, input_roots=service.settings.input_roots
    )
    return Submitted(id=execution_id, pipeline=pipeline.name, status="running")


@router.get("/executions")
async def executions_list(
    service: Service,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    status: Annotated[list[StatusName] | None, Query(max_length=16)] = None,
    pipeline: Annotated[PipelineName | None, Query()] = None,
) -> list[dict[str, Any]]:
    """Newest executions first, each with its completed and total step counts (without
    inputs, steps or data: ``GET /api/executions/{id}`` has them)."""
    return summaries(await service.jobs.list(status=status, pipeline=pipeline, limit=limit))


@router.get("/executions/{execution_id}")
@open_to_execution_tokens("path", "execution_id")
async def executions_show(
    execution_id: ExecutionId, service: Service, request: Request
) -> dict[str, Any]:
    """An execution (id or unique prefix) with its steps and data (to an execution token,
    :func:`~framepipe.server.access.shown_execution`)."""
    return shown_execution(request, service, (await service.jobs.get(execution_id)).to_dict())


@router.post("/executions/{execution_id}/retry", status_code=202)
async def executions_retry(execution_id: ExecutionId, service: Service) -> dict[str, Any]:
    """Resume a failed, cancelled or interrupted execution from where it stopped, as
    :meth:`JobClient.retry <framepipe.jobs.client.JobClient.retry>` does: embedded, the
    service runs it with the pipeline it serves under that name (409 when it serves none); on
    workers, the workers load it by the reference stored with it, whatever this service
    serves."""
    info = await service.jobs.get(execution_id, with_steps=False)
    full_id = await service.jobs.retry(info.id, service.pipelines.get(info.pipeline))
    return {"id": full_id, "status": "running"}


class CancelAnswer(BaseModel):
    """What a cancel did."""

    id: str = Field(description="The execution's full id.")
    status: Literal["cancelled", "cancelling"] = Field(
        description="``cancelled``: the execution is cancelled now (no step of it was "
        "running). ``cancelling``: its waiting steps will not start and its running steps "
        "were asked to stop; it shows ``cancelled`` once the last of them has ended."
    )


@router.post("/executions/{execution_id}/cancel", status_code=202)
async def executions_cancel(execution_id: ExecutionId, service: Service) -> CancelAnswer:
    """Cancel an execution (id or unique prefix), as :meth:`JobClient.cancel
    <framepipe.jobs.client.JobClient.cancel>` does: ``status`` says whether it is cancelled
    now (``cancelled``: nothing of it was running, e.g. interrupted or failed) or its running
    steps were asked to stop (``cancelling``: by the engine running it, or its workers).
    Completed or already cancelled: 409."""
    result = await service.jobs.cancel(execution_id)
    return CancelAnswer(
        id=result.execution_id, status="cancelled" if result.cancelled else "cancelling"
    )


class TokenBody(BaseModel):
    """``POST /api/executions/{id}/tokens`` (the body may be left out)."""

    model_config = ConfigDict(extra="forbid")
    expires_in: int = Field(
        DEFAULT_LIFETIME,
        ge=1,
        le=MAX_LIFETIME,
        description="Seconds the token is valid (default an hour, at most a week).",
    )


class ExecutionToken(BaseModel):
    """A token reading one execution, for a browser."""

    token: str = Field(
        description="Send it as ``Authorization: Bearer <token>`` (``/ws``: as the "
        "subprotocol ``framepipe.token.<base64url(token)>``)."
    )
    execution_id: str = Field(description="The execution's full id.")
    scope: Literal["read"] = Field(
        description="It reads the execution (``/api/executions/{id}``, ``/api/status/{id}``, "
        "``/api/events?execution_id=``, ``/ws?execution_id=``) and downloads its outputs "
        "(``GET /api/objects/{key}`` of the keys in its data under a folder named by its "
        "id, ``ml/<id>/...``); nothing else."
    )
    expires_at: int = Field(description="Unix seconds after which it is refused.")
    token_id: str = Field(
        description="Its id, which revokes it alone (``POST /api/executions/{id}/tokens/revoke``)"
        " and may be logged: it tells nothing of the token."
    )


@router.post("/executions/{execution_id}/tokens", status_code=201)
async def executions_token(
    execution_id: ExecutionId, service: Service, body: TokenBody | None = None
) -> ExecutionToken:
    """A signed, expiring, read-only token for one execution (id or unique prefix), for a
    browser that must watch that job and download its results without the API token. Made
    with the API token only (an execution token is refused here); a service without an API
    token answers 409 (every client reads everything already), and so does one whose API
    token is too short to sign (:func:`~framepipe.server.execution_tokens.signing_problem`).
    Changing the API token revokes every execution token made with it."""
    if not service.token:
        raise HTTPException(
            409, "the service has no API token, so it makes no execution tokens: set one first"
        )
    problem = execution_tokens.signing_problem(service.token)
    if problem is not None:
        raise HTTPException(409, f"the service makes no execution tokens: {problem}")
    info = await service.jobs.get(execution_id, with_steps=False)
    lifetime = body.expires_in if body is not None else DEFAULT_LIFETIME
    token = execution_tokens.mint(service.token, info.id, lifetime=lifetime)
    grant = execution_tokens.read(service.token, token)
    return ExecutionToken(
        token=token,
        execution_id=info.id,
        scope="read",
        expires_at=grant.expires_at,
        token_id=grant.token_id,
    )


class RevokeBody(BaseModel):
    """``POST /api/executions/{id}/tokens/revoke``: the token, or its id (one of them)."""

    model_config = ConfigDict(extra="forbid")
    token: str | None = Field(
        None, max_length=execution_tokens.MAX_LENGTH, description="The token to revoke."
    )
    token_id: str | None = Field(
        None,
        pattern=r"^[0-9a-f]{32}$",
        description="The ``token_id`` the service answered when it made the token.",
    )


class Revoked(BaseModel):
    """What ``POST /api/executions/{id}/tokens/revoke`` did."""

    execution_id: str
    token_id: str
    revoked: bool = Field(description="False when it was revoked already (nothing changed).")


@router.post("/executions/{execution_id}/tokens/revoke")
async def executions_token_revoke(
    execution_id: ExecutionId, service: Service, body: RevokeBody
) -> Revoked:
    """Revoke one execution token of an execution (id or unique prefix), given the token or
    its ``token_id``: from the answer on, every request with it is refused (401) and a live
    socket it opened is closed (1008); other tokens, and the API token, are untouched. Made
    with the API token only. A token the service did not sign, or one of another execution,
    is a 422; an expired one is revoked all the same (it is refused anyway)."""
    if (body.token is None) == (body.token_id is None):
        raise HTTPException(422, "give either the token or its token_id")
    info = await service.jobs.get(execution_id, with_steps=False)
    expires_at: int | None = None
    token_id = body.token_id
    if body.token is not None:
        token = body.token.strip()
        try:
            grant = execution_tokens.read(service.token or "", token, now=0)
        except InvalidInputError as exc:
            raise HTTPException(422, f"token: the execution token {exc.reason}") from None
        if grant.execution_id != info.id:
            raise HTTPException(
                422, f"token: it reads the execution {grant.execution_id}, not {info.id}"
            )
        token_id, expires_at = grant.token_id, grant.expires_at
    assert token_id is not None  # one of the two, checked above
    done = await revoke(service.store, info.id, token_id, expires_at)
    return Revoked(execution_id=info.id, token_id=token_id, revoked=done)
