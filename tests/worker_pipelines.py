"""Pipelines the distributed-worker tests submit; workers import them as ``worker_pipelines``
(the tests put this folder on the workers' PYTHONPATH). Side effects go to files under
``ctx.inputs["dir"]`` so the tests can see what ran where."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from framepipe import Pipeline, StepContext
from framepipe.backends.objects import ObjectStore
from framepipe.errors import ConfigError, InvalidInputError, ObjectNotFoundError


def _log(ctx: StepContext, what: str) -> None:
    with open(Path(ctx.inputs["dir"]) / "runs.log", "a") as fh:
        fh.write(f"{what} {ctx.step_key} {ctx.attempt} {os.getpid()}\n")


fanout = Pipeline("wk_fanout")


@fanout.step()
def start(ctx: StepContext) -> dict[str, Any]:
    n = int(ctx.inputs["n"])
    for i in range(n):
        ctx.spawn_step("work", params={"i": i})
    return {"spawned": n}


@fanout.step()
def work(ctx: StepContext, i: int) -> dict[str, Any]:
    pause = float(ctx.inputs.get("sleep", 0))
    if pause:
        _log(ctx, "start")
        time.sleep(pause)
        _log(ctx, "end")
    return {f"w{i}": os.getpid()}


@fanout.step(depends_on=["work"])
def join(ctx: StepContext) -> dict[str, Any]:
    return {"joined": sum(1 for k in ctx.data if k.startswith("w"))}


chain = Pipeline("wk_chain")


@chain.step()
def first(ctx: StepContext) -> dict[str, Any]:
    ctx.progress(50, "halfway")
    time.sleep(0.3)  # a progress report is committed on its own, not only with the outcome
    return {"a": 1}


@chain.step(depends_on=["first"])
def second(ctx: StepContext) -> dict[str, Any]:
    return {"b": ctx.data["a"] + 1}


@chain.step(depends_on=["second"], retries=2, retry_delay=0.05)
def flaky(ctx: StepContext) -> dict[str, Any]:
    _log(ctx, "flaky")
    if ctx.attempt < 3:
        raise RuntimeError(f"flaky failure on attempt {ctx.attempt}")
    return {"c": ctx.data["b"] + 1, "flaky_attempt": ctx.attempt}


@chain.step(depends_on=["flaky"])
def gated(ctx: StepContext) -> dict[str, Any]:
    _log(ctx, "gated")
    gate = Path(ctx.inputs["dir"]) / "gate"
    if not gate.exists():
        raise FileNotFoundError(f"gate file {gate} is missing")
    return {"d": ctx.data["c"] + 1}


crasher = Pipeline("wk_crasher")


@crasher.step()
def fine(ctx: StepContext) -> dict[str, Any]:
    return {"fine": True}


@crasher.step(depends_on=["fine"])
def crash(ctx: StepContext) -> dict[str, Any]:
    print(f"crash step: about to take the worker down (attempt {ctx.attempt})", flush=True)
    time.sleep(float(ctx.inputs.get("before_crash", 1.5)))
    sys.stdout.flush()
    os._exit(3)


slow = Pipeline("wk_slow")


@slow.step()
def long(ctx: StepContext) -> dict[str, Any]:
    _log(ctx, "start")
    deadline = time.monotonic() + float(ctx.inputs["seconds"])
    while time.monotonic() < deadline:
        ctx.check_cancelled()
        time.sleep(0.05)
    _log(ctx, "end")
    return {"long_done_by": os.getpid(), "long_attempt": ctx.attempt}


mixed = Pipeline("wk_mixed")


@mixed.step()
def begin(ctx: StepContext) -> dict[str, Any]:
    for i in range(8):
        ctx.spawn_step("quick", params={"i": i})
    return {}


@mixed.step()
def quick(ctx: StepContext, i: int) -> dict[str, Any]:
    return {}


@mixed.step(depends_on=["quick"])
def then_long(ctx: StepContext) -> dict[str, Any]:
    for i in range(4):
        ctx.spawn_step("slow_part", params={"i": i})
    return {}


@mixed.step()
def slow_part(ctx: StepContext, i: int) -> dict[str, Any]:
    time.sleep(1.0)
    return {f"part{i}": os.getpid()}


patient = Pipeline("wk_patient")


@patient.step(retries=1, retry_delay=120)
def stubborn(ctx: StepContext) -> dict[str, Any]:
    """Fails every time; asks for two minutes between attempts, which the operator's cap
    (the setting retry_max_delay) shortens."""
    raise RuntimeError(f"attempt {ctx.attempt} failed")


footgun = Pipeline("wk_footgun")


@footgun.step()
def split(ctx: StepContext) -> dict[str, Any]:
    keys = [ctx.spawn_step("piece", {"i": i}) for i in range(2)]
    mode = ctx.inputs["mode"]
    if mode == "initial":  # join takes no parameters: it already exists and already ran
        ctx.spawn_step("join", depends_on=keys)
    elif mode == "differs":
        ctx.spawn_step("piece", {"i": 0}, depends_on=[keys[1]])
    elif mode == "again":  # the same instance again, without dependencies: just its key
        assert ctx.spawn_step("piece", {"i": 0}) == keys[0]
    return {"split": True}


@footgun.step()
def piece(ctx: StepContext, i: int) -> dict[str, Any]:
    return {f"p{i}": True}


def _footgun_join(ctx: StepContext) -> dict[str, Any]:
    return {"joined": True}


footgun.add_step(_footgun_join, name="join")


@footgun.step(depends_on=["split"])
def later(ctx: StepContext) -> dict[str, Any]:
    """Spawns an instance another step made, with other dependencies (a lookup in the store
    on workers, in memory embedded)."""
    if ctx.inputs["mode"] == "differs_later":
        ctx.spawn_step("piece", {"i": 0}, depends_on=["join"])
    return {}


dag = Pipeline("wk_dag")


@dag.step()
def root(ctx: StepContext) -> dict[str, Any]:
    """Spawns node i waiting for the nodes listed in inputs["deps"][i] (by key)."""
    keys: dict[int, str] = {}
    for i, deps in enumerate(ctx.inputs["deps"]):
        keys[i] = ctx.spawn_step("node", {"i": i}, depends_on=[keys[d] for d in deps])
    return {"nodes": len(keys)}


@dag.step()
def node(ctx: StepContext, i: int) -> dict[str, Any]:
    time.sleep(0.0005 * (i % 3))
    return {f"n{i}": i}


@dag.step(depends_on=["node"])
def gather(ctx: StepContext) -> dict[str, Any]:
    """Waits for every node, including ones spawned after it was created (a name dependency)."""
    missing = [i for i in range(len(ctx.inputs["deps"])) if f"n{i}" not in ctx.data]
    if missing:
        raise AssertionError(f"gather ran before nodes {missing}")
    return {"gathered": True}


dag_bare = Pipeline("wk_dag_bare")  # wk_dag without gather: no step waits by name
dag_bare.add_step(root, name="root")
dag_bare.add_step(node, name="node")


bloated = Pipeline("wk_bloated")


@bloated.step(retries=2)
def big(ctx: StepContext) -> dict[str, Any]:
    return {"blob": "x" * int(ctx.inputs["size"])}


misconfigured = Pipeline("wk_misconfigured")


@misconfigured.step(retries=2, retry_delay=0.05)
def load_model(ctx: StepContext) -> dict[str, Any]:
    raise ConfigError("MODEL_PATH is not set: the model to load (environment)")


def _note(ctx: StepContext, log: str, line: str) -> None:
    """Append ``line`` to ``log`` in the shared folder (one write: whole lines, any process)."""
    with open(Path(ctx.inputs["dir"]) / log, "a") as fh:
        fh.write(f"{line}\n")


def notes(folder: Path, log: str) -> list[str]:
    """The lines :func:`_note` appended to ``log``."""
    path = folder / log
    return path.read_text().splitlines() if path.exists() else []


dupes = Pipeline("wk_dupes")


@dupes.step("start")
def dupes_start(ctx: StepContext) -> dict[str, Any]:
    keys = {ctx.spawn_step("work", {"n": 1}) for _ in range(3)}
    keys.add(ctx.spawn_step("work", params={"n": 1}))
    assert ctx.spawn_step("start") == "start"  # parameterless: its one instance
    return {"keys": sorted(keys)}


@dupes.step("work")
def dupes_work(ctx: StepContext, n: int) -> None:
    _note(ctx, "runs.log", ctx.step_key)


backoff = Pipeline("wk_backoff")


@backoff.step("flaky", retries=3, retry_delay=0.05)
def backoff_flaky(ctx: StepContext) -> dict[str, Any]:
    """Fails twice (a connection error), then passes; notes when each attempt began."""
    _note(ctx, "attempts.log", repr(time.time()))
    if ctx.attempt < 3:
        raise ConnectionError(f"try {ctx.attempt}")
    return {"attempt": ctx.attempt}


junk = Pipeline("wk_junk")


@junk.step(retries=3)
def returns_junk(ctx: StepContext) -> dict[str, Any]:
    return {"ok": 1, "frame": object()}


spawner = Pipeline("wk_spawner")

SPAWN_ERRORS: dict[str, Any] = {
    "step": lambda ctx: ctx.spawn_step("missing", {"a": 1}),
    "key": lambda ctx: ctx.spawn_step("work", {"n": 1}, depends_on=["work:0000"]),
    "name": lambda ctx: ctx.spawn_step("work", {"n": 1}, depends_on=["ghost"]),
    "params": lambda ctx: ctx.spawn_step("work", {"m": 1}),
    "json": lambda ctx: ctx.spawn_step("work", {"n": {1, 2}}),
    "cycle": lambda ctx: ctx.spawn_step("work", {"n": 1}, depends_on=["tail"]),
}


@spawner.step("start", retries=2)
def spawner_start(ctx: StepContext) -> None:
    """Makes the spawn error named by inputs["case"] (retries=2: such errors are not retried)."""
    SPAWN_ERRORS[ctx.inputs["case"]](ctx)


@spawner.step("work")
def spawner_work(ctx: StepContext, n: int) -> None: ...


@spawner.step("tail", depends_on=["work"])
def spawner_tail(ctx: StepContext) -> None: ...


weights = Pipeline("wk_weights")


@weights.step(weight=1)
def light(ctx: StepContext) -> None: ...


@weights.step(depends_on=["light"], weight=3)
def heavy(ctx: StepContext) -> None:
    """Reports half way, then waits until that report is stored (so the execution's
    progress in the report is the one of a running step)."""
    from framepipe.jobs.records import list_events

    ctx.progress(50, "half way")
    deadline = time.monotonic() + 10
    while not any(e.type == "step.progress" for e in list_events(ctx.store, ctx.execution_id)):
        if time.monotonic() > deadline:
            raise TimeoutError("the progress report was not stored within 10 s")
        time.sleep(0.02)


last_word = Pipeline("wk_last_word")


@last_word.step()
def chatty(ctx: StepContext) -> dict[str, Any]:
    """Reports three times and ends at once: the reports are coalesced, the last one kept."""
    for pct, text in ((10, "scanning"), (60, "copying"), (90, "copied 12 files, 3 skipped")):
        ctx.progress(pct, text)
    if ctx.inputs.get("fail"):
        raise RuntimeError("card ejected")
    return {"copied": 12}


fan = Pipeline("wk_fan")


@fan.step("fan")
def fan_out(ctx: StepContext) -> None:
    for i in range(20):
        ctx.spawn_step("leaf", {"i": i})


@fan.step()
def leaf(ctx: StepContext, i: int) -> dict[str, Any]:
    if i < 3:
        ctx.spawn_step("leaf", {"i": 100 + i})  # spawned later, by a leaf
    time.sleep(0.001)
    _note(ctx, "order.log", f"leaf{i}")
    return {f"leaf{i}": True}


@fan.step("join", depends_on=["leaf"])
def fan_join(ctx: StepContext) -> dict[str, Any]:
    _note(ctx, "order.log", "join")
    return {"leaves": sum(1 for k in ctx.data if k.startswith("leaf"))}


cancellable = Pipeline("wk_cancellable")


@cancellable.step("long")
def cancellable_long(ctx: StepContext) -> None:
    """Reports progress every 10 ms for 10 s (a report raises once the step is stopped)."""
    for i in range(1000):
        ctx.progress(i / 10)
        time.sleep(0.01)


@cancellable.step("later", depends_on=["long"])
def cancellable_later(ctx: StepContext) -> None: ...


resume = Pipeline("wk_resume")


@resume.step("first")
def resume_first(ctx: StepContext) -> dict[str, Any]:
    _note(ctx, "runs.log", "first")
    return {"first": 1}


@resume.step(depends_on=["first"], retries=1, retry_delay=0.05)
def breaks(ctx: StepContext) -> dict[str, Any]:
    """Fails (retried once) until the file 'fixed' exists."""
    _note(ctx, "runs.log", "breaks")
    if not (Path(ctx.inputs["dir"]) / "fixed").exists():
        raise ValueError("disk full")
    return {"breaks": 1}


@resume.step(depends_on=["breaks"])
def after(ctx: StepContext) -> dict[str, Any]:
    _note(ctx, "runs.log", "after")
    return {"after": ctx.data["first"] + ctx.data["breaks"]}


@resume.step(depends_on=["first"])
def sibling_later(ctx: StepContext) -> None:
    _note(ctx, "runs.log", "sibling")


importer = Pipeline("wk_importer")


@importer.step("scan")
def importer_scan(ctx: StepContext) -> dict[str, Any]:
    from framepipe import file_identity

    card = Path(ctx.inputs["card"])
    files = {file_identity(p, card): p.name for p in sorted(card.iterdir())}
    new = ctx.ledger.filter_new(files)
    for identity in new:
        ctx.spawn_step("copy", {"identity": identity, "name": files[identity]})
    return {"new": len(new)}


@importer.step("copy")
def importer_copy(ctx: StepContext, identity: str, name: str) -> None:
    card = Path(ctx.inputs["card"])
    _note(ctx, "copying.log", name)
    if name == "z_bad.mp4":
        # fails only once d.mp4's copy is running, so that copy is the one fail-fast lets finish
        deadline = time.monotonic() + 30
        while "d.mp4" not in notes(Path(ctx.inputs["dir"]), "copying.log"):
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        raise OSError("card removed")
    if name == "d.mp4":
        time.sleep(0.5)  # still copying when z_bad.mp4 fails
    ctx.objects.put(f"imports/{name}", (card / name).read_bytes())
    _note(ctx, "copied.log", name)
    ctx.ledger.record(identity, size=(card / name).stat().st_size, meta={"name": name})


temps = Pipeline("wk_temps")


@temps.step("ok")
def temps_ok(ctx: StepContext) -> None:
    d = ctx.tempdir()
    (d / "f").write_text("x")
    _note(ctx, "tempdirs.log", str(d))


@temps.step(depends_on=["ok"])
def fails(ctx: StepContext) -> None:
    d = ctx.tempdir()
    _note(ctx, "tempdirs.log", str(d))
    raise RuntimeError("boom")


stuck = Pipeline("wk_stuck")


@stuck.step("start")
def stuck_start(ctx: StepContext) -> dict[str, Any]:
    """Builds a wait that can never end, as inputs["case"] says:

    - "name": tail waits for every part; part 1 waits for hold 0, which waits for tail.
    - "key": part 1 waits for hold 0 (by key), which waits for every part, part 1 included.

    part 0 can run, and does."""
    if ctx.inputs["case"] == "name":
        hold = ctx.spawn_step("hold", {"i": 0}, depends_on=["tail"])
    else:
        hold = ctx.spawn_step("hold", {"i": 0}, depends_on=["part"])
    blocked = ctx.spawn_step("part", {"i": 1}, depends_on=[hold])
    free = ctx.spawn_step("part", {"i": 0})
    return {"hold": hold, "blocked": blocked, "free": free}


@stuck.step("part")
def stuck_part(ctx: StepContext, i: int) -> None: ...


@stuck.step("hold")
def stuck_hold(ctx: StepContext, i: int) -> None: ...


@stuck.step("tail", depends_on=["part"])
def stuck_tail(ctx: StepContext) -> None: ...


sd_import = Pipeline("wk_sd_import")  # the issue's example


@sd_import.step("scan")
def sd_scan(ctx: StepContext) -> dict[str, Any]:
    files = ctx.inputs["files"]
    for f in files:
        copied = ctx.spawn_step("copy", params={"path": f})
        ctx.spawn_step("render", params={"path": f}, depends_on=[copied])
    return {"count": len(files)}


@sd_import.step("copy", retries=3)
def sd_copy(ctx: StepContext, path: str) -> dict[str, Any]:
    ctx.progress(50, f"copying {path}")
    return {f"copied:{path}": True}


@sd_import.step("render", depends_on=["scan"], weight=5)
def sd_render(ctx: StepContext, path: str) -> dict[str, Any]:
    assert ctx.data[f"copied:{path}"] is True
    assert ctx.data["count"] == len(ctx.inputs["files"])
    return {f"rendered:{path}": True}


failfast = Pipeline("wk_failfast")


@failfast.step("slowpoke")
def failfast_slowpoke(ctx: StepContext) -> dict[str, Any]:
    """Runs on for a while after boom failed, then completes."""
    _note(ctx, "ran.log", "slowpoke")
    time.sleep(0.5)
    return {"slow": True}


@failfast.step("boom")
def failfast_boom(ctx: StepContext) -> None:
    """Fails once slowpoke runs."""
    deadline = time.monotonic() + 10
    while "slowpoke" not in notes(Path(ctx.inputs["dir"]), "ran.log"):
        if time.monotonic() > deadline:
            raise TimeoutError("slowpoke never started")
        time.sleep(0.01)
    raise RuntimeError("boom")


@failfast.step("after_slow", depends_on=["slowpoke"])
def failfast_after_slow(ctx: StepContext) -> None: ...


class Unprintable(Exception):
    """An exception whose message cannot be read."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


unprintable = Pipeline("wk_unprintable")


@unprintable.step(retries=1, retry_delay=0.01)
def shout(ctx: StepContext) -> None:
    raise Unprintable


lockstep = Pipeline("wk_lockstep")


def _climb(ctx: StepContext) -> None:
    for pct in range(2, 101, 2):
        ctx.progress(pct)
        time.sleep(0.002)


@lockstep.step()
def left(ctx: StepContext) -> None:
    """Climbs to 100% in small steps while ``right`` does the same beside it."""
    _climb(ctx)


@lockstep.step()
def right(ctx: StepContext) -> None:
    _climb(ctx)


blocker = Pipeline("wk_blocker")


@blocker.step()
async def hog(ctx: StepContext) -> dict[str, Any]:
    """An ``async`` step that does blocking work on the worker's event loop (what a blocking
    upload in an async step does) for ``ctx.inputs["block"]`` seconds."""
    _log(ctx, "start")
    time.sleep(float(ctx.inputs["block"]))  # noqa: ASYNC251 - blocking the loop is the point
    _log(ctx, "end")
    return {"hog_done_by": os.getpid(), "hog_attempt": ctx.attempt}


reporting = Pipeline("wk_reporting")


@reporting.step()
def busy(ctx: StepContext) -> dict[str, Any]:
    """Reports progress every 50 ms for ``seconds``; logs ``stopped`` if told to stop."""
    _log(ctx, "start")
    began = time.monotonic()
    seconds = float(ctx.inputs["seconds"])
    while (elapsed := time.monotonic() - began) < seconds:
        if ctx.cancelled:
            _log(ctx, "stopped")
            ctx.check_cancelled()
        ctx.progress(100 * elapsed / seconds)
        time.sleep(0.05)
    _log(ctx, "end")
    return {"busy_attempt": ctx.attempt}


def _pin_clip(inputs: dict[str, Any], objects: ObjectStore) -> dict[str, Any]:
    """Records the version the clip had at the submit (refuses a clip that is not there)."""
    try:
        version = objects.stat(inputs["clip"]).version
    except ObjectNotFoundError:
        raise InvalidInputError(f"no clip {inputs['clip']!r} to pin", where="inputs.clip") from None
    return {**inputs, "clip_version": version}


pinned = Pipeline("wk_pinned", on_submit=_pin_clip)


@pinned.step("read")
def pinned_read(ctx: StepContext) -> dict[str, Any]:
    return {"clip": ctx.inputs["clip"], "version": ctx.inputs["clip_version"]}
