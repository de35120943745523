"""Pipelines the chaos tests submit to ``framepipe worker`` processes (no tests here): the
workers import this module by name, as the tests put this folder on their PYTHONPATH. A step
waits for gate files the test creates, so the test decides when it spawns and when it ends;
what ran is appended to ``runs.log`` under ``ctx.inputs["dir"]``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from framepipe import Pipeline, StepContext

_PATIENCE = 120.0  # a gate the test never opens fails the step instead of hanging a worker


def _log(ctx: StepContext, what: str) -> None:
    with open(Path(ctx.inputs["dir"]) / "runs.log", "a") as fh:
        fh.write(f"{what} {ctx.step_key} {ctx.attempt} {os.getpid()}\n")


def _gate(ctx: StepContext, name: str) -> None:
    """Wait for the file ``name`` in the test's folder."""
    gate = Path(ctx.inputs["dir"]) / name
    deadline = time.monotonic() + _PATIENCE
    while not gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} was not opened within {_PATIENCE:g}s")
        time.sleep(0.05)


gated_spawn = Pipeline("chaos_gated_spawn")


@gated_spawn.step()
def hold(ctx: StepContext) -> dict[str, Any]:
    """Spawns a child when the gate ``spawn`` opens, returns when ``finish`` does."""
    _log(ctx, "start")
    _gate(ctx, "spawn")
    ctx.spawn_step("child", params={"i": 1})
    _gate(ctx, "finish")
    _log(ctx, "end")
    return {"held": ctx.attempt}


@gated_spawn.step()
def child(ctx: StepContext, i: int) -> dict[str, Any]:
    _log(ctx, "child")
    return {"child": i}


two_holds = Pipeline("chaos_two_holds")


@two_holds.step()
def hold_a(ctx: StepContext) -> dict[str, Any]:
    """Returns when the gate ``finish`` opens."""
    _log(ctx, "start")
    _gate(ctx, "finish")
    _log(ctx, "end")
    return {"a": ctx.attempt}


@two_holds.step()
def hold_b(ctx: StepContext) -> dict[str, Any]:
    """Returns when the gate ``finish`` opens."""
    _log(ctx, "start")
    _gate(ctx, "finish")
    _log(ctx, "end")
    return {"b": ctx.attempt}
