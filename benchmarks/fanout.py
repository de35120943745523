"""framepipe's fan-out/fan-in and step-latency benchmarks (embedded engine).

Run alone with ``.venv/bin/python benchmarks/fanout.py``; ``run_all.py`` runs it together with the
Celery comparison and writes ``docs/benchmarks.md``.

* Fan-out/fan-in: the initial step ``fan`` spawns N ``noop`` steps; ``join`` depends on every
  ``noop``. Timed from submit to the execution's completion (``engine.run``), engine start not
  included. Each run gets a fresh state database.
* Latency: a chain of 501 ``link`` steps, each spawned by the previous one and depending on it,
  so nothing queues. Per step: ready -> started (the stored ``ready_at``, stamped once the
  dependency's completion was committed, to the first statement of the step function) and
  dependency completed -> started (the previous step's ``finished_at`` to the same start; this
  includes the commit of the completion).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from framepipe import Pipeline, StepContext
from framepipe.config import Settings
from framepipe.jobs.engine import JobEngine

__all__ = [
    "CHAIN_LENGTH",
    "PG_ADMIN_DSN",
    "FanoutResult",
    "LatencyResult",
    "chain_pipeline",
    "fanout_pipeline",
    "measure_latency",
    "postgres_home",
    "postgres_version",
    "run_fanout",
    "sqlite_home",
]

PG_ADMIN_DSN = "postgresql://127.0.0.1:5432/test"
PG_URL = "postgresql+psycopg://127.0.0.1:5432/test"
CHAIN_LENGTH = 500  # the last link is link(500): 501 links in all


# -- pipelines ------------------------------------------------------------------------------------


def fanout_pipeline() -> Pipeline:
    """``fan`` spawns ``inputs["n"]`` ``noop`` steps; ``join`` waits for all of them."""
    pipeline = Pipeline("bench_fanout")

    @pipeline.step()
    def fan(ctx: StepContext) -> dict[str, Any]:
        n = int(ctx.inputs["n"])
        for i in range(n):
            ctx.spawn_step("noop", params={"i": i})
        return {"spawned": n}

    @pipeline.step()
    def noop(ctx: StepContext, i: int) -> None:
        return None

    @pipeline.step(depends_on=["noop"])
    def join(ctx: StepContext) -> dict[str, Any]:
        return {"joined": True}

    return pipeline


def chain_pipeline() -> Pipeline:
    """``start`` spawns ``link(0)``; ``link(i)`` spawns ``link(i+1)`` depending on itself."""
    pipeline = Pipeline("bench_chain")

    @pipeline.step()
    def start(ctx: StepContext) -> None:
        ctx.spawn_step("link", params={"i": 0})

    @pipeline.step()
    def link(ctx: StepContext, i: int) -> dict[str, Any]:
        started = time.time()
        if i < CHAIN_LENGTH:
            ctx.spawn_step("link", params={"i": i + 1}, depends_on=[ctx.step_key])
        return {f"t:{ctx.step_key}": started}

    return pipeline


# -- stores ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_home(synchronous: str = "FULL") -> Iterator[Settings]:
    """Settings on a fresh SQLite database in a temporary home."""
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
        yield Settings(home=Path(tmp), sqlite_synchronous=synchronous)  # type: ignore[arg-type]


@contextlib.contextmanager
def postgres_home() -> Iterator[Settings]:
    """Settings on a fresh PostgreSQL schema (``fp_bench_<random>``), dropped afterwards."""
    import psycopg

    schema = f"fp_bench_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
            url = f"{PG_URL}?options=-csearch_path%3D{schema}"
            yield Settings(home=Path(tmp), database_url=url)
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def postgres_version() -> str:
    """The server's version string; raises if PostgreSQL is not reachable."""
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, connect_timeout=3) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "?"


# -- write transactions ----------------------------------------------------------------------------

_WRITE_OPTION = "framepipe_write"  # the execution option StateStore sets on its writer
_write_commits = [0]


def _count_commit(conn: sa.Connection) -> None:
    if conn.get_execution_options().get(_WRITE_OPTION):
        _write_commits[0] += 1


sa.event.listen(sa.Engine, "commit", _count_commit)


# -- measurements ---------------------------------------------------------------------------------


@dataclass
class FanoutResult:
    """One fan-out/fan-in run."""

    store: str
    n: int
    seconds: float
    steps: int
    commits: int

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds


async def _run(
    settings: Settings, pipeline: Pipeline, inputs: dict[str, Any]
) -> tuple[float, int, Any]:
    """Run one execution on a started engine: (seconds, write transactions, info)."""
    async with JobEngine(settings=settings) as engine:
        commits = _write_commits[0]
        t0 = time.perf_counter()
        info = await engine.run(pipeline, inputs)
        elapsed = time.perf_counter() - t0
        commits = _write_commits[0] - commits
    return elapsed, commits, info


def run_fanout(settings: Settings, n: int, store: str) -> FanoutResult:
    """Time one fan-out of ``n`` no-op steps and their join; checks every step completed."""
    elapsed, commits, info = asyncio.run(_run(settings, fanout_pipeline(), {"n": n}))
    statuses = {s.status.value for s in info.steps}
    if len(info.steps) != n + 2 or statuses != {"completed"}:
        raise RuntimeError(f"fan-out of {n}: {len(info.steps)} steps, statuses {statuses}")
    return FanoutResult(store=store, n=n, seconds=elapsed, steps=len(info.steps), commits=commits)


@dataclass
class LatencyResult:
    """Per-step latencies of the chain, in milliseconds."""

    store: str
    links: int
    total_seconds: float
    commits: int
    ready_to_started_ms: list[float]
    completed_to_started_ms: list[float]

    @staticmethod
    def _pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        k = (len(ordered) - 1) * q
        lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    @property
    def ready_p50(self) -> float:
        return self._pct(self.ready_to_started_ms, 0.50)

    @property
    def ready_p95(self) -> float:
        return self._pct(self.ready_to_started_ms, 0.95)

    @property
    def completed_p50(self) -> float:
        return self._pct(self.completed_to_started_ms, 0.50)

    @property
    def completed_p95(self) -> float:
        return self._pct(self.completed_to_started_ms, 0.95)

    @property
    def per_link_ms(self) -> float:
        return 1000 * self.total_seconds / self.links


def measure_latency(settings: Settings, store: str) -> LatencyResult:
    """Run the chain and compute ready -> started and dependency completed -> started."""
    elapsed, commits, info = asyncio.run(_run(settings, chain_pipeline(), {}))
    links = {s.params["i"]: s for s in info.steps if s.name == "link"}
    if len(links) != CHAIN_LENGTH + 1 or any(s.status.value != "completed" for s in links.values()):
        raise RuntimeError(f"chain: {len(links)} links, not all completed")
    ready_ms: list[float] = []
    completed_ms: list[float] = []
    for i in range(CHAIN_LENGTH + 1):
        s = links[i]
        if s.output is None or s.ready_at is None:
            raise RuntimeError(f"{s.key}: no output or no ready_at")
        started = s.output[f"t:{s.key}"]
        ready_ms.append(1000 * (started - s.ready_at))
        if i > 0:
            prev = links[i - 1]
            if prev.finished_at is None:
                raise RuntimeError(f"{prev.key}: no finished_at")
            completed_ms.append(1000 * (started - prev.finished_at))
    return LatencyResult(
        store=store,
        links=len(links),
        total_seconds=elapsed,
        commits=commits,
        ready_to_started_ms=ready_ms,
        completed_to_started_ms=completed_ms,
    )


# -- standalone -----------------------------------------------------------------------------------


def main() -> None:
    logging.getLogger("framepipe").setLevel(logging.WARNING)
    for n in (200, 1000, 2200, 5000):
        for sync in ("FULL", "NORMAL"):
            with sqlite_home(sync) as settings:
                r = run_fanout(settings, n, f"sqlite {sync}")
            print(
                f"{r.store:<14} N={n:<5} {r.seconds:7.3f} s  {r.steps_per_second:6.0f} steps/s"
                f"  {r.commits} write transactions"
            )
    with sqlite_home() as settings:
        lat = measure_latency(settings, "sqlite FULL")
    print(
        f"chain of {lat.links}: ready->started p50 {lat.ready_p50:.2f} ms "
        f"p95 {lat.ready_p95:.2f} ms; completed->started p50 {lat.completed_p50:.2f} ms "
        f"p95 {lat.completed_p95:.2f} ms; {lat.per_link_ms:.2f} ms per link"
    )


if __name__ == "__main__":
    main()
