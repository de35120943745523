"""Pruning executions that finished long ago (``framepipe jobs prune``, :mod:`framepipe.jobs.
pruning`): their records go (steps, dependencies, events), a running one never does, the
import ledger stays, and the command line also deletes each pruned execution's objects under
a prefix it is given. On SQLite and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from conftest import dependency_missing
from framepipe import JobEngine, Settings, open_object_store
from framepipe.backends.state import StateStore, events, ledger, objects_left, step_deps, steps
from framepipe.cli.commands import app
from framepipe.errors import ExecutionNotFoundError
from framepipe.jobs import dispatch
from framepipe.jobs.context import StepContext
from framepipe.jobs.models import ExecutionStatus
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.pruning import ObjectsAfter, delete_objects, prune_executions
from framepipe.jobs.records import get_execution
from framepipe.jobs.rounds import Outcome, Round
from framepipe.jobs.sync_client import SyncJobClient

LATER = 3600.0  # "now", as far as the prune is concerned, is an hour ahead


def _pipelines() -> tuple[Pipeline, Pipeline]:
    good = Pipeline("prune_good")

    @good.step()
    def first(ctx: StepContext) -> dict[str, Any]:
        ctx.ledger.record(f"file-{ctx.execution_id}", size=1)
        return {"a": 1}

    @good.step(depends_on=["first"])
    def second(ctx: StepContext) -> dict[str, Any]:
        return {"b": 2}

    bad = Pipeline("prune_bad")

    @bad.step()
    def boom(ctx: StepContext) -> None:
        raise RuntimeError("boom")

    return good, bad


def _run(settings: Settings, pipeline: Pipeline) -> str:
    async def main() -> str:
        async with JobEngine(settings=settings) as engine:
            info = await engine.run(pipeline, {}, raise_on_failure=False)
            return info.id

    return asyncio.run(main())


def _rows(store: StateStore, table: sa.Table, execution_id: str) -> int:
    with store.read() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count()).where(table.c.execution_id == execution_id)
            ).scalar_one()
        )


def _run_on_workers(store: StateStore, pipeline: Pipeline) -> str:
    """An execution run to completion the way workers run it (its dependencies are rows)."""
    execution_id, ready, _ = dispatch.submit(store, pipeline, {}, ref="/srv/prune.py:x")
    while ready:
        claimed, _ = dispatch.claim(store, "w1", ready, lease=30.0)
        outcomes = [
            Outcome(c.execution_id, c.key, c.attempt, "done", c.weight, c.progress, output={})
            for c in claimed
        ]
        ready = dispatch.commit_round(store, Round(outcomes=outcomes), worker="w1").ready
    return execution_id


def test_finished_executions_are_pruned_with_their_records_and_running_ones_never(
    settings: Settings, store: StateStore
) -> None:
    good, bad = _pipelines()
    done, failed = _run(settings, good), _run(settings, bad)
    distributed = _run_on_workers(store, good)
    running, _, _ = dispatch.submit(store, good, {}, ref="/srv/prune.py:prune_good")
    assert get_execution(store, done).status is ExecutionStatus.COMPLETED
    assert get_execution(store, failed).status is ExecutionStatus.FAILED
    assert get_execution(store, distributed).status is ExecutionStatus.COMPLETED
    assert _rows(store, step_deps, distributed) == 1
    later = time.time() + LATER

    assert prune_executions(store, 2 * LATER, now=later) == []  # none finished that long ago
    would = prune_executions(store, 60, now=later, dry_run=True)
    assert {p.id for p in would} == {done, failed, distributed}
    assert get_execution(store, done).status is ExecutionStatus.COMPLETED  # nothing deleted

    only_failed = prune_executions(store, 60, now=later, statuses={ExecutionStatus.FAILED})
    assert [(p.id, p.pipeline, p.status) for p in only_failed] == [
        (failed, "prune_bad", ExecutionStatus.FAILED)
    ]
    with pytest.raises(ExecutionNotFoundError):
        get_execution(store, failed)
    assert _rows(store, steps, failed) == _rows(store, events, failed) == 0

    assert prune_executions(store, 60, now=later, pipeline="other") == []
    assert [p.id for p in prune_executions(store, 60, now=later, batch=1)] == [done, distributed]
    for execution_id in (done, distributed):
        for table in (steps, step_deps, events):
            assert _rows(store, table, execution_id) == 0
    with store.read() as conn:  # the ledger outlives the execution that wrote it
        kept = conn.execute(sa.select(ledger.c.identity).where(ledger.c.namespace == "prune_good"))
        assert list(kept.scalars()) == [f"file-{done}"]
    assert get_execution(store, running).status is ExecutionStatus.RUNNING  # never pruned

    with pytest.raises(ValueError, match="running are never pruned"):
        prune_executions(store, 60, statuses={ExecutionStatus.RUNNING})
    with pytest.raises(ValueError, match="no status to prune"):
        prune_executions(store, 60, statuses=set())


def test_the_command_prunes_and_deletes_each_executions_objects(
    settings: Settings, tmp_path: Path
) -> None:
    good, bad = _pipelines()
    done, failed = _run(settings, good), _run(settings, bad)
    objects = open_object_store(settings.resolved_objects_url)
    for execution_id in (done, failed, "0" * 32):  # the last one is not an execution here
        objects.put(f"ml/{execution_id}/input.mp4", b"x")
        objects.put(f"ml/{execution_id}/frames/f_0001.png", b"y")
    runner = CliRunner()
    env = {"FRAMEPIPE_DATABASE_URL": settings.resolved_database_url}
    base = ["--home", str(settings.home), "jobs", "prune"]

    refused = runner.invoke(app, [*base, "--older-than", "0", "--objects", "ml/"], env=env)
    assert refused.exit_code == 2
    assert "does not hold {execution_id}" in refused.output
    for spec in ("ml/{execution_id:.0}", "ml/{execution_id!r}/"):
        sliced = runner.invoke(app, [*base, "--older-than", "0", "--objects", spec], env=env)
        assert sliced.exit_code == 2, sliced.output
        assert "takes no format or conversion" in sliced.output
    outside = runner.invoke(
        app, [*base, "--older-than", "0", "--objects", "../{execution_id}/"], env=env
    )
    assert outside.exit_code == 2, outside.output
    assert "--objects '../{execution_id}/'" in outside.output
    with StateStore(settings.resolved_database_url) as store:  # refused before pruning
        assert get_execution(store, failed).status is ExecutionStatus.FAILED
    bad_status = runner.invoke(app, [*base, "--older-than", "0", "-s", "running"], env=env)
    assert bad_status.exit_code == 2 and "never pruned" in bad_status.output

    time.sleep(0.05)  # both finished over 0 s ago
    result = runner.invoke(
        app,
        [*base, "--older-than", "0", "-s", "failed", "--objects", "ml/{execution_id}/", "--json"],
        env=env,
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert [e["id"] for e in answer["executions"]] == [failed]
    assert answer["objects_deleted"] == 2
    left = sorted(o.key.split("/")[1] for o in objects.list("ml/"))
    assert left == sorted([done, done, "0" * 32, "0" * 32])

    result = runner.invoke(app, [*base, "--older-than", "0s", "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    assert f"would delete {done}" in result.stdout
    assert "would delete 1 execution(s)" in result.stdout
    with SyncJobClient(settings=settings) as client:  # the same from Python
        assert [p.id for p in client.prune(0, dry_run=True)] == [done]
        assert [p.id for p in client.prune(0, pipeline="prune_good")] == [done]
        assert client.list() == []
    objects.close()


@contextlib.contextmanager
def deletes_refused(folder: Path) -> Iterator[None]:
    """Nothing in ``folder`` can be deleted, for real, until the block ends: its write
    permission is taken away, or for root (whom permission bits do not stop) it is made
    immutable (``chattr +i``; skips, or fails under CI, where that is not possible)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    try:
        made = subprocess.run(
            ["chattr", "+i", str(folder)], check=False, capture_output=True, text=True
        )
        refused = made.stderr.strip() if made.returncode else ""
    except OSError as exc:  # no chattr
        refused = str(exc)
    if refused:
        dependency_missing(f"running as root, and chattr +i is not possible here: {refused}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_objects_the_store_fails_to_delete_are_listed_and_the_command_exits_1(
    settings: Settings,
) -> None:
    """The object store fails to delete an object under one pruned execution's prefix (a
    folder nothing can be removed from): the command has deleted both executions' records
    first, then deletes the other execution's objects, names the prefix whose objects are
    left with the store's error (the first object it failed on), records it, and exits 1;
    the next prune deletes what was left."""
    good, bad = _pipelines()
    first, second = _run(settings, good), _run(settings, bad)
    objects = open_object_store(settings.resolved_objects_url)
    for execution_id in (first, second):
        objects.put(f"ml/{execution_id}/input.mp4", b"x")
        objects.put(f"ml/{execution_id}/frames/f_0001.png", b"y")
    root = Path(settings.resolved_objects_url.removeprefix("file://"))
    runner = CliRunner()
    env = {"FRAMEPIPE_DATABASE_URL": settings.resolved_database_url}
    base = ["--home", str(settings.home), "jobs", "prune", "--older-than", "0"]
    time.sleep(0.05)  # both finished over 0 s ago
    with deletes_refused(root / "ml" / second / "frames"):
        result = runner.invoke(app, [*base, "--objects", "ml/{execution_id}/", "--json"], env=env)
        assert result.exit_code == 1, result.output
        answer = json.loads(result.stdout)
        assert sorted(e["id"] for e in answer["executions"]) == sorted([first, second])
        [left] = answer["objects_left"]
        assert left["prefix"] == f"ml/{second}/"
        assert f"ml/{second}/frames/f_0001.png" in left["error"]
        assert f"objects left under ml/{second}/" in result.stderr
        with StateStore(settings.resolved_database_url) as store:  # the records went first
            for execution_id in (first, second):
                with pytest.raises(ExecutionNotFoundError):
                    get_execution(store, execution_id)
        kept = [o.key for o in objects.list("ml/")]
        assert f"ml/{second}/frames/f_0001.png" in kept
        assert not [key for key in kept if key.startswith(f"ml/{first}/")]
        assert answer["objects_deleted"] == 4 - len(kept)
        assert "the next `jobs prune --objects` tries them again" in result.stderr
        with StateStore(settings.resolved_database_url) as store:
            assert _left(store) == [(f"ml/{second}/", second, 1)]

    # A prune of another object store never deletes there what was left in this one.
    other = open_object_store(f"file://{settings.home / 'other'}")
    other.put(f"ml/{second}/frames/f_0001.png", b"theirs")
    elsewhere = runner.invoke(
        app,
        [*base, "--objects", "ml/{execution_id}/", "--json"],
        env={**env, "FRAMEPIPE_OBJECTS_URL": other.url},
    )
    assert elsewhere.exit_code == 0, elsewhere.output
    assert json.loads(elsewhere.stdout)["objects_deleted"] == 0
    assert [o.key for o in other.list("ml/")] == [f"ml/{second}/frames/f_0001.png"]
    other.close()

    # Nothing is given up: the next prune deletes what the first one left, with no
    # execution of its own to prune, and forgets the prefix.
    again = runner.invoke(app, [*base, "--objects", "ml/{execution_id}/", "--json"], env=env)
    assert again.exit_code == 0, again.output
    answer = json.loads(again.stdout)
    assert answer["executions"] == [] and answer["objects_left"] == []
    assert answer["objects_deleted"] == len(kept)
    assert list(objects.list("ml/")) == []
    with StateStore(settings.resolved_database_url) as store:
        assert _left(store) == []
    objects.close()


def test_a_prune_that_dies_after_the_records_went_leaves_their_objects_to_the_next(
    settings: Settings,
) -> None:
    """The records of a prune with objects went in a transaction that also recorded each
    execution's prefix; the process died before it deleted any object (here: it never got
    to :func:`delete_objects`). The next prune of that object store, with no execution of its
    own to prune, deletes them and forgets the prefixes."""
    good, _ = _pipelines()
    first, second = _run(settings, good), _run(settings, good)
    objects = open_object_store(settings.resolved_objects_url)
    for execution_id in (first, second):
        objects.put(f"ml/{execution_id}/out.mp4", b"x")
    time.sleep(0.05)
    with SyncJobClient(settings=settings) as client:
        pruned = client.prune(0, objects=ObjectsAfter(objects, "ml/{execution_id}/"))
        assert sorted(p.id for p in pruned) == sorted([first, second])
        assert sorted(_left(client.client.store)) == sorted(
            [(f"ml/{first}/", first, 0), (f"ml/{second}/", second, 0)]
        )
    assert len(list(objects.list("ml/"))) == 2  # the process died here

    env = {"FRAMEPIPE_DATABASE_URL": settings.resolved_database_url}
    base = ["--home", str(settings.home), "jobs", "prune", "--older-than", "0"]
    again = CliRunner().invoke(app, [*base, "--objects", "ml/{execution_id}/", "--json"], env=env)
    assert again.exit_code == 0, again.output
    answer = json.loads(again.stdout)
    assert answer["executions"] == [] and answer["objects_deleted"] == 2
    assert list(objects.list("ml/")) == []
    with StateStore(settings.resolved_database_url) as store:
        assert _left(store) == []
    objects.close()


def test_a_stopped_delete_leaves_what_it_did_not_reach_recorded(
    settings: Settings, store: StateStore
) -> None:
    """``stop`` (the service stopping) set while objects are deleted: it returns before the
    next batch (up to 1,000 objects, one S3 request), and every prefix it did not finish
    stays recorded for the next prune."""
    good, _ = _pipelines()
    ids = [_run(settings, good) for _ in range(3)]
    objects = open_object_store(settings.resolved_objects_url)
    sizes = dict(zip(ids, (3, 1003, 3), strict=True))  # the second takes two batches
    for execution_id, size in sizes.items():
        for n in range(size):
            objects.put(f"ml/{execution_id}/f{n:04d}.png", b"x")
    time.sleep(0.05)
    after = ObjectsAfter(objects, "ml/{execution_id}/")
    pruned = prune_executions(store, 0, objects=after)
    stop = threading.Event()
    big = f"ml/{ids[1]}/"

    class Stopping(type(objects)):  # type: ignore[misc]
        def _delete(self, key: str) -> bool:
            if key.startswith(big):  # the service stops while the big prefix is deleted
                stop.set()
            return bool(super()._delete(key))

    stopping = Stopping(objects.root)
    gone = delete_objects(stopping, "ml/{execution_id}/", pruned, store=store, stop=stop)
    left = {prefix for prefix, _, _ in _left(store)}
    remaining = [o.key for o in objects.list("ml/")]
    assert gone.deleted == 1009 - len(remaining)
    assert len([key for key in remaining if key.startswith(big)]) == 3  # its first batch went
    assert len(remaining) - 3 in (0, 3, 6)  # the small ones: deleted before, or not reached
    assert left == {key.rsplit("/", 1)[0] + "/" for key in remaining}
    assert big in left
    assert delete_objects(objects, "ml/{execution_id}/", [], store=store).deleted == len(remaining)
    assert _left(store) == []
    objects.close()


def _left(store: StateStore) -> list[tuple[str, str, int]]:
    """The prefixes a prune left: (prefix, execution id, tries)."""
    with store.read() as conn:
        rows = conn.execute(
            sa.select(objects_left.c.prefix, objects_left.c.execution_id, objects_left.c.tries)
        )
        return [tuple(row) for row in rows]


def test_a_retry_of_an_execution_pruned_meanwhile_says_so(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prune between a retry finding the execution and locking it: the retry says the
    execution was deleted (it failed with a bare AssertionError)."""
    good, _ = _pipelines()
    execution_id, ready, _ = dispatch.submit(store, good, {}, ref="/srv/prune.py:x")
    claimed, _ = dispatch.claim(store, "w1", ready, lease=30.0)
    failed = [
        Outcome(c.execution_id, c.key, c.attempt, "failed", c.weight, c.progress, error="boom")
        for c in claimed
    ]
    dispatch.commit_round(store, Round(outcomes=failed), worker="w1")
    assert get_execution(store, execution_id).status is ExecutionStatus.FAILED
    real_find = dispatch.find_execution

    def find_then_prune(store_: StateStore, ident: str) -> str:
        found = real_find(store_, ident)
        prune_executions(store_, 0, now=time.time() + 10)  # another process prunes it now
        return found

    monkeypatch.setattr(dispatch, "find_execution", find_then_prune)
    with pytest.raises(ExecutionNotFoundError, match=r"was deleted \(pruned\) meanwhile"):
        dispatch.resume(store, execution_id)


def test_a_stopped_prune_of_records_ends_after_its_batch(
    settings: Settings, store: StateStore
) -> None:
    """The service stopping while a long backlog is pruned: the batch under way is finished
    (a transaction of its own, its prefixes recorded) and no other is begun."""
    good, _ = _pipelines()
    ids = [_run(settings, good) for _ in range(3)]
    objects = open_object_store(settings.resolved_objects_url)
    time.sleep(0.05)
    stop = threading.Event()
    stop.set()
    after = ObjectsAfter(objects, "ml/{execution_id}/")
    first = prune_executions(store, 0, batch=1, objects=after, stop=stop)
    assert len(first) == 1 and [p for p, _, _ in _left(store)] == [f"ml/{first[0].id}/"]
    rest = prune_executions(store, 0, batch=1, objects=after)
    assert sorted(p.id for p in first + rest) == sorted(ids)
    objects.close()
