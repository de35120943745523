"""Readable step keys: an instance whose parameter names a file is keyed
``name:<file name>-<hash>`` (``extract_metadata:video1.mp4-1bbef0a2ed31``), in both modes (the
embedded engine and real ``framepipe worker`` processes, through ``test_jobs_modes``'s
``run_in_mode``). The hash stays the identity: two files of one name in different folders are
two steps, and an execution stored before keys had labels (``name:<hash>``) resumes without
running its completed steps again. Workers import the pipelines below as ``test_step_keys``."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from framepipe import Pipeline, StepContext
from framepipe.backends.state import StateStore, step_deps, steps
from framepipe.jobs.keys import LABEL_MAX, former_step_key, key_label, step_key
from framepipe.jobs.models import ExecutionInfo
from test_jobs_modes import Mode
from test_jobs_workers import cluster_factory  # noqa: F401 - the fixture in_mode uses

# -- the rule ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "label"),
    [
        ({"path": "DCIM/100GOPRO/video1.mp4"}, "video1.mp4"),
        ({"path": "C:\\cards\\GOPRO1\\GX01.MP4"}, "GX01.MP4"),  # a Windows path
        ({"path": "folder/"}, "folder"),
        ({"file": "a b:c.mov"}, "a_b_c.mov"),  # space and ':' (the key's separator)
        ({"source_path": "x/\x07bell\x1b[31m\n.mp4"}, "_bell_31m_.mp4"),  # control chars
        ({"path": "Sprung Müller 日本.mp4"}, "Sprung_M_ller_.mp4"),  # ASCII only: stable
        ({"path": "../.."}, None),  # nothing readable: the key is name:hash
        ({"path": "..hidden"}, "hidden"),  # never a leading dot
        ({"path": "  "}, None),
        ({"i": 3, "booking": "B1"}, None),  # no parameter names a file
        ({"path": 5}, None),
        ({"booking_id": "B1", "path": "x.mp4", "passenger": "Anna"}, "x.mp4"),
    ],
)
def test_the_label_is_the_file_name_made_safe(params: dict[str, Any], label: str | None) -> None:
    assert key_label(params) == label
    key = step_key("extract_metadata", params)
    digest = key.rpartition("-" if label else ":")[2]
    assert re.fullmatch(r"[0-9a-f]{12}", digest)
    assert key == (f"extract_metadata:{label}-{digest}" if label else f"extract_metadata:{digest}")
    assert former_step_key("extract_metadata", params) == (
        f"extract_metadata:{digest}" if label else None
    )


def test_a_long_name_keeps_its_start_and_end_and_the_key_fits_the_database() -> None:
    name = "a" * 200  # the longest step name
    params = {"path": "DCIM/" + "Tandem_jump_over_the_lake_" * 20 + "GX000123.MP4"}
    key = step_key(name, params)
    label = key_label(params)
    assert label is not None and len(label) == LABEL_MAX
    assert label.startswith("Tandem_jump_over") and label.endswith("GX000123.MP4")
    assert "~" in label
    assert len(key) <= 300  # fp_steps.key is VARCHAR(300)


def test_the_hash_is_the_identity_and_does_not_depend_on_the_label() -> None:
    a = step_key("copy", {"path": "cardA/DCIM/video1.mp4"})
    b = step_key("copy", {"path": "cardB/DCIM/video1.mp4"})
    assert a != b and a.startswith("copy:video1.mp4-") and b.startswith("copy:video1.mp4-")
    # The hash is the one keys always had: a release before labels stored exactly this.
    import hashlib

    digest = hashlib.blake2b(b'{"path":"cardA/DCIM/video1.mp4"}', digest_size=6).hexdigest()
    assert a == f"copy:video1.mp4-{digest}"
    assert former_step_key("copy", {"path": "cardA/DCIM/video1.mp4"}) == f"copy:{digest}"
    assert (
        step_key("copy", {"n": 1})
        == "copy:" + hashlib.blake2b(b'{"n":1}', digest_size=6).hexdigest()
    )  # no file: unchanged


# -- pipelines the modes run (workers import this module) -----------------------------------


def _note(ctx: StepContext, what: str) -> None:
    with open(Path(ctx.inputs["dir"]) / "runs.log", "a") as fh:
        fh.write(f"{what}\n")


def _notes(mode: Mode) -> Counter[str]:
    log = mode.dir / "runs.log"
    return Counter(log.read_text().splitlines() if log.exists() else [])


files_pipeline = Pipeline("keys_files")


@files_pipeline.step("scan")
def files_scan(ctx: StepContext) -> dict[str, Any]:
    keys = [ctx.spawn_step("extract_metadata", {"path": p}) for p in ctx.inputs["files"]]
    return {"keys": keys}


@files_pipeline.step("extract_metadata")
def files_meta(ctx: StepContext, path: str) -> dict[str, Any]:
    return {f"meta/{path}": ctx.step_key}


bad_name = Pipeline("keys_bad_name")


@bad_name.step("scan")
def bad_scan(ctx: StepContext) -> None:
    # What os.listdir gives for a file name that is not UTF-8 (surrogateescape).
    ctx.spawn_step("extract_metadata", {"path": "DCIM/GX\udcff01.MP4"})


@bad_name.step("extract_metadata")
def bad_meta(ctx: StepContext, path: str) -> None: ...


resume = Pipeline("keys_resume")


@resume.step("plan")
def resume_plan(ctx: StepContext) -> None:
    for path in ctx.inputs["files"]:
        ctx.spawn_step("extract_metadata", {"path": path})


@resume.step("extract_metadata")
def resume_meta(ctx: StepContext, path: str) -> dict[str, Any]:
    _note(ctx, f"extract_metadata {path}")
    return {f"meta/{path}": True}


@resume.step("assign", depends_on=["plan", "extract_metadata"])
def resume_assign(ctx: StepContext) -> dict[str, Any]:
    """Spawns a render after each file's metadata (the key of that step is what spawning it
    again returns), then fails until the gate file exists."""
    for path in ctx.inputs["files"]:
        meta = ctx.spawn_step("extract_metadata", {"path": path})
        ctx.spawn_step("render", {"path": path}, depends_on=[meta])
    _note(ctx, "assign")
    if not (Path(ctx.inputs["dir"]) / "gate").exists():
        raise RuntimeError("gate closed")
    return {"assigned": len(ctx.inputs["files"])}


@resume.step("render")
def resume_render(ctx: StepContext, path: str) -> dict[str, Any]:
    _note(ctx, f"render {path}")
    return {f"render/{path}": True}


# -- in both modes ---------------------------------------------------------------------------


@pytest.fixture(params=["embedded", pytest.param("workers", marks=pytest.mark.slow)])
def in_mode(request: pytest.FixtureRequest, tmp_path: Path, database_url: str) -> Mode:
    """The mode under test, as ``test_jobs_modes.run_in_mode`` gives it."""
    factory = request.getfixturevalue("cluster_factory") if request.param == "workers" else None
    return Mode(request.param, tmp_path, database_url, factory)


HOSTILE = [
    "cardA/DCIM/video1.mp4",
    "cardB/DCIM/video1.mp4",  # the same name in another folder
    "cardA/DCIM/a\\b:c\x07\x1b[2J\t.mp4",
    "cardA/DCIM/" + "x" * 400 + ".mp4",
    "cardA/DCIM/Sprung Müller 日本.mp4",
    "cardA/..",
]


def test_steps_with_a_file_parameter_have_readable_safe_distinct_keys(in_mode: Mode) -> None:
    info, events = in_mode(files_pipeline, {"files": HOSTILE})
    assert info.status.value == "completed", info.error
    metas = {s.params["path"]: s.key for s in info.steps if s.name == "extract_metadata"}
    assert set(metas) == set(HOSTILE)
    assert len(set(metas.values())) == len(HOSTILE)  # nothing collides
    assert metas["cardA/DCIM/video1.mp4"].startswith("extract_metadata:video1.mp4-")
    assert metas["cardB/DCIM/video1.mp4"].startswith("extract_metadata:video1.mp4-")
    assert metas[HOSTILE[2]].startswith("extract_metadata:b_c_2J_.mp4-")  # \\ separates
    assert metas[HOSTILE[4]].startswith("extract_metadata:Sprung_M_ller_.mp4-")
    assert re.fullmatch(r"extract_metadata:[0-9a-f]{12}", metas["cardA/.."])
    for path, key in metas.items():
        assert key == step_key("extract_metadata", {"path": path})
        assert re.fullmatch(r"extract_metadata:([A-Za-z0-9_.~-]+-)?[0-9a-f]{12}", key), key
        assert len(key) <= len("extract_metadata:") + LABEL_MAX + 13
        assert info.data[f"meta/{path}"] == key  # the step saw its own key
    assert info.data["keys"] == [metas[p] for p in HOSTILE]
    spawned = {e.step_key for e in events if e.type == "step.spawned"}
    assert spawned == set(metas.values())  # events name the readable keys


def test_a_file_name_that_cannot_be_stored_fails_the_spawn_naming_it(in_mode: Mode) -> None:
    info, _ = in_mode(bad_name, {})
    assert info.status.value == "failed"
    error = info.error or ""
    assert "StepParamsError" in error
    assert "spawn_step('extract_metadata'): params.path: is not valid Unicode" in error
    assert [s.key for s in info.steps] == ["scan"]


def _to_former_keys(database_url: str, execution_id: str) -> dict[str, str]:
    """Rewrite a stopped execution's keys as a release before labels stored them
    (``name:<hash>``): every key, dependency list, spawner and dependency row."""
    store = StateStore(database_url)
    try:
        with store.write() as conn:
            rows = conn.execute(
                sa.select(steps.c.key, steps.c.name, steps.c.params).where(
                    steps.c.execution_id == execution_id
                )
            ).all()
            renamed = {
                r.key: former
                for r in rows
                if (former := former_step_key(r.name, r.params)) is not None
            }
            in_exec = steps.c.execution_id == execution_id
            for r in conn.execute(
                sa.select(steps.c.key, steps.c.depends_on, steps.c.spawned_by).where(in_exec)
            ).all():
                conn.execute(
                    steps.update()
                    .where(in_exec, steps.c.key == r.key)
                    .values(
                        key=renamed.get(r.key, r.key),
                        depends_on=[renamed.get(d, d) for d in r.depends_on],
                        spawned_by=renamed.get(r.spawned_by, r.spawned_by),
                    )
                )
            in_deps = step_deps.c.execution_id == execution_id
            for d in conn.execute(sa.select(step_deps).where(in_deps)).all():
                conn.execute(
                    step_deps.update()
                    .where(in_deps, step_deps.c.dep == d.dep, step_deps.c.step_key == d.step_key)
                    .values(
                        dep=renamed.get(d.dep, d.dep), step_key=renamed.get(d.step_key, d.step_key)
                    )
                )
    finally:
        store.close()
    return renamed


def test_an_execution_stored_with_former_keys_resumes_without_running_steps_again(
    in_mode: Mode,
) -> None:
    """An execution that failed under a release whose keys were ``name:<hash>`` is retried
    after the upgrade: its completed steps stay completed, a step that runs again and spawns
    the same instances gets their stored keys back (so the render it spawns waits for the
    stored metadata step), and no instance exists twice."""
    files = ["cardA/DCIM/video1.mp4", "cardB/DCIM/video1.mp4", "cardA/DCIM/video2.mp4"]
    failed, _ = in_mode(resume, {"files": files})
    assert failed.status.value == "failed"
    assert "gate closed" in (failed.error or "")
    first = _notes(in_mode)
    assert {k: v for k, v in first.items() if not k.startswith("render ")} == {
        "assign": 1,
        **{f"extract_metadata {f}": 1 for f in files},
    }  # a worker may have started a render spawned before the failure: it completes
    renamed = _to_former_keys(in_mode.settings.resolved_database_url, failed.id)
    assert len(renamed) >= len(files)  # the metadata steps, and the renders spawned so far

    (in_mode.dir / "gate").touch()
    done, _ = in_mode.retry(failed, resume)
    assert done.status.value == "completed", done.error
    assert _notes(in_mode) == {
        "assign": 2,
        **{f"extract_metadata {f}": 1 for f in files},  # not run again
        **{f"render {f}": 1 for f in files},
    }
    by_name = Counter(s.name for s in done.steps)
    assert by_name == {"plan": 1, "assign": 1, "extract_metadata": 3, "render": 3}
    keys = {s.key: s for s in done.steps}
    for f in files:
        meta = former_step_key("extract_metadata", {"path": f})
        assert meta in keys and keys[meta].status.value == "completed"
        render = next(s for s in done.steps if s.name == "render" and s.params["path"] == f)
        assert render.depends_on == [meta]
        assert render.key == former_step_key("render", {"path": f})
    _done_info_is_consistent(done)


def _done_info_is_consistent(info: ExecutionInfo) -> None:
    assert info.progress == 100.0
    assert all(s.status.value == "completed" for s in info.steps)
