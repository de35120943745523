"""Distributed jobs: 2 ``framepipe worker`` processes on Redis + PostgreSQL, next to Celery.

Run with ``.venv/bin/python benchmarks/distributed.py`` (``--write-doc`` rewrites the results in
``docs/distributed-benchmarks.md``). Needs Redis on 127.0.0.1:6379 and PostgreSQL on
127.0.0.1:5432 (database ``test``); Celery comes from the ``bench`` extra.

* Fan-out/fan-in: ``fan`` spawns N ``noop`` steps and ``join`` waits for all of them (the
  pipeline of ``fanout.py``), submitted with ``JobEngine.run`` from this process and run by two
  worker processes (``framepipe worker``, default concurrency). Timed from submit to the
  execution's completion as the submitter sees it (it polls the execution every 50 ms). All runs
  share one fresh PostgreSQL schema and one Redis namespace; every commit is durable.
* Celery: ``chord(group(noop.s(i) ...))(join.s())`` on a prefork worker with 2 processes and Redis
  (``celery_chord.py``), measured in the same run.
* Latency: a chain of 201 links, each spawned by the previous one and depending on it, on the two
  workers: ready (``ready_at``, stamped in the transaction that completed its dependency) ->
  started (the step function's first statement).
* First step of a new worker: N=20 steps are queued with no worker running; a worker process is
  started; the time from starting the process (``Popen``) to its first ``step.started`` event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fanout import chain_pipeline, fanout_pipeline, postgres_home, postgres_version

from framepipe.backends.state import StateStore, events, steps, workers
from framepipe.config import Settings
from framepipe.jobs.engine import JobEngine

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "distributed-benchmarks.md"
REDIS_URL = os.environ.get("FP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")

bench_fanout = fanout_pipeline()
bench_chain = chain_pipeline()
FANOUT_REF = "distributed:bench_fanout"
CHAIN_REF = "distributed:bench_chain"


@contextlib.contextmanager
def workers_running(settings: Settings, n: int = 2) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``n`` worker processes on ``settings``; stopped with SIGTERM afterwards."""
    procs = [start_worker(settings) for _ in range(n)]
    try:
        wait_registered(settings, {p.pid for p in procs})
        yield procs
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def start_worker(settings: Settings) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(HERE),
           "FRAMEPIPE_DATABASE_URL": settings.resolved_database_url,
           "FRAMEPIPE_BROKER_URL": settings.broker_url,
           "FRAMEPIPE_BROKER_NAMESPACE": settings.broker_namespace,
           "FRAMEPIPE_HOME": str(settings.home), "FRAMEPIPE_LOG_LEVEL": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "framepipe", "worker"], env=env, cwd=HERE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_registered(settings: Settings, pids: set[int], timeout: float = 30.0) -> None:
    with StateStore(settings.resolved_database_url) as store:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with store.read() as conn:
                found = set(conn.execute(sa.select(workers.c.pid).where(
                    workers.c.status == "running")).scalars())
            if pids <= found:
                return
            time.sleep(0.05)
    raise RuntimeError("workers did not register")


async def _run(settings: Settings, pipeline: Any, ref: str, inputs: dict[str, Any]) -> tuple[
        float, Any]:
    async with JobEngine(settings=settings) as engine:
        t0 = time.perf_counter()
        execution_id = await engine.submit(pipeline, inputs, ref=ref)
        info = await engine.wait(execution_id)
        return time.perf_counter() - t0, info


def fanout(settings: Settings, n: int) -> float:
    elapsed, info = asyncio.run(_run(settings, bench_fanout, FANOUT_REF, {"n": n}))
    if len(info.steps) != n + 2 or {s.status.value for s in info.steps} != {"completed"}:
        raise RuntimeError(f"fan-out of {n} did not complete every step")
    return float(elapsed)


def chain_latency(settings: Settings) -> list[float]:
    """ready -> started of every link after the first, in ms."""
    _elapsed, info = asyncio.run(_run(settings, bench_chain, CHAIN_REF, {}))
    out = []
    for s in info.steps:
        started = info.data.get(f"t:{s.key}")
        if s.name == "link" and started is not None and s.ready_at is not None:
            out.append((started - s.ready_at) * 1000.0)
    return out


def first_step_of_new_worker(settings: Settings) -> float:
    """Seconds from starting a worker process to its first step, with work already queued."""

    async def submit() -> str:
        async with JobEngine(settings=settings) as engine:
            return await engine.submit(bench_fanout, {"n": 20}, ref=FANOUT_REF)

    execution_id = asyncio.run(submit())
    t0 = time.time()
    proc = start_worker(settings)
    try:
        with StateStore(settings.resolved_database_url) as store:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with store.read() as conn:
                    ts = conn.execute(sa.select(sa.func.min(events.c.ts)).where(
                        events.c.execution_id == execution_id,
                        events.c.type == "step.started")).scalar()
                if ts is not None:
                    return float(ts) - t0
                time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    raise RuntimeError("the new worker took no step within 30 s")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--write-doc", action="store_true")
    args = parser.parse_args()
    ours: dict[int, list[float]] = {}
    theirs: dict[int, list[float]] = {}
    theirs_get: dict[int, list[float]] = {}
    namespace = f"fp-bench-{secrets.token_hex(4)}"
    with postgres_home() as base:
        settings = base.model_copy(update={"broker_url": REDIS_URL, "jobs_mode": "workers",
                                           "broker_namespace": namespace})
        StateStore(settings.resolved_database_url).close()  # migrate before the workers start
        with workers_running(settings):
            fanout(settings, 20)  # warm-up: imports, connections
            for n in args.sizes:
                for _ in range(args.repeat):
                    ours.setdefault(n, []).append(fanout(settings, n))
                    print(f"framepipe workers N={n:<5} {ours[n][-1]:7.3f} s", flush=True)
            latency = chain_latency(settings)
            print(f"ready -> started p50 {pct(latency, 0.5):.2f} ms, p95 "
                  f"{pct(latency, 0.95):.2f} ms", flush=True)
        starts = [first_step_of_new_worker(settings) for _ in range(args.repeat)]
        print(f"first step of a new worker: {', '.join(f'{s:.2f}' for s in starts)} s",
              flush=True)
        with StateStore(settings.resolved_database_url) as store, store.read() as conn:
            stored = conn.execute(sa.select(sa.func.count()).select_from(steps)).scalar()
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{namespace}*"):
        client.delete(key)
    if not args.skip_celery:
        import celery_chord

        with celery_chord.worker(concurrency=2):
            celery_chord.run_chord(20)
            for n in args.sizes:
                for _ in range(args.repeat):
                    r = celery_chord.run_chord(n, follow_parents=False)
                    theirs.setdefault(n, []).append(r.seconds)
                    g = celery_chord.run_chord(n, follow_parents=True)
                    theirs_get.setdefault(n, []).append(g.seconds)
                    print(f"celery chord N={n:<5} {r.seconds:7.3f} s (.get(): {g.seconds:.3f} s)",
                          flush=True)
    text = report(args, ours, theirs, theirs_get, latency, starts, stored or 0)
    print(text)
    if args.write_doc:
        write_doc(text)


def report(args: argparse.Namespace, ours: dict[int, list[float]],
           theirs: dict[int, list[float]], theirs_get: dict[int, list[float]],
           latency: list[float], starts: list[float], stored: int) -> str:
    targets = {1000: 1.5, 5000: 7.5}
    lines = [f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} "
             f"CPUs; PostgreSQL {postgres_version()}; median of {args.repeat} runs.", "",
             "| N no-op steps | framepipe, 2 workers | target | Celery chord, 2 processes "
             "(`follow_parents=False`) | Celery `.get()` | framepipe vs Celery |",
             "|---|---|---|---|---|---|"]
    for n in args.sizes:
        mine = statistics.median(ours[n])
        other = statistics.median(theirs[n]) if n in theirs else None
        other_get = statistics.median(theirs_get[n]) if n in theirs_get else None
        ratio = f"{other / mine:.1f}x faster" if other else "not run"
        target = f"<= {targets[n]} s" if n in targets else ""
        lines.append(f"| {n:,} | {mine:.2f} s | {target} | "
                     f"{f'{other:.2f} s' if other else 'not run'} | "
                     f"{f'{other_get:.2f} s' if other_get else 'not run'} | {ratio} |")
    lines += ["", f"Ready -> started on the workers (chain of {len(latency)} links): p50 "
              f"{pct(latency, 0.5):.2f} ms, p95 {pct(latency, 0.95):.2f} ms, max "
              f"{max(latency):.2f} ms (target p50 <= 5 ms).", "",
              "First step of a worker started while work is queued (process start to its first "
              f"`step.started`): {', '.join(f'{s:.2f} s' for s in starts)} (target <= 1 s).", "",
              f"Steps stored in the schema at the end: {stored:,}."]
    return "\n".join(lines)


def write_doc(text: str, path: Path = DOC) -> None:
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    doc = path.read_text()
    new = re.sub(f"{re.escape(begin)}.*?{re.escape(end)}", f"{begin}\n{text}\n{end}", doc,
                 flags=re.S)
    path.write_text(new)


if __name__ == "__main__":
    main()
