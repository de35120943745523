"""Synchronous conveniences over :class:`~framepipe.jobs.client.JobClient`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from framepipe.config import Settings
from framepipe.jobs.client import JobClient
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.pipeline import Pipeline

__all__ = ["run_pipeline"]


def run_pipeline(
    pipeline: Pipeline,
    inputs: Mapping[str, Any] | None = None,
    *,
    settings: Settings | None = None,
    raise_on_failure: bool = True,
) -> ExecutionInfo:
    """Run one execution of ``pipeline`` to its end on the configured store and return it,
    embedded or on workers as the settings say.

    Blocks; raises :class:`ExecutionFailedError` if it does not complete (unless
    ``raise_on_failure`` is false). Ctrl-C leaves an embedded execution ``interrupted``
    (resumable). Not for use inside a running event loop: there, use
    ``async with JobClient() as client: await client.run(...)``."""

    async def main() -> ExecutionInfo:
        async with JobClient(settings=settings) as client:
            return await client.run(pipeline, inputs, raise_on_failure=raise_on_failure)

    return asyncio.run(main())
