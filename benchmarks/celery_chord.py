"""The same fan-out/fan-in in Celery: ``chord(group(noop.s(i) for i in range(N)))(join.s())``.

A real worker runs in a subprocess (prefork, 2 processes) with Redis as broker and result
backend on ``127.0.0.1:6379``, database 11 (flushed before the run). This module is both the
worker's app (``celery -A celery_chord worker ...``, started with ``benchmarks/`` as its working
directory) and the driver. Run alone with ``.venv/bin/python benchmarks/celery_chord.py``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from celery import Celery, chord, group

__all__ = [
    "REDIS_URL",
    "ChordResult",
    "app",
    "celery_version",
    "redis_available",
    "run_chord",
    "worker",
]

REDIS_URL = os.environ.get("FP_BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
QUEUE_ENV = "FP_BENCH_CELERY_QUEUE"
HERE = Path(__file__).resolve().parent

app = Celery("fp_bench", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=os.environ.get(QUEUE_ENV, "fp_bench"),
    broker_connection_retry_on_startup=True,
)


@app.task(name="fp_bench.noop")
def noop(i: int) -> int:
    return i


@app.task(name="fp_bench.join")
def join(results: list[int]) -> int:
    return len(results)


def celery_version() -> str:
    import celery

    return str(celery.__version__)


def redis_available() -> bool:
    """True when the Redis server answers a PING."""
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


@contextlib.contextmanager
def worker(concurrency: int = 2) -> Iterator[str]:
    """Start a prefork worker on a unique queue (after flushing the Redis db); yield the queue.

    The worker is shut down (warm, then killed) on exit; its log is printed if it failed."""
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()
    queue = f"fp_bench_{secrets.token_hex(4)}"
    app.conf.task_default_queue = queue
    env = {**os.environ, QUEUE_ENV: queue, "PYTHONPATH": str(HERE)}
    with tempfile.NamedTemporaryFile("w+", prefix="fp-bench-celery-", suffix=".log") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "celery_chord",
                "worker",
                "--pool",
                "prefork",
                "-c",
                str(concurrency),
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "-Q",
                queue,
                "--loglevel",
                "WARNING",
            ],
            cwd=HERE,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            _wait_ready(proc)
            yield queue
        except BaseException:
            log.seek(0)
            sys.stderr.write(f"celery worker log:\n{log.read()[-4000:]}\n")
            raise
        finally:
            _stop(proc)
            with contextlib.suppress(redis.RedisError):
                redis.Redis.from_url(REDIS_URL).flushdb()


def _wait_ready(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery worker exited with status {proc.returncode}")
        if app.control.ping(timeout=0.5):
            return
    raise RuntimeError(f"celery worker not ready after {timeout:.0f} s")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # warm shutdown of the main process and its pool
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the worker's own session: only its children
            proc.wait()


@dataclass
class ChordResult:
    """One chord run: ``publish_seconds`` until ``chord(...)(...)`` returned, ``seconds`` until
    ``.get()`` returned the join's result."""

    n: int
    seconds: float
    publish_seconds: float
    follow_parents: bool

    @property
    def tasks_per_second(self) -> float:
        return (self.n + 1) / self.seconds


def run_chord(n: int, *, follow_parents: bool = True, timeout: float = 900.0) -> ChordResult:
    """Time ``chord(group(noop.s(i) for i in range(n)))(join.s()).get()``.

    With ``follow_parents=True`` (Celery's default) ``.get()`` checks the chord's header tasks
    for errors on every wake-up (at least once a second), reading each unfinished one from the
    backend; ``follow_parents=False`` only waits for the join's own result."""
    t0 = time.perf_counter()
    async_result = chord(group(noop.s(i) for i in range(n)))(join.s())
    published = time.perf_counter() - t0
    result = async_result.get(timeout=timeout, follow_parents=follow_parents)
    elapsed = time.perf_counter() - t0
    if result != n:
        raise RuntimeError(f"chord of {n}: join saw {result} results")
    return ChordResult(
        n=n, seconds=elapsed, publish_seconds=published, follow_parents=follow_parents
    )


def main() -> None:
    if not redis_available():
        sys.exit(f"Redis is not reachable at {REDIS_URL}")
    with worker():
        run_chord(20)  # warm-up
        for n in (200, 1000, 2200, 5000):
            for follow in (True, False):
                r = run_chord(n, follow_parents=follow)
                print(
                    f"celery chord N={n:<5} follow_parents={follow!s:<5} {r.seconds:7.3f} s "
                    f"(published in {r.publish_seconds:.3f} s)"
                )


if __name__ == "__main__":
    main()
