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


bloated = Pipeline("wk_bloated")


@bloated.step(retries=2)
def big(ctx: StepContext) -> dict[str, Any]:
    return {"blob": "x" * int(ctx.inputs["size"])}
