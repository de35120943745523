"""``framepipe worker``: a process that runs the steps of distributed executions.

Guarantees: SIGTERM or Ctrl-C stops it gracefully (running steps get ``shutdown_grace``, the
rest are handed back) and it then exits 0 without waiting for step threads that outlived the
grace period.
"""

import asyncio
import os
import signal
from typing import Annotated

import typer

from framepipe.cli.common import ConcurrencyOpt, errors, flush_std, settings_of
from framepipe.jobs.loading import resolve_pipeline
from framepipe.tracing import setup_tracing

__all__ = ["worker"]


def worker(
    ctx: typer.Context,
    *,
    concurrency: ConcurrencyOpt = None,
    broker_url: Annotated[
        str | None,
        typer.Option(
            "--broker-url",
            help="URL of the job broker: redis://host:6379/0 or amqp://user:pass@host:5672/ "
            "(FRAMEPIPE_BROKER_URL).",
        ),
    ] = None,
    pipelines: Annotated[
        list[str] | None,
        typer.Option(
            "--pipeline",
            "-p",
            metavar="FILE.py:NAME",
            help="Load this pipeline up front (others load from each execution's stored "
            "reference). Repeatable.",
        ),
    ] = None,
) -> None:
    """Run the steps of distributed executions until SIGTERM or Ctrl-C: start any number, on
    any number of machines, with the same FRAMEPIPE_DATABASE_URL and FRAMEPIPE_BROKER_URL."""
    from framepipe.jobs.output_tail import OutputTail
    from framepipe.jobs.worker import Worker

    with errors():
        setup_tracing("framepipe-worker")
        settings = settings_of(ctx, broker_url=broker_url)
        tail = OutputTail().start()
        try:
            loaded = tuple(resolve_pipeline(ref).pipeline for ref in pipelines or [])
            engine = Worker(
                settings, concurrency=concurrency, pipelines=loaded, output_tail=tail.text
            )

            async def main() -> None:
                loop = asyncio.get_running_loop()
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, engine.request_stop)
                await engine.run()

            asyncio.run(main())
        finally:
            # The error line ``errors()`` prints, and the last log lines, must not be left in
            # the tail's pipe when the process exits.
            tail.stop()
    flush_std()
    # Steps handed back after the grace period may still run in their threads, which
    # cannot be stopped from outside; their results are discarded, so leave without them.
    os._exit(0)
