"""The job client (``framepipe.jobs.client``): every call the same in both modes, the embedded
engine and real ``framepipe worker`` processes, on SQLite and PostgreSQL; and the callers that
must go through it (the command line, the service, ``run_pipeline``, the examples) reach no
job records and write no SQL."""

from __future__ import annotations

import ast
import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

import worker_pipelines as wp
from framepipe import JobClient as TopLevelJobClient
from framepipe.config import Settings
from framepipe.errors import (
    ExecutionFailedError,
    ExecutionNotFoundError,
    ExecutionStateError,
    InvalidInputError,
    StateStoreError,
)
from framepipe.events import Event
from framepipe.jobs import EventPage, ExecutionSummary, JobClient, SyncJobClient
from framepipe.jobs.models import ExecutionStatus, StepStatus
from test_jobs_workers import Cluster, cluster_factory  # noqa: F401 - the fixture
from waiting import wait_until, wait_until_async

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Mode:
    """Where the executions of a test run: ``embedded`` (the client's engine) or ``workers``
    (a real ``framepipe worker`` process, whose settings the client shares)."""

    name: str
    settings: Settings
    dir: Path  # where the steps leave their files

    def client(self) -> JobClient:
        return JobClient(settings=self.settings)

    def run(self, work: Callable[[JobClient], Awaitable[T]]) -> T:
        """``work(client)`` on a fresh client, closed afterwards."""

        async def main() -> T:
            async with self.client() as client:
                assert client.mode == self.name
                return await work(client)

        return asyncio.run(main())

    def inputs(self, **more: Any) -> dict[str, Any]:
        return {"dir": str(self.dir), **more}

    def runs(self) -> collections.Counter[str]:
        path = self.dir / "runs.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return collections.Counter(line.split()[1] for line in lines)


@pytest.fixture(params=["embedded", pytest.param("workers", marks=pytest.mark.slow)])
def mode(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Mode:
    fast = {
        "heartbeat_interval": 0.2,
        "retry_initial_delay": 0.01,
        "retry_max_delay": 0.05,
        "shutdown_grace": 2.0,
    }
    if request.param == "embedded":
        steps = tmp_path / "steps"
        steps.mkdir()
        return Mode(
            "embedded", Settings(home=tmp_path / "home", database_url=database_url, **fast), steps
        )
    cluster: Cluster = request.getfixturevalue("cluster_factory")(database_url, **fast)
    cluster.wait_registered(cluster.worker())
    return Mode("workers", cluster.settings, cluster.dir)


# -- the calls, in both modes -------------------------------------------------------------------


def test_submit_wait_get_list_and_page_events(mode: Mode) -> None:
    async def work(client: JobClient) -> None:
        execution_id = await client.submit(wp.fanout, mode.inputs(n=3))
        info = await client.wait(execution_id[:8])
        assert info.id == execution_id
        assert info.status is ExecutionStatus.COMPLETED
        assert info.data["joined"] == 3
        assert len(info.steps) == 5

        got = await client.get(execution_id[:6])
        assert (got.id, got.status, got.data) == (execution_id, info.status, info.data)
        assert [s.key for s in got.steps] == [s.key for s in info.steps]
        bare = await client.get(execution_id, with_steps=False)
        assert bare.steps == [] and bare.data == {}
        assert bare.inputs == mode.inputs(n=3)

        listed = await client.list()
        assert [s.id for s in listed] == [execution_id]
        summary = listed[0]
        assert isinstance(summary, ExecutionSummary)
        assert (summary.status, summary.steps_done, summary.steps_total) == (
            ExecutionStatus.COMPLETED,
            5,
            5,
        )
        assert summary.inputs is None and "inputs" not in summary.to_dict()
        with_inputs = await client.list(with_inputs=True)
        assert with_inputs[0].to_dict()["inputs"] == mode.inputs(n=3)
        assert await client.list(status="completed", pipeline="wk_fanout") == listed
        assert await client.list(status=[ExecutionStatus.FAILED, "running"]) == []
        assert await client.list(pipeline="wk_chain") == []
        assert await client.list(status="no such status") == []

        everything = await client.events(execution_id, limit=1000)
        types = [e.type for e in everything]
        assert types[0] == "execution.created" and types[-1] == "execution.completed"
        assert types.count("step.completed") == 5
        paged: list[Event] = []
        after = 0
        while page := await client.events(execution_id, after=after, limit=3):
            assert isinstance(page, EventPage) and len(page) <= 3
            paged.extend(page)
            after = page.next
        assert paged == everything.events  # no event missed or repeated
        ids = [e.id for e in paged]
        assert ids == sorted(set(ids))
        empty = await client.events(execution_id, after=after)
        assert (empty.events, empty.next) == ([], after)
        assert empty.to_dict() == {"events": [], "next": after}
        assert (await client.events("0" * 32)).events == []
        assert (await client.events()).events[0].id == everything.events[0].id

    mode.run(work)


def test_an_id_or_prefix_in_upper_case_names_the_execution_on_every_backend(mode: Mode) -> None:
    """Ids are lower-case hex; one given in upper case (a prefix or the whole id) finds the
    execution on PostgreSQL as on SQLite, whose LIKE alone ignored case (found in review)."""

    async def work(client: JobClient) -> None:
        execution_id = await client.submit(wp.fanout, mode.inputs(n=1))
        upper = execution_id.upper()
        info = await client.wait(upper[:8])
        assert info.id == execution_id
        assert (await client.get(upper)).id == execution_id
        assert (await client.get(upper[:6], with_steps=False)).id == execution_id
        assert [e.id async for e in client.watch(upper[:10])] == [
            e.id for e in await client.events(execution_id, limit=1000)
        ]
        with pytest.raises(ExecutionStateError, match="already completed"):
            await client.cancel(upper[:8])
        with pytest.raises(ExecutionNotFoundError, match="no execution 'FEEDBEEF'"):
            await client.get("FEEDBEEF")

    mode.run(work)


def test_a_failure_raises_or_returns_and_retry_resumes_from_it(mode: Mode) -> None:
    """wk_chain fails at ``gated`` (its gate file is missing); the retry runs ``gated`` alone."""

    async def work(client: JobClient) -> None:
        execution_id = await client.submit(wp.chain, mode.inputs())
        with pytest.raises(ExecutionFailedError) as failed:
            await client.wait(execution_id)
        assert failed.value.status == "failed"
        assert list(failed.value.errors) == ["gated"]
        info = await client.wait(execution_id, raise_on_failure=False)
        assert info.status is ExecutionStatus.FAILED
        assert "step 'gated' failed after 1 attempt: FileNotFoundError" in (info.error or "")
        assert (await client.list(status="failed"))[0].steps_done == 3

        (mode.dir / "gate").touch()
        assert await client.retry(execution_id[:8], wp.chain) == execution_id
        info = await client.wait(execution_id)
        assert info.status is ExecutionStatus.COMPLETED
        assert info.runs == 2
        assert info.data == {"a": 1, "b": 2, "c": 3, "flaky_attempt": 3, "d": 4}
        assert mode.runs() == {"flaky": 3, "gated": 2}  # completed steps did not run again

        with pytest.raises(ExecutionStateError, match="has completed; nothing to retry"):
            await client.retry(execution_id, wp.chain)

    mode.run(work)


def test_cancel_from_the_submitter_and_from_another_client(mode: Mode) -> None:
    """The submitting client cancels one execution, a client that did not submit another; both
    end cancelled, and a second cancel is refused. Embedded, the other client can only ask the
    engine running it (through the store); on workers the store cancels it at once."""

    async def work(client: JobClient) -> None:
        first = await client.submit(wp.slow, mode.inputs(seconds=60))
        second = await client.submit(wp.slow, mode.inputs(seconds=60))

        async def both_running() -> bool:
            infos = [await client.get(i) for i in (first, second)]
            return all(i.steps[0].status is StepStatus.RUNNING for i in infos)

        await wait_until_async("both steps to run", both_running)
        mine = await client.cancel(first[:8])
        assert mine.execution_id == first
        async with mode.client() as other:
            theirs = await other.cancel(second)
            # A step runs: in both modes it is asked to stop, and the execution is cancelled
            # once it has ended.
            assert theirs.cancelled is False
            assert theirs.events == []
            assert theirs.execution_id == second
            # A client that does not run it follows it from the store.
            info = await other.wait(second, raise_on_failure=False, poll_interval=0.05)
            assert info.status is ExecutionStatus.CANCELLED
            assert info.steps[0].status is StepStatus.CANCELLED  # nothing runs any more
        info = await client.wait(first, raise_on_failure=False)
        assert info.status is ExecutionStatus.CANCELLED
        assert info.steps[0].status is StepStatus.CANCELLED
        with pytest.raises(ExecutionStateError, match="already cancelled"):
            await client.cancel(first)

    mode.run(work)


def test_watch_follows_an_execution_to_its_end(mode: Mode) -> None:
    async def work(client: JobClient) -> None:
        execution_id = await client.submit(wp.fanout, mode.inputs(n=4))
        seen = [e async for e in client.watch(execution_id[:8], poll_interval=0.02)]
        assert seen[-1].type == "execution.completed"
        assert all(e.execution_id == execution_id for e in seen)
        assert seen == (await client.events(execution_id, limit=1000)).events
        # A finished execution: its events, then the end; ``after`` skips what was seen.
        assert [e async for e in client.watch(execution_id, after=seen[2].id or 0)] == seen[3:]

    mode.run(work)


def test_refusals_come_from_the_error_tree_and_create_nothing(mode: Mode) -> None:
    async def work(client: JobClient) -> None:
        with pytest.raises(ExecutionNotFoundError, match="no execution 'feedbeef'"):
            await client.get("feedbeef")
        with pytest.raises(ExecutionNotFoundError, match="at least 4 characters"):
            await client.cancel("ab")
        with pytest.raises(ExecutionNotFoundError):
            await client.wait("feedbeef")
        with pytest.raises(ExecutionNotFoundError):
            await client.retry("feedbeef", wp.chain)
        with pytest.raises(InvalidInputError, match="inputs"):
            await client.submit(wp.fanout, {"dir": "\ud800"})
        with pytest.raises(InvalidInputError, match="limit"):
            await client.list(limit=0)
        with pytest.raises(InvalidInputError, match="after"):
            await client.events(after=-1)
        with pytest.raises(InvalidInputError, match="limit"):
            await client.events(limit=10_001)
        assert await client.list() == []
        assert (await client.events()).events == []

    mode.run(work)

    async def closed() -> None:
        client = mode.client()
        await client.close()
        with pytest.raises(ExecutionStateError, match="closed"):
            await client.list()
        with pytest.raises(ExecutionStateError, match="closed"):
            await client.submit(wp.fanout, mode.inputs(n=1))

    asyncio.run(closed())


def test_the_sync_client_runs_and_reads_the_same(mode: Mode) -> None:
    """The blocking facade: an embedded execution submitted through it runs between calls."""
    with SyncJobClient(settings=mode.settings) as client:
        assert client.mode == mode.name
        execution_id = client.submit(wp.fanout, mode.inputs(n=2))
        wait_until(
            "the execution to run between calls",
            lambda: client.get(execution_id, with_steps=False).status is ExecutionStatus.COMPLETED,
        )
        info = client.wait(execution_id[:8])
        assert info.data["joined"] == 2
        assert [(s.id, s.steps_done, s.steps_total) for s in client.list()] == [
            (execution_id, 4, 4)
        ]
        assert client.events(execution_id, limit=1).next == client.events(execution_id).events[0].id
        with pytest.raises(ExecutionStateError, match="already completed"):
            client.cancel(execution_id)
        ran = client.run(wp.chain, mode.inputs(), raise_on_failure=False)
        assert ran.status is ExecutionStatus.FAILED
        assert client.cancel(ran.id).cancelled  # not running: cancelled at once in the store
        assert client.get(ran.id).status is ExecutionStatus.CANCELLED
    with pytest.raises(ExecutionStateError, match="closed"):
        client.list()


# -- mode-independent details -------------------------------------------------------------------


def test_a_failing_database_is_a_state_store_error(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path)
    with SyncJobClient(settings=settings) as client:
        client.list()
        client.client.store.engine.dispose()
        (tmp_path / "state.db").unlink()
        (tmp_path / "state.db").mkdir()  # no database can be opened here any more
        with pytest.raises(StateStoreError, match="the state database failed") as refused:
            client.list()
        assert refused.value.__cause__ is not None


def test_a_wrapped_engine_is_left_to_its_owner(tmp_path: Path) -> None:
    from framepipe.jobs.engine import JobEngine

    async def main() -> None:
        async with JobEngine(settings=Settings(home=tmp_path)) as engine:
            with pytest.raises(TypeError):
                JobClient(engine=engine, concurrency=2)
            async with JobClient(engine=engine) as client:
                assert client.engine is engine and client.store is engine.store
                execution_id = await client.submit(wp.fanout, {"dir": str(tmp_path), "n": 1})
                assert execution_id in engine.active_executions
            info = await engine.wait(execution_id)  # the engine and its store are still open
            assert info.status is ExecutionStatus.COMPLETED

    asyncio.run(main())
    assert TopLevelJobClient is JobClient


# -- the callers go through the client ----------------------------------------------------------

_CALLERS = [
    *sorted((ROOT / "src/framepipe/cli").glob("*.py")),
    *(ROOT / "src/framepipe/server" / name for name in ("app.py", "state.py", "responses.py")),
    *sorted((ROOT / "src/framepipe/server/routes").glob("*.py")),
    ROOT / "src/framepipe/jobs/runner.py",
    *sorted((ROOT / "examples").rglob("*.py")),
]
_TABLES = {"executions", "steps", "events", "ledger", "step_deps", "workers"}
# The job records' modules (the store's reads, the engine's batched writes, its hold on an
# execution, cancelling, the monitoring counts), control and recovery: the client's to call.
_BEHIND_THE_CLIENT = {
    "framepipe.jobs.records",
    "framepipe.jobs.batches",
    "framepipe.jobs.ownership",
    "framepipe.jobs.cancel_requests",
    "framepipe.jobs.counts",
    "framepipe.jobs.control",
    "framepipe.jobs.recovery",
}


def test_the_callers_reach_no_job_records_and_write_no_sql() -> None:
    for path in _CALLERS:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                named = {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
                assert not named & _BEHIND_THE_CLIENT, (path, sorted(named & _BEHIND_THE_CLIENT))
                if node.module.startswith("framepipe.backends.state"):
                    tables = {a.name for a in node.names} & _TABLES
                    assert not tables, (path, tables)
            elif isinstance(node, ast.Attribute) and node.attr in (
                "select",
                "update",
                "insert",
                "delete",
                "text",
            ):
                base = node.value
                assert not (isinstance(base, ast.Name) and base.id == "sa"), (path, node.attr)
