"""Text a step hands the job records that no database can store as it is, a commit the store
refuses for its data, and the data a step is given: one suite, run in both modes (the embedded
engine and real ``framepipe worker`` processes) on both state backends (SQLite and
PostgreSQL), as :mod:`test_jobs_modes` runs them.

The pipelines are defined here; the workers import them from this module (the tests' folder
is on their PYTHONPATH)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from framepipe import Pipeline, StepContext
from framepipe.backends.state import StateStore
from framepipe.jobs.engine import JobEngine
from framepipe.jobs.ledger import Ledger, ledger_row
from framepipe.jobs.memory import JsonCopies
from framepipe.jobs.models import ExecutionInfo, ExecutionStatus, StepStatus
from framepipe.jobs.outcomes import check_output
from framepipe.jobs.records import get_execution
from framepipe.untrusted import storable_text
from test_jobs_modes import Mode
from test_jobs_workers import cluster_factory  # noqa: F401 - the fixture in_mode uses

LATIN1_NAME = os.fsdecode(b"caf\xe9.mp4")
"""A file name as ``os.listdir`` returns it from a card written in Latin-1: ``caf\\udce9.mp4``,
with a lone surrogate that no database can encode."""
ESCAPED_NAME = "caf\\udce9.mp4"
"""The same name as the records keep it."""

WITHIN = 60.0
"""Longer than any of these executions takes; an execution left running forever (the engine's
task or the worker died) fails the test instead of hanging it."""


@pytest.fixture(params=["embedded", pytest.param("workers", marks=pytest.mark.slow)])
def in_mode(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Mode:
    """The mode under test, as ``test_jobs_modes.run_in_mode`` gives it."""
    factory = request.getfixturevalue("cluster_factory") if request.param == "workers" else None
    return Mode(request.param, tmp_path, database_url, factory)


def session(mode: Mode, work: Any, **overrides: Any) -> Any:
    """``mode.session`` with every wait bounded by :data:`WITHIN`."""

    async def bounded(engine: JobEngine) -> Any:
        return await asyncio.wait_for(work(engine), WITHIN)

    return mode.session(bounded, **overrides)


def stored(mode: Mode, execution_id: str) -> ExecutionInfo:
    store = StateStore(mode.settings.resolved_database_url)
    try:
        return get_execution(store, execution_id)
    finally:
        store.close()


def workers_alive(mode: Mode) -> None:
    """In the workers mode, every worker process is still running."""
    cluster = mode._cluster
    if cluster is not None:
        exits = [p.poll() for p in cluster.procs]
        assert exits == [None] * len(exits), f"a worker exited: {exits}"


# -- text a step supplies -------------------------------------------------------------------

hostile = Pipeline("hj_hostile_text")


@hostile.step(retries=1)
def copy(ctx: StepContext) -> dict[str, Any]:
    ctx.progress(10, f"copying {LATIN1_NAME} \x00")
    time.sleep(0.3)  # the report is committed on its own, before the outcome
    ctx.ledger.record(f"card/{LATIN1_NAME}", content_hash=f"h\x00{LATIN1_NAME}")
    if ctx.attempt == 1 or ctx.inputs.get("fail"):
        raise RuntimeError(f"cannot copy {LATIN1_NAME}: atom FTYP\x00\x00")
    return {"copied": True}


@hostile.step()
def other(ctx: StepContext) -> dict[str, Any]:
    time.sleep(0.3)
    return {"other": True}


def test_text_no_database_can_store_is_stored_escaped(in_mode: Mode) -> None:
    """A lone surrogate (a Latin-1 file name from ``os.listdir``) and a NUL (bytes decoded as
    text) in a progress message, an error and a ledger identity are stored with ``\\udcXX``
    and ``\\x00`` in their place: the attempt's failure is recorded and retried, the
    execution completes, the ledger finds the identity by the text it was recorded with, and
    an execution that fails for good stores its error; the engine and the workers go on."""

    async def work(engine: JobEngine) -> tuple[ExecutionInfo, ExecutionInfo]:
        first = await engine.submit(hostile, in_mode.inputs())
        completed = await engine.wait(first, raise_on_failure=False)
        second = await engine.submit(hostile, in_mode.inputs(fail=True))
        return completed, await engine.wait(second, raise_on_failure=False)

    completed, failed = session(in_mode, work)
    assert completed.status is ExecutionStatus.COMPLETED, completed.error
    assert completed.data == {"copied": True, "other": True}
    assert completed.step("copy").attempt == 2
    events = in_mode.events(completed.id)
    messages = {e.data["message"] for e in events if e.type == "step.progress"}
    assert messages == {f"copying {ESCAPED_NAME} \\x00"}
    retrying = [e for e in events if e.type == "step.retrying"]
    assert [e.data["error"] for e in retrying] == [
        f"RuntimeError: cannot copy {ESCAPED_NAME}: atom FTYP\\x00\\x00"
    ]

    store = StateStore(in_mode.settings.resolved_database_url)
    try:
        ledger = Ledger(store, "hj_hostile_text")
        assert ledger.is_imported(f"card/{LATIN1_NAME}")
        assert ledger.is_imported(content_hash=f"h\x00{LATIN1_NAME}")
        assert ledger.filter_new([f"card/{LATIN1_NAME}", "card/new.mp4"]) == ["card/new.mp4"]
        entry = ledger.get(f"card/{LATIN1_NAME}")
        assert entry is not None
        assert entry.identity == f"card/{ESCAPED_NAME}"
        assert entry.content_hash == f"h\\x00{ESCAPED_NAME}"
    finally:
        store.close()

    assert failed.status is ExecutionStatus.FAILED
    assert failed.error is not None
    assert f"RuntimeError: cannot copy {ESCAPED_NAME}: atom FTYP\\x00\\x00" in failed.error
    failed_copy = failed.step("copy")
    assert failed_copy.status is StepStatus.FAILED
    assert failed_copy.error is not None
    assert failed_copy.error.startswith(f"RuntimeError: cannot copy {ESCAPED_NAME}")
    assert "Traceback" in failed_copy.error
    workers_alive(in_mode)


# -- a password in a step's error --------------------------------------------------------------

SECRET = "s3cr3t-pw"

leaky = Pipeline("hj_leaky_error")


@leaky.step(retries=1)
def connect(ctx: StepContext) -> dict[str, Any]:
    raise ConnectionError(f"could not connect to postgresql://app:{SECRET}@db.internal/prod")


def test_a_password_in_a_step_s_error_is_never_recorded(
    in_mode: Mode, logs: pytest.LogCaptureFixture
) -> None:
    """A step's exception names a database URL with its password (as drivers' messages do):
    the stored error, the step's, the events and the engine's log show it masked, in both
    modes; the rest of the message stays."""

    async def work(engine: JobEngine) -> ExecutionInfo:
        return await engine.wait(
            await engine.submit(leaky, in_mode.inputs()), raise_on_failure=False
        )

    failed = session(in_mode, work)
    assert failed.status is ExecutionStatus.FAILED
    step = failed.step("connect")
    assert step.error is not None and failed.error is not None
    assert "postgresql://app:***@db.internal/prod" in step.error
    events = in_mode.events(failed.id)
    recorded = [failed.error, step.error, *(json.dumps(e.data) for e in events), logs.text]
    assert all(SECRET not in text for text in recorded), [
        text for text in recorded if SECRET in text
    ]
    assert any("app:***@db.internal" in json.dumps(e.data) for e in events)


# -- a commit the store refuses ---------------------------------------------------------------

refused = Pipeline("hj_refused")


@refused.step()
def report(ctx: StepContext) -> dict[str, Any]:
    if ctx.inputs.get("bad"):
        # A field no check knows about (here a ledger row put together by hand, past
        # ledger_row): the store refuses the commit of the step's completion.
        ctx._ledger_rows.append(
            {
                "namespace": "hj_refused",
                "identity": f"card/{LATIN1_NAME}",
                "content_hash": None,
                "size": None,
                "meta": {},
                "execution_id": ctx.execution_id,
                "step_key": ctx.step_key,
                "imported_at": time.time(),
            }
        )
    else:
        time.sleep(0.2)  # running while the bad one's commit is refused
    return {"reported": True}


@refused.step()
def slow(ctx: StepContext) -> dict[str, Any]:
    time.sleep(0.4)
    return {"slow": True}


def test_a_commit_the_store_refuses_fails_that_execution_only(in_mode: Mode) -> None:
    """When the store refuses an execution's changes for their data (not a lost connection),
    that execution is failed with an error that says so, and nothing else is: an execution
    running beside it completes, the engine (or worker) stays up, and a later submit runs."""

    async def work(engine: JobEngine) -> tuple[ExecutionInfo, ExecutionInfo, ExecutionInfo]:
        bad = await engine.submit(refused, in_mode.inputs(bad=True))
        good = await engine.submit(refused, in_mode.inputs())
        bad_info = await engine.wait(bad, raise_on_failure=False)
        good_info = await engine.wait(good, raise_on_failure=False)
        later = await engine.submit(refused, in_mode.inputs())
        return bad_info, good_info, await engine.wait(later, raise_on_failure=False)

    bad, good, later = session(in_mode, work, concurrency=4)
    assert bad.status is ExecutionStatus.FAILED
    assert bad.error is not None
    assert "the state store refused" in bad.error
    assert "UnicodeEncodeError" in bad.error
    assert stored(in_mode, bad.id).status is ExecutionStatus.FAILED
    assert [e.type for e in in_mode.events(bad.id)][-1] == "execution.failed"
    assert good.status is ExecutionStatus.COMPLETED, good.error
    assert later.status is ExecutionStatus.COMPLETED, later.error
    workers_alive(in_mode)


# -- parameters of a spawned step -----------------------------------------------------------

spawner = Pipeline("hj_spawn_params")


@spawner.step()
def scan(ctx: StepContext) -> dict[str, Any]:
    path = {"latin1": LATIN1_NAME, "nul": "a\x00b.mp4"}[ctx.inputs["name"]]
    refused = ""
    try:
        ctx.spawn_step("convert", {"path": path})
    except Exception as exc:
        refused = f"{type(exc).__name__}: {exc}"
    ctx.spawn_step("convert", {"path": "ok.mp4"})
    return {"refused": refused}


@spawner.step()
def convert(ctx: StepContext, path: str) -> dict[str, Any]:
    return {"converted": path}


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("latin1", "params.path: is not valid Unicode: a lone surrogate \\udce9 at position 3"),
        ("nul", "params.path: holds a NUL character at position 1"),
    ],
)
def test_spawn_parameters_no_database_can_store_are_refused_by_name(
    in_mode: Mode, name: str, problem: str
) -> None:
    """A spawn whose parameters hold text no backend can store (a lone surrogate from
    ``os.listdir``, a NUL) is refused in the calling step with a StepParamsError naming the
    parameter and the problem, on every backend (SQLite would have stored what PostgreSQL
    refuses); the step can go on and spawn other instances, and the execution completes."""

    async def work(engine: JobEngine) -> ExecutionInfo:
        execution_id = await engine.submit(spawner, in_mode.inputs(name=name))
        return await engine.wait(execution_id, raise_on_failure=False)

    info = session(in_mode, work)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    refused = info.data["refused"]
    assert refused.startswith("StepParamsError: "), refused
    assert "spawn_step('convert')" in refused
    assert problem in refused, refused
    assert "JSON-serialisable" not in refused
    assert info.data["converted"] == "ok.mp4"
    workers_alive(in_mode)


# -- the data a step is given ---------------------------------------------------------------

shared = Pipeline("hj_data_copies")


@shared.step()
def produce(ctx: StepContext) -> dict[str, Any]:
    return {"frames": {1: "a.jpg", 2: "b.jpg"}, "size": (640, 480), "files": ["a.mp4", "b.mp4"]}


@shared.step(depends_on=["produce"])
def render(ctx: StepContext) -> dict[str, Any]:
    files = ctx.data["files"]
    files.append("render-tmp.mp4")  # a local tweak, meant to stay local
    frames = ctx.data["frames"]
    return {
        "frame_keys": sorted(frames),
        "by_int_key": frames.get(1),
        "size_type": type(ctx.data["size"]).__name__,
        "rendered": len(ctx.data["files"]),  # its own copy, with its own change
    }


@shared.step(depends_on=["produce"])
def upload(ctx: StepContext) -> dict[str, Any]:
    time.sleep(0.5)  # render has changed its list by now
    return {"uploaded": list(ctx.data["files"])}


def test_every_step_sees_its_own_json_copy_of_the_data(in_mode: Mode) -> None:
    """``ctx.data`` is what JSON gives back in both modes: string keys, lists for tuples,
    and a copy of its own for each step, so what one step changes in it no other step sees."""

    async def work(engine: JobEngine) -> ExecutionInfo:
        execution_id = await engine.submit(shared, in_mode.inputs())
        return await engine.wait(execution_id, raise_on_failure=False)

    info = session(in_mode, work)
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.data["frame_keys"] == ["1", "2"]
    assert info.data["by_int_key"] is None
    assert info.data["size_type"] == "list"
    assert info.data["rendered"] == 3
    assert info.data["uploaded"] == ["a.mp4", "b.mp4"]
    assert info.data["files"] == ["a.mp4", "b.mp4"]


# -- the rules themselves ---------------------------------------------------------------------


def test_the_engine_copies_only_the_values_a_step_reads_as_json_would() -> None:
    """The embedded engine's ``ctx.data`` gives each step a copy of each value it reads equal
    to a round trip through JSON, however deep, kept for the step's later reads and shared
    with no other step, nor with the engine's own data."""
    deep: Any = "leaf"
    for _ in range(600):  # deeper than a recursive copy goes: copied through JSON instead
        deep = [deep]
    output = check_output(
        {"deep": deep, "files": ["a.mp4"], "frames": {1: "a.jpg"}, "n": 1, "size": (640, 480)},
        pipeline="p",
        step_key="s",
        execution_id="x",
        limit=1 << 20,
    )
    snapshot = MappingProxyType(output)
    mine, sibling = JsonCopies(snapshot), JsonCopies(snapshot)
    assert dict(mine) == json.loads(json.dumps(output))
    assert mine["size"] == [640, 480] and list(mine["frames"]) == ["1"]
    mine["files"].append("tmp.mp4")
    mine["frames"]["2"] = "b.jpg"
    assert mine["files"] == ["a.mp4", "tmp.mp4"] and len(mine["frames"]) == 2
    assert sibling["files"] == ["a.mp4"] and sibling["frames"] == {"1": "a.jpg"}
    assert snapshot["files"] == ["a.mp4"] and snapshot["frames"] == {"1": "a.jpg"}
    assert mine["deep"] == deep and mine["deep"] is not snapshot["deep"]
    assert ("files" in mine, "nope" in mine, len(mine)) == (True, False, 5)
    with pytest.raises(KeyError):
        mine["nope"]


def test_only_what_no_database_can_store_is_escaped() -> None:
    plain = "copying café 🎞\n\ttab and \\ backslash"
    assert storable_text(plain) is plain
    assert storable_text(f"{LATIN1_NAME}\x00!") == f"{ESCAPED_NAME}\\x00!"
    assert storable_text("\ud83d\ude00") == "\\ud83d\\ude00"  # a pair split in two code points
    for text in (LATIN1_NAME, "\x00\x00", "a\udc80b\x00c"):
        escaped = storable_text(text)
        escaped.encode("utf-8")
        assert "\x00" not in escaped
        assert storable_text(escaped) == escaped


@pytest.mark.parametrize(
    ("fields", "error", "says"),
    [
        ({"identity": "x" * 501}, ValueError, "identity is 501 characters long; at most 500"),
        ({"namespace": "n" * 201}, ValueError, "namespace is 201 characters long; at most 200"),
        ({"content_hash": "h" * 129}, ValueError, "content_hash is 129 characters long"),
        ({"identity": 5}, TypeError, "identity must be a string, not int"),
        ({"size": -1}, ValueError, "size must be a whole number of bytes"),
        ({"size": 2**63}, ValueError, "size must be a whole number of bytes"),
        ({"meta": {"s": {1, 2}}}, TypeError, "not JSON serializable"),
    ],
)
def test_a_ledger_row_the_store_could_not_hold_is_refused_when_it_is_recorded(
    fields: dict[str, Any], error: type[Exception], says: str
) -> None:
    """Refused by the record (a StepParamsError in a step), not later by the commit, which
    would fail the step's completion with it."""
    row: dict[str, Any] = {
        "namespace": "ns",
        "identity": "card/a.mp4",
        "content_hash": None,
        "size": None,
        "meta": None,
        **fields,
    }
    namespace, identity = row.pop("namespace"), row.pop("identity")
    with pytest.raises(error, match=says):
        ledger_row(namespace, identity, execution_id=None, step_key=None, **row)
