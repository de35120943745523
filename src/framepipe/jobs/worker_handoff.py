"""Handing executions to the workers: the submitter's side of the distributed mode.

:class:`WorkerHandoff` is what :class:`~framepipe.jobs.engine.JobEngine` uses when the
settings send executions to ``framepipe worker`` processes (``FRAMEPIPE_BROKER_URL`` /
``jobs_mode``). Guarantees:

* an execution is created or resumed in the store (:func:`framepipe.jobs.dispatch.submit`,
  :func:`~framepipe.jobs.dispatch.resume`) and its committed events are published on the
  engine's bus before its ready steps are handed to the broker;
* a pipeline with no reference is refused before anything is stored
  (:class:`PipelineDefinitionError`): the workers load a pipeline by reference;
* a broker that is down does not fail the call: the steps stay ready in the store and the
  workers' sweep publishes them; the outage is logged once when it begins and once when it
  ends, however many publishes fail between;
* the broker connection is opened at the first publish, and :meth:`WorkerHandoff.close`
  closes it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Protocol

from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.errors import FramepipeError, PipelineDefinitionError
from framepipe.events import EventBus
from framepipe.jobs import dispatch
from framepipe.jobs.database_thread import InDatabase
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.rounds import Delivery
from framepipe.logs import get_logger
from framepipe.outage import Outage

if TYPE_CHECKING:
    from framepipe.jobs.delivery import StepDelivery

__all__ = ["HandoffOwner", "WorkerHandoff", "require_ref"]

_log = get_logger("jobs.engine")


def require_ref(pipeline: Pipeline, ref: str | None) -> None:
    """:class:`PipelineDefinitionError` unless ``ref`` names where the workers load
    ``pipeline`` from."""
    if not ref:
        raise PipelineDefinitionError(
            "workers load a pipeline by reference, and this one has none (defined "
            "interactively?): define it in a module or file",
            pipeline=pipeline.name,
        )


class HandoffOwner(Protocol):
    """What the hand-off reads of its engine, at each call (never a copy: an engine given
    another bus or settings hands off with them)."""

    store: StateStore
    settings: Settings
    bus: EventBus


class WorkerHandoff:
    """Creates and resumes executions on the workers and publishes their ready steps, with
    its ``owner``'s store, settings and bus as they are at each call.

    Every store call runs through ``in_db`` (the engine's database thread)."""

    def __init__(self, owner: HandoffOwner, *, in_db: InDatabase) -> None:
        self._owner = owner
        self._in_db = in_db
        self._broker: StepDelivery | None = None
        self._opened: tuple[str, str] | None = None  # the broker's URL and namespace
        self._publishing = Outage()  # of the broker, as publishing finds it

    async def submit(
        self,
        pipeline: Pipeline,
        inputs: dict[str, Any],
        ref: str | None,
        input_roots: list[str] | None,
        traceparent: str | None,
    ) -> str:
        """Store a new execution of ``pipeline`` for the workers (its checked ``inputs``, the
        recorded ``input_roots`` and ``traceparent``) and publish its initial steps; return
        its id."""
        require_ref(pipeline, ref)
        execution_id, ready, events = await self._in_db(
            functools.partial(
                dispatch.submit,
                self._owner.store,
                pipeline,
                inputs,
                ref=ref,
                input_roots=input_roots,
                traceparent=traceparent,
            )
        )
        self._owner.bus.publish(events)
        await self.publish(ready)
        _log.info(
            "[%s/%s] execution submitted to the workers (%d step(s) ready)",
            pipeline.name,
            execution_id[:8],
            len(ready),
        )
        return execution_id

    async def resume(
        self, execution_id: str, pipeline_name: str, pipeline: Pipeline | None, ref: str | None
    ) -> str:
        """Resume the execution on the workers (``ref``, when given, stored as its pipeline's
        reference in the same transaction) and publish its ready steps; return its full id.
        A ``pipeline`` given without a reference is refused first."""
        if pipeline is not None:
            require_ref(pipeline, ref)
        full_id, ready, events = await self._in_db(
            functools.partial(dispatch.resume, self._owner.store, execution_id, ref=ref)
        )
        self._owner.bus.publish(events)
        await self.publish(ready)
        _log.info(
            "[%s/%s] execution resumed on the workers (%d step(s) ready)",
            pipeline_name,
            full_id[:8],
            len(ready),
        )
        return full_id

    async def publish(self, ready: list[Delivery]) -> None:
        """Hand ready steps to the broker (Redis or RabbitMQ, from ``broker_url``); returns once
        it holds them. If it is down, the workers' sweep publishes them later."""
        if not ready:
            return
        settings = self._owner.settings
        where = (settings.broker_url, settings.broker_namespace)
        if self._broker is None or self._opened != where:  # the owner's settings changed
            from framepipe.jobs.delivery import open_delivery

            self.close()
            self._broker, self._opened = open_delivery(*where), where
        try:
            await self._in_db(self._broker.publish, ready)
        except FramepipeError as exc:
            if self._publishing.failed(exc):
                _log.warning(
                    "%s; the steps stay ready in the store and the workers publish them again "
                    "(said once until the broker takes steps again)",
                    exc,
                )
            else:
                _log.debug("publishing %d step(s) failed again: %s", len(ready), exc)
            return
        lasted = self._publishing.answered()
        if lasted is not None:
            _log.info("the job broker takes steps again after %.0f s", lasted)

    def close(self) -> None:
        """Close the broker connection, if one was opened."""
        if self._broker is not None:
            self._broker.close()
            self._broker = None
