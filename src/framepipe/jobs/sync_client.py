"""The job client for code without an event loop (scripts, the command line)."""

from __future__ import annotations

import asyncio
import builtins
import os
import threading
from collections.abc import Collection, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

from framepipe.backends.objects import ObjectStore
from framepipe.backends.state import StateStore
from framepipe.config import Settings
from framepipe.errors import ExecutionStateError
from framepipe.jobs.client import JobClient
from framepipe.jobs.client_types import (
    CancelResult,
    EventPage,
    ExecutionSummary,
    Mode,
    StatusFilter,
)
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.pruning import FINISHED, ObjectsAfter, PrunedExecution

__all__ = ["SyncJobClient"]

T = TypeVar("T")


class SyncJobClient:
    """:class:`JobClient` for code without an event loop (scripts, the command line).

    The client runs on an event loop of its own in a daemon thread, so an embedded execution
    submitted here keeps running between calls, until :meth:`close` (which interrupts what
    is still running, resumable). Each call blocks until done; Ctrl-C in a call cancels it.
    Arguments, results and errors are those of :class:`JobClient`. Use it as a context
    manager; not from inside a running event loop's thread (that loop would stall)."""

    def __init__(
        self,
        store: StateStore | None = None,
        *,
        settings: Settings | None = None,
        objects: ObjectStore | None = None,
        concurrency: int | None = None,
        pipelines: Iterable[Pipeline] = (),
    ) -> None:
        self.client = JobClient(
            store, settings=settings, objects=objects, concurrency=concurrency, pipelines=pipelines
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="framepipe-job-client"
        )
        self._thread.start()
        self._closed = False

    @property
    def settings(self) -> Settings:
        return self.client.settings

    @property
    def mode(self) -> Mode:
        return self.client.mode

    def close(self) -> None:
        """Close the client (see :meth:`JobClient.close`) and end its thread. Idempotent."""
        if self._closed:
            return
        try:
            self._call(self.client.close())
            self._call(self._loop.shutdown_default_executor())
        finally:
            self._closed = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def __enter__(self) -> SyncJobClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register(self, pipeline: Pipeline) -> None:
        """:meth:`JobClient.register`."""
        self.client.register(pipeline)

    def submit(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any] | None = None,
        *,
        ref: str | None = None,
        input_roots: Iterable[str | os.PathLike[str]] | None = None,
    ) -> str:
        """:meth:`JobClient.submit`."""
        return self._call(self.client.submit(pipeline, inputs, ref=ref, input_roots=input_roots))

    def run(
        self,
        pipeline: Pipeline,
        inputs: Mapping[str, Any] | None = None,
        *,
        ref: str | None = None,
        input_roots: Iterable[str | os.PathLike[str]] | None = None,
        raise_on_failure: bool = True,
    ) -> ExecutionInfo:
        """:meth:`JobClient.run`."""
        return self._call(
            self.client.run(
                pipeline,
                inputs,
                ref=ref,
                input_roots=input_roots,
                raise_on_failure=raise_on_failure,
            )
        )

    def get(self, execution_id: str, *, with_steps: bool = True) -> ExecutionInfo:
        """:meth:`JobClient.get`."""
        return self._call(self.client.get(execution_id, with_steps=with_steps))

    def list(
        self,
        *,
        status: StatusFilter = None,
        pipeline: str | None = None,
        limit: int = 50,
        with_inputs: bool = False,
    ) -> builtins.list[ExecutionSummary]:
        """:meth:`JobClient.list`."""
        return self._call(
            self.client.list(status=status, pipeline=pipeline, limit=limit, with_inputs=with_inputs)
        )

    def wait(
        self,
        execution_id: str,
        *,
        raise_on_failure: bool = True,
        poll_interval: float | None = None,
    ) -> ExecutionInfo:
        """:meth:`JobClient.wait`."""
        return self._call(
            self.client.wait(
                execution_id, raise_on_failure=raise_on_failure, poll_interval=poll_interval
            )
        )

    def retry(
        self, execution_id: str, pipeline: Pipeline | None = None, *, ref: str | None = None
    ) -> str:
        """:meth:`JobClient.retry`."""
        return self._call(self.client.retry(execution_id, pipeline, ref=ref))

    def cancel(self, execution_id: str) -> CancelResult:
        """:meth:`JobClient.cancel`."""
        return self._call(self.client.cancel(execution_id))

    def prune(
        self,
        older_than: float,
        *,
        statuses: Collection[ExecutionStatus] = FINISHED,
        pipeline: str | None = None,
        dry_run: bool = False,
        objects: ObjectsAfter | None = None,
    ) -> builtins.list[PrunedExecution]:
        """:meth:`JobClient.prune`."""
        return self._call(
            self.client.prune(
                older_than, statuses=statuses, pipeline=pipeline, dry_run=dry_run, objects=objects
            )
        )

    def events(
        self, execution_id: str | None = None, *, after: int = 0, limit: int = 200
    ) -> EventPage:
        """:meth:`JobClient.events`."""
        return self._call(self.client.events(execution_id, after=after, limit=limit))

    def _call(self, call: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            call.close()
            raise ExecutionStateError("the job client is closed")
        future = asyncio.run_coroutine_threadsafe(call, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise
