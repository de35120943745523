"""Distributed jobs: 2 ``framepipe worker`` processes on PostgreSQL, steps delivered by Redis
Streams or by RabbitMQ, next to Celery; optionally next to a base revision, in one run.

Run with ``.venv/bin/python benchmarks/distributed.py`` (``--write-doc`` rewrites the results in
``docs/distributed-benchmarks.md``; ``--base REV`` also runs REV's code on Redis, from a temporary
git worktree). Needs PostgreSQL on 127.0.0.1:5432 (database ``test``), Redis on 127.0.0.1:6379
and, for the RabbitMQ rows, RabbitMQ on 127.0.0.1:5672 (guest/guest); Celery and aio-pika come
from the ``bench`` extra.

* Fan-out/fan-in: ``fan`` spawns N ``noop`` steps and ``join`` waits for all of them (the
  pipeline of ``fanout.py``), submitted with ``JobEngine`` and run by two worker processes
  (``framepipe worker``, default concurrency). Timed from submit to the execution's completion
  as the submitter sees it (it polls the execution every 50 ms). Every commit is durable.
* Each variant (code revision and broker) runs in a fresh process with ``PYTHONPATH`` on its
  ``src`` (its own workers, a fresh PostgreSQL schema and broker namespace); the variants take
  turns, ``--repeat`` times, so that a noisy machine weighs on all alike.
* Celery: ``chord(group(noop.s(i) ...))(join.s())`` on a prefork worker with 2 processes and Redis
  (``celery_chord.py``), measured in the same run.
* Latency (first turn of each variant): a chain of 501 links, each spawned by the previous one
  and depending on it: ready (``ready_at``, stamped in the transaction that completed its
  dependency) -> started (the step function's first statement).
* First step of a new worker (first turn of each variant): N=20 steps are queued with no worker
  running; a worker process is started; the time from starting the process (``Popen``) to its
  first ``step.started`` event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from fanout import chain_pipeline, fanout_pipeline, postgres_home, postgres_version

from framepipe.backends.state import StateStore, events, workers
from framepipe.config import Settings
from framepipe.jobs.engine import JobEngine

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "distributed-benchmarks.md"
ROOT = HERE.parent
BROKER_URLS = {
    "redis": os.environ.get("FP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"),
    "rabbitmq": os.environ.get("FP_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
}
BROKER_NAMES = {"redis": "Redis", "rabbitmq": "RabbitMQ"}

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
    # Keep the PYTHONPATH this process was given: it picks the revision under test.
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(HERE)) if p)
    env = {
        **os.environ,
        "PYTHONPATH": path,
        "FRAMEPIPE_DATABASE_URL": settings.resolved_database_url,
        "FRAMEPIPE_BROKER_URL": settings.broker_url,
        "FRAMEPIPE_BROKER_NAMESPACE": settings.broker_namespace,
        "FRAMEPIPE_HOME": str(settings.home),
        "FRAMEPIPE_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "framepipe", "worker"],
        env=env,
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_registered(settings: Settings, pids: set[int], timeout: float = 30.0) -> None:
    with StateStore(settings.resolved_database_url) as store:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with store.read() as conn:
                found = set(
                    conn.execute(
                        sa.select(workers.c.pid).where(workers.c.status == "running")
                    ).scalars()
                )
            if pids <= found:
                return
            time.sleep(0.05)
    raise RuntimeError("workers did not register")


async def _run(
    settings: Settings, pipeline: Any, ref: str, inputs: dict[str, Any]
) -> tuple[float, Any]:
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
                    ts = conn.execute(
                        sa.select(sa.func.min(events.c.ts)).where(
                            events.c.execution_id == execution_id, events.c.type == "step.started"
                        )
                    ).scalar()
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


def clean_broker(kind: str, url: str, namespace: str) -> None:
    """Delete what the run made on the broker (the stream, or the queue)."""
    if kind == "redis":
        import redis

        client = redis.Redis.from_url(url)
        for key in client.scan_iter(match=f"{namespace}*"):
            client.delete(key)
        client.close()
        return
    import aio_pika

    async def delete() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(f"{namespace}:jobs:steps")

    asyncio.run(delete())


def child(args: argparse.Namespace) -> None:
    """One turn of one variant, in this process (its PYTHONPATH picks the code): prints JSON."""
    out: dict[str, Any] = {"fanout": {}}
    namespace = f"fp-bench-{secrets.token_hex(4)}"
    url = BROKER_URLS[args.broker]
    try:
        with postgres_home() as base:
            settings = base.model_copy(
                update={"broker_url": url, "jobs_mode": "workers", "broker_namespace": namespace}
            )
            StateStore(settings.resolved_database_url).close()  # migrate before the workers
            with workers_running(settings):
                fanout(settings, 20)  # warm-up: imports, connections
                for n in args.sizes:
                    out["fanout"][str(n)] = fanout(settings, n)
                if args.extras:
                    out["latency"] = chain_latency(settings)
            if args.extras:
                out["starts"] = [first_step_of_new_worker(settings) for _ in range(3)]
    finally:
        clean_broker(args.broker, url, namespace)
    print(json.dumps(out), flush=True)


@dataclass
class Variant:
    """A revision's code on one broker, and what it measured."""

    label: str
    src: Path
    broker: str
    fanout: dict[int, list[float]] = field(default_factory=dict)
    latency: list[float] = field(default_factory=list)
    starts: list[float] = field(default_factory=list)

    def turn(self, sizes: list[int], extras: bool) -> None:
        cmd = [
            sys.executable,
            str(HERE / "distributed.py"),
            "--child",
            "--broker",
            self.broker,
            "--sizes",
            *map(str, sizes),
            *(["--extras"] if extras else []),
        ]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.src), str(HERE)])}
        run = subprocess.run(
            cmd, env=env, cwd=HERE, capture_output=True, text=True, check=False, timeout=1800
        )
        if run.returncode:
            raise RuntimeError(f"{self.label}: the benchmark failed:\n{run.stderr[-3000:]}")
        got = json.loads(run.stdout.strip().splitlines()[-1])
        for n, seconds in got["fanout"].items():
            self.fanout.setdefault(int(n), []).append(seconds)
            print(f"{self.label:<28} N={n:<5} {seconds:7.3f} s", flush=True)
        if extras:
            self.latency, self.starts = got["latency"], got["starts"]
            print(
                f"{self.label:<28} ready -> started p50 {pct(self.latency, 0.5):.2f} ms; "
                f"first step of a new worker {', '.join(f'{x:.2f}' for x in self.starts)} s",
                flush=True,
            )


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Path]:
    """``rev``'s tree in a temporary git worktree (its ``src`` is what the variant imports)."""
    with tempfile.TemporaryDirectory(prefix="fp-rev-") as tmp:
        tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), rev],
            check=True,
        )
        try:
            yield tree
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--brokers", nargs="+", choices=sorted(BROKER_URLS), default=["redis", "rabbitmq"]
    )
    parser.add_argument(
        "--base",
        help="also run this revision's code (on Redis), for a before/after comparison in one run",
    )
    parser.add_argument("--skip-celery", action="store_true")
    parser.add_argument("--write-doc", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--broker", choices=sorted(BROKER_URLS), help=argparse.SUPPRESS)
    parser.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with contextlib.ExitStack() as stack:
        variants: list[Variant] = []
        if args.base:
            tree = stack.enter_context(checkout(args.base))
            rev = subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", args.base],
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            variants.append(Variant(f"before ({rev}), Redis", tree / "src", "redis"))
        variants += [
            Variant(f"this tree, {BROKER_NAMES[b]}", ROOT / "src", b) for b in args.brokers
        ]
        for turn in range(args.repeat):
            for variant in variants:
                variant.turn(args.sizes, extras=turn == 0)
    theirs: dict[int, list[float]] = {}
    theirs_get: dict[int, list[float]] = {}
    try:
        import celery_chord
    except ImportError as exc:  # the bench extra is not installed
        print(f"Celery not run: {exc} (pip install -e '.[bench]')", flush=True)
        args.skip_celery = True
    if not args.skip_celery:
        with celery_chord.worker(concurrency=2):
            celery_chord.run_chord(20)
            for n in args.sizes:
                for _ in range(args.repeat):
                    r = celery_chord.run_chord(n, follow_parents=False)
                    theirs.setdefault(n, []).append(r.seconds)
                    g = celery_chord.run_chord(n, follow_parents=True)
                    theirs_get.setdefault(n, []).append(g.seconds)
                    print(
                        f"celery chord N={n:<5} {r.seconds:7.3f} s (.get(): {g.seconds:.3f} s)",
                        flush=True,
                    )
    text = report(args, variants, theirs, theirs_get)
    print(text)
    if args.write_doc:
        write_doc(text)


def _range(values: list[float]) -> str:
    return (
        f"{statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"
        if values
        else "not run"
    )


def report(
    args: argparse.Namespace,
    variants: list[Variant],
    theirs: dict[int, list[float]],
    theirs_get: dict[int, list[float]],
) -> str:
    targets = {1000: 1.5, 5000: 7.5}
    ours = next(v for v in variants if v.src == ROOT / "src" and v.broker == args.brokers[0])
    lines = [
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} "
        f"CPUs; PostgreSQL {postgres_version()}; median (and range) of {args.repeat} "
        "runs per variant, the variants taking turns.",
        "",
        "| N no-op steps | "
        + " | ".join(f"framepipe, 2 workers: {v.label}" for v in variants)
        + " | target | Celery chord, 2 processes (`follow_parents=False`) | Celery "
        f"`.get()` | framepipe ({ours.label}) vs Celery |",
        "|---|" + "---|" * len(variants) + "---|---|---|---|",
    ]
    for n in args.sizes:
        other = statistics.median(theirs[n]) if n in theirs else None
        other_get = statistics.median(theirs_get[n]) if n in theirs_get else None
        mine = statistics.median(ours.fanout[n])
        ratio = f"{other / mine:.1f}x faster" if other else "not run"
        target = f"<= {targets[n]} s" if n in targets else ""
        lines.append(
            f"| {n:,} | "
            + " | ".join(_range(v.fanout.get(n, [])) for v in variants)
            + f" | {target} | {f'{other:.2f} s' if other else 'not run'} | "
            f"{f'{other_get:.2f} s' if other_get else 'not run'} | {ratio} |"
        )
    lines += [
        "",
        "Ready -> started on the workers (chain of 501 links; target p50 <= 5 ms) and "
        "the first step of a worker started while work is queued (process start to its "
        "first `step.started`; target <= 1 s), first turn of each variant:",
        "",
    ]
    for v in variants:
        if v.latency:
            lines.append(
                f"- {v.label}: p50 {pct(v.latency, 0.5):.2f} ms, p95 "
                f"{pct(v.latency, 0.95):.2f} ms, max {max(v.latency):.2f} ms; first "
                f"step {', '.join(f'{x:.2f} s' for x in v.starts)}"
            )
    return "\n".join(lines)


def write_doc(text: str, path: Path = DOC) -> None:
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    doc = path.read_text()
    new = re.sub(
        f"{re.escape(begin)}.*?{re.escape(end)}", f"{begin}\n{text}\n{end}", doc, flags=re.S
    )
    path.write_text(new)


if __name__ == "__main__":
    main()
