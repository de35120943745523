"""Declared inputs (``Pipeline(..., inputs=Model)``): validated at submit, before an execution
exists, in both modes; local paths confined to ``input_roots`` when the submitter gives them,
with refusals that do not tell what exists outside; the confinement still holding when the
step runs later (issue 14)."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from conftest import REDIS_URL, redis_namespace
from framepipe import ExecutionStatus, JobEngine, Settings, StepContext, open_object_store
from framepipe.errors import InvalidInputError, PathNotAllowedError, StepParamsError
from framepipe.jobs.inputs import LocalPathOrKey, copy_local_file, load_inputs, local_path
from framepipe.jobs.models import ExecutionInfo
from framepipe.jobs.pipeline import Pipeline
from framepipe.jobs.records import list_executions


class Inputs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    video: LocalPathOrKey
    count: int = Field(1, ge=1)


declared = Pipeline("declared", inputs=Inputs)


class Gate:
    """Holds ``read`` at its start while closed, until the test opens it."""

    def __init__(self) -> None:
        self.closed = False
        self.opened = threading.Event()


GATE = Gate()


@declared.step()
def read(ctx: StepContext) -> dict[str, Any]:
    """Reads its input as a declared pipeline's step should: a local path without following
    links (after an optional gate the test holds), else an object."""
    if GATE.closed:
        assert GATE.opened.wait(30)
    inputs = load_inputs(Inputs, ctx.inputs)
    path = local_path(inputs.video)
    if path is None:
        return {"text": ctx.objects.get(inputs.video).decode(), "count": inputs.count}
    return {
        "text": copy_local_file(path, ctx.tempdir() / path.name).read_text(),
        "count": inputs.count,
    }


seen = Pipeline("roots_seen")


@seen.step()
def look(ctx: StepContext) -> dict[str, Any]:
    """What a step is told of its execution's roots; fails while ``inputs.fail`` exists."""
    if os.path.exists(ctx.inputs["fail"]):
        raise RuntimeError("asked to fail")
    roots = ctx.input_roots
    return {"roots": None if roots is None else [str(r) for r in roots], "pid": os.getpid()}


def submit(
    settings: Settings, inputs: Mapping[str, Any], input_roots: Sequence[Path] | None = None
) -> ExecutionInfo:
    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(declared, inputs, input_roots=input_roots)
            return await engine.wait(execution_id, raise_on_failure=False)

    return asyncio.run(main())


def refused(
    settings: Settings, inputs: Mapping[str, Any], input_roots: Sequence[Path] | None = None
) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as caught:
        submit(settings, inputs, input_roots)
    return caught.value


def executions(settings: Settings) -> list[Any]:
    from framepipe.backends.state import StateStore

    with StateStore(settings.resolved_database_url) as store:
        return list_executions(store)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``root/`` (the allowed folder) with ``clip.txt`` and ``dir/clip.txt``, and beside it
    ``outside/secret.txt``."""
    (tmp_path / "root" / "dir").mkdir(parents=True)
    (tmp_path / "root" / "clip.txt").write_text("inside")
    (tmp_path / "root" / "dir" / "clip.txt").write_text("inside dir")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret.txt").write_text("SECRET")
    return tmp_path


# -- validation before an execution exists --------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "where"),
    [
        ({"video": "a/b.txt", "count": "abc"}, "inputs.count"),
        ({"video": "a/b.txt", "count": 0}, "inputs.count"),
        ({"video": 5}, "inputs.video"),
        ({}, "inputs.video"),
        ({"video": "a/b.txt", "cuont": 2}, "inputs.cuont"),
        ({"video": "../b.txt"}, "inputs.video"),
        ({"video": ""}, "inputs.video"),
    ],
)
def test_inputs_that_cannot_succeed_are_refused_at_submit_naming_the_field(
    settings: Settings, inputs: dict[str, Any], where: str
) -> None:
    error = refused(settings, inputs, input_roots=[])
    assert error.where == where, error
    assert str(error).startswith(f"{where}: ")
    assert executions(settings) == []  # nothing was created, so nothing is retried


def test_inputs_are_refused_before_the_workers_are_involved(
    settings: Settings, tmp_path: Path
) -> None:
    """The same check in the distributed mode: nothing stored, no broker contacted (this one
    does not exist)."""
    workers = settings.model_copy(
        update={"jobs_mode": "workers", "broker_url": "redis://127.0.0.1:9/0"}
    )
    error = refused(workers, {"video": "a.txt", "count": "abc"})
    assert error.where == "inputs.count"
    with pytest.raises(PathNotAllowedError):
        submit(workers, {"video": str(tmp_path / "x.txt")}, input_roots=[])
    assert executions(settings) == []


def test_the_validated_inputs_are_stored(settings: Settings) -> None:
    """Coerced, with the model's defaults, so the record says what the execution ran with."""
    objects = open_object_store(settings.resolved_objects_url)
    objects.put("uploads/a.txt", b"an object")
    info = submit(settings, {"video": "uploads/a.txt"}, input_roots=[])
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.inputs == {"video": "uploads/a.txt", "count": 1}
    assert info.data["text"] == "an object"
    info = submit(settings, {"video": "uploads/a.txt", "count": "3"}, input_roots=[])
    assert info.inputs["count"] == 3 and info.data["count"] == 3


def test_a_step_reads_inputs_stored_before_the_model_was_declared() -> None:
    """A retry of an older execution: unknown inputs are left out, strings coerced, and a
    value that cannot fit is named."""
    loaded = load_inputs(Inputs, {"video": "a.txt", "count": "2", "priority": "high"})
    assert (loaded.video, loaded.count) == ("a.txt", 2)
    with pytest.raises(InvalidInputError) as caught:
        load_inputs(Inputs, {"video": "a.txt", "count": "many"})
    assert caught.value.where == "inputs.count"


def test_a_pipeline_without_declared_inputs_gets_them_as_given(settings: Settings) -> None:
    plain = Pipeline("plain")

    @plain.step()
    def echo(ctx: StepContext) -> dict[str, Any]:
        return {"seen": dict(ctx.inputs)}

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            return await engine.run(plain, {"anything": "/etc/passwd"}, raise_on_failure=False)

    assert asyncio.run(main()).data["seen"] == {"anything": "/etc/passwd"}


def test_an_inputs_declaration_must_be_a_pydantic_model() -> None:
    with pytest.raises(StepParamsError, match="inputs"):
        Pipeline("bad", inputs=dict)  # type: ignore[arg-type]


# -- local paths and the roots --------------------------------------------------------------


def test_local_paths_are_refused_alike_outside_the_roots_whether_they_exist_or_not(
    settings: Settings, tree: Path
) -> None:
    root = tree / "root"
    (root / "link").symlink_to(tree / "outside")  # a link planted in the allowed folder
    (tree / "elsewhere").mkdir()
    exists = refused(settings, {"video": str(tree / "outside" / "secret.txt")}, [root])
    missing = refused(settings, {"video": str(tree / "elsewhere" / "secret.txt")}, [root])
    through_link = refused(settings, {"video": str(root / "link" / "secret.txt")}, [root])
    dotdot = refused(settings, {"video": f"{root}/../outside/secret.txt"}, [root])
    for error in (exists, missing, through_link, dotdot):
        assert isinstance(error, PathNotAllowedError)
        assert error.where == "inputs.video"
        assert str(error) == str(missing)
        assert str(tree) not in str(error)  # no server path in the message
    # no roots at all (the HTTP service's default): no local path, even one that exists
    none = refused(settings, {"video": str(root / "clip.txt")}, [])
    assert isinstance(none, PathNotAllowedError) and "FRAMEPIPE_INPUT_ROOTS" in str(none)
    assert executions(settings) == []


def test_a_path_inside_a_root_is_stored_resolved_and_read(settings: Settings, tree: Path) -> None:
    root = tree / "root"
    (root / "alias").symlink_to(root / "dir")  # a link that stays inside is fine
    info = submit(settings, {"video": str(root / "alias" / "clip.txt")}, [root])
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.inputs["video"] == os.path.realpath(root / "dir" / "clip.txt")
    assert info.data["text"] == "inside dir"


def test_relative_values_are_object_keys_when_the_submitter_confines(
    settings: Settings, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative value is never looked up on the server's disk (relative to its working
    folder) when ``input_roots`` is given: it names an object."""
    monkeypatch.chdir(tree / "outside")
    info = submit(settings, {"video": "secret.txt"}, [tree / "root"])
    assert info.status is ExecutionStatus.FAILED
    assert info.inputs["video"] == "secret.txt"
    assert "SECRET" not in str(info.data) and "secret.txt" in (info.error or "")


def test_without_roots_local_paths_are_unrestricted_as_on_the_command_line(
    settings: Settings, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree / "outside")
    info = submit(settings, {"video": "secret.txt"})  # relative to the working folder
    assert info.status is ExecutionStatus.COMPLETED, info.error
    assert info.inputs["video"] == os.path.realpath(tree / "outside" / "secret.txt")
    assert info.data["text"] == "SECRET"


def test_the_confinement_holds_when_the_step_runs_after_a_link_was_planted(
    settings: Settings, tree: Path
) -> None:
    """Between the submit (which confined the path) and the step, a folder on the path is
    replaced by a link out of the root: the step refuses to follow it."""
    root = tree / "root"

    async def main() -> ExecutionInfo:
        async with JobEngine(settings=settings) as engine:
            execution_id = await engine.submit(
                declared, {"video": str(root / "dir" / "clip.txt")}, input_roots=[root]
            )
            (root / "dir").rename(root / "was_dir")
            (root / "dir").symlink_to(tree / "outside")
            (tree / "outside" / "clip.txt").write_text("SECRET")
            GATE.opened.set()
            return await engine.wait(execution_id, raise_on_failure=False)

    GATE.closed = True
    try:
        info = asyncio.run(main())
    finally:
        GATE.closed, GATE.opened = False, threading.Event()
    assert info.status is ExecutionStatus.FAILED
    error = info.errors["read"]
    assert "symbolic link" in error and "SECRET" not in str(info.data), error


@pytest.mark.slow
def test_a_worker_in_another_process_reads_the_confined_path_and_nothing_else(
    tmp_path: Path, tree: Path, database_url: str
) -> None:
    """The roots do not travel to the worker, the resolved path does: submitted with roots
    while no worker runs, one execution's folder is then replaced by a link out of the root;
    a ``framepipe worker`` started afterwards reads the intact one and refuses the other."""
    from test_jobs_workers import Cluster

    root = tree / "root"
    with redis_namespace("fp-inputs-") as namespace:
        cluster = Cluster(tmp_path, database_url, REDIS_URL, namespace)
        try:

            async def submit_both() -> tuple[str, str]:
                async with JobEngine(settings=cluster.settings) as engine:
                    return (
                        await engine.submit(
                            declared, {"video": str(root / "clip.txt")}, input_roots=[root]
                        ),
                        await engine.submit(
                            declared, {"video": str(root / "dir" / "clip.txt")}, input_roots=[root]
                        ),
                    )

            intact, swapped = asyncio.run(submit_both())
            (root / "dir").rename(root / "was_dir")
            (root / "dir").symlink_to(tree / "outside")
            (tree / "outside" / "clip.txt").write_text("SECRET")
            cluster.wait_registered(cluster.worker())
            done, refused_ = cluster.wait(intact), cluster.wait(swapped)
        finally:
            cluster.close()
    assert done.status is ExecutionStatus.COMPLETED, done.error
    assert done.data["text"] == "inside"
    assert refused_.status is ExecutionStatus.FAILED
    assert "symbolic link" in refused_.errors["read"] and "SECRET" not in str(refused_.data)


# -- the roots travel with the execution ----------------------------------------------------


@pytest.mark.slow
def test_every_step_sees_the_roots_its_submit_recorded_and_a_retry_keeps_them(
    tmp_path: Path, tree: Path, database_url: str
) -> None:
    """``ctx.input_roots`` is what the submit recorded (resolved, without repeats; None:
    unrestricted; []: none), in this process and on a ``framepipe worker`` started later,
    which has no roots of its own; a retry (``resume`` on the workers) keeps them."""
    from test_jobs_workers import Cluster

    root = tree / "root"
    (tree / "alias").symlink_to(root, target_is_directory=True)
    flag = tmp_path / "fail"
    cases: list[tuple[list[Path] | None, list[str] | None]] = [
        (
            [tree / "alias", root, tree / "outside"],
            [os.path.realpath(root), os.path.realpath(tree / "outside")],
        ),
        (None, None),
        ([], []),
    ]

    async def run_all(settings: Settings, wait: Any = None) -> list[ExecutionInfo]:
        async with JobEngine(settings=settings) as engine:
            flag.touch()
            ids = [
                await engine.submit(seen, {"fail": str(flag)}, input_roots=given)
                for given, _ in cases
            ]
            for execution_id in ids:
                failed = (
                    wait(execution_id)
                    if wait
                    else await engine.wait(execution_id, raise_on_failure=False)
                )
                assert failed.status is ExecutionStatus.FAILED
            flag.unlink()
            for execution_id in ids:
                await engine.retry(execution_id, seen)
            if wait:
                return [wait(execution_id) for execution_id in ids]
            return [await engine.wait(execution_id) for execution_id in ids]

    embedded = asyncio.run(
        run_all(
            Settings(home=tmp_path / "home", database_url=database_url, retry_initial_delay=0.01)
        )
    )
    for info, (_, expected) in zip(embedded, cases, strict=True):
        assert info.data == {"roots": expected, "pid": os.getpid()}
    (tmp_path / "cluster").mkdir()
    with redis_namespace("fp-inputs-") as namespace:
        cluster = Cluster(tmp_path / "cluster", database_url, REDIS_URL, namespace)
        try:
            cluster.wait_registered(cluster.worker())
            on_workers = asyncio.run(run_all(cluster.settings, cluster.wait))
        finally:
            cluster.close()
    for info, (_, expected) in zip(on_workers, cases, strict=True):
        assert info.data["roots"] == expected and info.data["pid"] != os.getpid()
        assert info.runs == 2
