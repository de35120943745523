"""Revoking one execution token (:mod:`framepipe.server.execution_tokens`) without changing
the API token: a leaked share link is killed alone.

Guarantees: a revocation is an event of the token's execution, type :data:`REVOKED`, data
``{"token_id": ..., "expires_at": ...}`` (:func:`~framepipe.server.execution_tokens.token_id`,
never the token), committed to the state store before the revoking request is answered, so
every service instance sharing that store refuses the token from then on (401, like an
expired one) on every route, and a live socket it opened ends (1008) when the event reaches
it. It lasts as long as the execution's events: when the execution is pruned, its tokens
read nothing anyway. Checking costs one indexed read of the execution's revocations per
request of an execution token; requests with the API token never read them.
"""

from __future__ import annotations

import asyncio
import time

from framepipe.backends.state import StateStore
from framepipe.backends.state.event_log import append_events
from framepipe.events import Event
from framepipe.jobs.records import events_data

__all__ = ["REVOKED", "is_revoked", "revoke", "revoked"]

REVOKED = "execution.token_revoked"
"""The type of the event recording that one execution token was revoked."""


def _revoked_ids(store: StateStore, execution_id: str) -> set[str]:
    return {
        str(data["token_id"])
        for data in events_data(store, execution_id, REVOKED)
        if "token_id" in data
    }


async def revoked(store: StateStore, execution_id: str) -> set[str]:
    """The ids of the revoked tokens of the execution ``execution_id`` (its full id)."""
    return await asyncio.to_thread(_revoked_ids, store, execution_id)


async def is_revoked(store: StateStore, execution_id: str, token_id: str) -> bool:
    """Whether the token ``token_id`` of the execution ``execution_id`` was revoked."""
    return token_id in await revoked(store, execution_id)


async def revoke(
    store: StateStore, execution_id: str, token_id: str, expires_at: int | None
) -> bool:
    """Record that the token ``token_id`` of ``execution_id`` is revoked (committed on
    return); False when it already was (nothing recorded)."""
    if await is_revoked(store, execution_id, token_id):
        return False
    event = Event(
        type=REVOKED,
        ts=time.time(),
        execution_id=execution_id,
        data={"token_id": token_id, "expires_at": expires_at},
    )
    await asyncio.to_thread(append_events, store, [event])
    return True
