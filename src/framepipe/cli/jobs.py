"""``framepipe jobs list | show | retry | cancel | prune``: executions in the state store,
through the job client (ids may be unique prefixes); ``prune`` deletes those that finished long
ago (:mod:`framepipe.jobs.pruning`).

Guarantees: tables and ``--json`` go to stdout; an unknown status exits 2, an unknown id or an
execution that cannot be retried exits 1; ``retry`` follows the execution like ``run``.
``retry`` of an execution that runs on workers does not load its pipeline (the workers load it
from the reference stored with it); ``--pipeline`` loads one (of the execution's name, with every
step it has) and stores its reference with the execution, so the workers load it from then on.
"""

import contextlib
import json
from typing import Annotated

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from framepipe.cli.common import (
    ConcurrencyOpt,
    JsonOpt,
    OlderThanOpt,
    QuietOpt,
    UsageError,
    console,
    dump_json,
    duration,
    errors,
    first_line,
    older_than_seconds,
    print_table,
    say,
    settings_of,
    status_text,
    when,
)
from framepipe.cli.follow import follow_and_exit
from framepipe.jobs.client import JobClient, check_retryable
from framepipe.jobs.loading import resolve_pipeline
from framepipe.jobs.models import ExecutionStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.sync_client import SyncJobClient

__all__ = ["jobs_app"]

jobs_app = typer.Typer(no_args_is_help=True, help="Executions in the state store.")
"""The ``jobs`` command group."""


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    *,
    status: Annotated[
        list[str] | None, typer.Option("--status", "-s", help="Only this status (repeatable).")
    ] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", "-p", help="Only this pipeline.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List executions, newest first."""
    with errors():
        known = [s.value for s in ExecutionStatus]
        for value in status or []:
            if value not in known:
                raise UsageError(f"--status {value!r}: use one of {', '.join(known)}")
        settings = settings_of(ctx)
        with SyncJobClient(settings=settings) as client:
            rows = client.list(
                status=status or None, pipeline=pipeline, limit=limit, with_inputs=as_json
            )
    if as_json:
        dump_json([row.to_dict() for row in rows])
        return
    out = console()
    if not rows:
        say(out, "no executions", "dim")
        return
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    table.add_column("id", no_wrap=True)
    table.add_column("pipeline", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    table.add_column("progress", justify="right", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis", ratio=1)
    for row in rows:
        table.add_row(
            row.id[:12],
            row.pipeline,
            status_text(row.status.value),
            f"{row.progress:.0f}%",
            f"{row.steps_done}/{row.steps_total}",
            when(row.created_at, "%m-%d %H:%M:%S"),
            Text(first_line(row.error), style="red"),
        )
    print_table(out, table)


@jobs_app.command("show")
def jobs_show(
    ctx: typer.Context,
    *,
    execution_id: Annotated[str, typer.Argument(metavar="ID", help="Id or unique prefix.")],
    as_json: JsonOpt = False,
) -> None:
    """Show one execution with its steps."""
    with errors():
        settings = settings_of(ctx)
        with SyncJobClient(settings=settings) as client:
            info = client.get(execution_id)
    if as_json:
        dump_json(info.to_dict())
        return
    out = console()
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold", no_wrap=True)
    header.add_column(overflow="fold")
    took = info.finished_at - info.started_at if info.finished_at and info.started_at else None
    header.add_row("execution", info.id)
    header.add_row("pipeline", info.pipeline)
    header.add_row("ref", info.pipeline_ref or "-")
    header.add_row("status", status_text(info.status.value))
    header.add_row("progress", f"{info.progress:.1f}%")
    header.add_row("runs", str(info.runs))
    header.add_row("created", when(info.created_at))
    header.add_row("started", when(info.started_at))
    header.add_row("finished", when(info.finished_at))
    header.add_row("duration", duration(took))
    header.add_row("inputs", Text(json.dumps(info.inputs, default=str)))
    if info.error:
        header.add_row("error", Text(info.error, style="red"))
    out.print(header)
    table = Table(
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        title=f"steps ({len(info.steps)})",
        title_justify="left",
    )
    table.add_column("key", overflow="fold", min_width=8)
    table.add_column("status", no_wrap=True)
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("failures", justify="right", no_wrap=True)
    table.add_column("progress", justify="right", no_wrap=True)
    table.add_column("duration", justify="right", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis", ratio=1)
    for s in info.steps:
        step_took = s.finished_at - s.started_at if s.finished_at and s.started_at else None
        table.add_row(
            s.key,
            status_text(s.status.value),
            str(s.attempt),
            str(s.failures),
            f"{s.progress:.0f}%",
            duration(step_took),
            Text(first_line(s.error), style="red"),
        )
    print_table(out, table)
    say(out, f"data: {', '.join(info.data) if info.data else '(none)'}")


@jobs_app.command("retry")
def jobs_retry(
    ctx: typer.Context,
    *,
    execution_id: Annotated[str, typer.Argument(metavar="ID", help="Id or unique prefix.")],
    pipeline_ref: Annotated[
        str | None,
        typer.Option(
            "--pipeline",
            metavar="FILE.py:NAME",
            help="Load the pipeline from here instead of the reference stored with it; "
            "the reference is stored with the execution (workers load it from then on).",
        ),
    ] = None,
    concurrency: ConcurrencyOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Resume a failed, cancelled or interrupted execution; completed steps are not re-run.

    An execution that runs on workers is resumed there, and they load its pipeline from the
    reference stored with it: this command need not load it. --pipeline FILE.py:NAME (the code
    moved) is loaded and checked here (the execution's pipeline name, every step it has) and
    becomes the stored reference, on workers as embedded."""
    with errors():
        settings = settings_of(ctx)
        with SyncJobClient(settings=settings) as client:
            info = client.get(execution_id, with_steps=False)
            on_workers = _on_workers(client, info.id)
        check_retryable(info)
        pipeline: Pipeline | None = None
        ref: str | None = None
        if pipeline_ref or not on_workers:
            ref = pipeline_ref or info.pipeline_ref
            if not ref:
                raise UsageError(
                    f"execution {info.id[:12]} of pipeline '{info.pipeline}' has no stored "
                    "pipeline reference: pass --pipeline FILE.py:NAME"
                )
            loaded = resolve_pipeline(ref)
            pipeline, ref = loaded.pipeline, loaded.ref
        full_id = info.id

        async def begin(client: JobClient) -> str:
            return await client.retry(full_id, pipeline, ref=ref)

        follow_and_exit(
            settings,
            begin,
            label=pipeline.name if pipeline is not None else info.pipeline,
            quiet=quiet,
            as_json=as_json,
            concurrency=concurrency,
        )


def _on_workers(client: SyncJobClient, execution_id: str) -> bool:
    """True when the execution runs on workers, as its ``execution.started`` event records it
    (read through the job client, which shows the mode nowhere else; an event that does not
    say counts as embedded)."""
    for event in client.events(execution_id, limit=10):
        if event.type == "execution.started":
            return bool(event.data.get("mode") == "workers")
    return False


@jobs_app.command("cancel")
def jobs_cancel(
    ctx: typer.Context,
    *,
    execution_id: Annotated[str, typer.Argument(metavar="ID", help="Id or unique prefix.")],
) -> None:
    """Cancel an execution (at once, or through the process running it)."""
    with errors():
        settings = settings_of(ctx)
        with SyncJobClient(settings=settings) as client:
            result = client.cancel(execution_id)
    out = console()
    if result.cancelled:
        say(out, f"cancelled execution {result.execution_id}", "magenta")
    else:
        say(
            out,
            f"cancel requested: the process running execution "
            f"{result.execution_id} stops it within its heartbeat interval",
        )


@jobs_app.command("prune")
def jobs_prune(
    ctx: typer.Context,
    *,
    older_than: OlderThanOpt,
    status: Annotated[
        list[str] | None,
        typer.Option(
            "--status",
            "-s",
            help="Only executions in this status (repeatable): completed, failed, cancelled, "
            "interrupted. Default: all four.",
        ),
    ] = None,
    pipeline: Annotated[
        str | None, typer.Option("--pipeline", "-p", help="Only executions of this pipeline.")
    ] = None,
    objects: Annotated[
        str | None,
        typer.Option(
            "--objects",
            metavar="PREFIX",
            help="Also delete the objects under this prefix for each deleted execution; it "
            "must hold {execution_id} (e.g. 'ml/{execution_id}/'), may hold {pipeline}.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be deleted; delete nothing.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delete executions that finished longer ago than --older-than, with their steps and
    events (the import ledger stays); a running one never."""
    from framepipe.backends.objects import open_object_store
    from framepipe.config_checks import check_prune_objects
    from framepipe.jobs.pruning import (
        FINISHED,
        ObjectsAfter,
        PrunedObjects,
        check_objects_prefix,
        delete_objects,
    )

    with errors():
        seconds = older_than_seconds(older_than)
        statuses = set(FINISHED)
        if status:
            try:
                statuses = {ExecutionStatus(s.strip().lower()) for s in status}
            except ValueError:
                raise UsageError(
                    f"--status: {status!r}; use completed, failed, cancelled or interrupted"
                ) from None
            if not statuses <= FINISHED:
                raise UsageError("--status: pending and running executions are never pruned")
        if objects is not None:
            try:
                check_prune_objects(objects)
            except ValueError as exc:
                raise UsageError(f"--objects {exc}") from None
        settings = settings_of(ctx)
        with contextlib.ExitStack() as stack:
            store_objects = None
            if objects is not None:
                # opened and the prefix checked before any record goes, not after
                store_objects = stack.enter_context(
                    open_object_store(settings.resolved_objects_url)
                )
                try:
                    check_objects_prefix(store_objects, objects, pipeline)
                except ValueError as exc:
                    raise UsageError(f"--objects {exc}") from None
            after = (
                None
                if objects is None or store_objects is None
                else ObjectsAfter(store_objects, objects)
            )
            with SyncJobClient(settings=settings) as client:
                pruned = client.prune(
                    seconds, statuses=statuses, pipeline=pipeline, dry_run=dry_run, objects=after
                )
                gone = PrunedObjects(0, [])
                if objects is not None and store_objects is not None and not dry_run:
                    gone = delete_objects(store_objects, objects, pruned, store=client.client.store)
        removed = gone.deleted
        left = [(o.prefix, o.error) for o in gone.left]
    if json_out:
        dump_json(
            {
                "dry_run": dry_run,
                "executions": [
                    {
                        "id": p.id,
                        "pipeline": p.pipeline,
                        "status": p.status.value,
                        "finished_at": p.finished_at,
                    }
                    for p in pruned
                ],
                "objects_deleted": removed,
                "objects_left": [{"prefix": prefix, "error": why} for prefix, why in left],
            }
        )
    else:
        out = console()
        verb = "would delete" if dry_run else "deleted"
        for p in pruned:
            say(
                out,
                f"{verb} {p.id}  {p.pipeline}  {p.status.value}  finished {when(p.finished_at)}",
            )
        tail = f" and {removed} object(s)" if objects is not None and not dry_run else ""
        say(out, f"{verb} {len(pruned)} execution(s) that finished over {older_than} ago{tail}")
    if left:
        err = console(stderr=True)
        for prefix, why in left:
            say(err, f"objects left under {prefix}: {why}", "red")
        say(err, "the next `jobs prune --objects` tries them again", "red")
        raise typer.Exit(1)
