"""Run every benchmark in one process run and write the results into ``docs/benchmarks.md``.

``.venv/bin/python benchmarks/run_all.py`` runs framepipe first (SQLite FULL and NORMAL,
PostgreSQL, the latency chain), then Celery, prints a Markdown report and replaces the part of
``docs/benchmarks.md`` between ``<!-- results:start -->`` and ``<!-- results:end -->``.
PostgreSQL or Redis rows are skipped with a note when the server is not reachable.
The other benchmarks run alone (see ``benchmarks/README.md``), among them the order-station
scale benchmark ``benchmarks/station_scale.py`` (stations per core, ``docs/station-scale.md``).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import logging
import os
import platform
import pstats
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import fanout
import sqlalchemy as sa

import framepipe
from framepipe.config import Settings

if TYPE_CHECKING:
    from celery_chord import ChordResult

Home = Callable[[], AbstractContextManager[Settings]]
ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
SIZES = (200, 1000, 2200, 5000)
PG_SIZES = (1000, 5000)
TARGETS = {1000: 1.0, 5000: 5.0}  # seconds, SQLite FULL (issue 2, "Speed")
LATENCY_TARGET_MS = 2.0
# Celery chord figures of an earlier run on the same kind of machine, for reference.
CELERY_REFERENCE = {200: 0.64, 1000: 3.1, 2200: 9.1, 5000: 38.6}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- machine --------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def fsync_ms(rounds: int = 200) -> float:
    """Median time of a 4 KiB write + fsync in the temporary directory the databases use."""
    times = []
    with tempfile.NamedTemporaryFile(prefix="fp-bench-fsync-") as fh:
        block = os.urandom(4096)
        for _ in range(rounds):
            t0 = time.perf_counter()
            fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def machine_info(pg_version: str | None, celery_version: str | None) -> list[tuple[str, str]]:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return [
        ("date", dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPUs (nproc)", str(len(os.sched_getaffinity(0)))),
        ("CPU model", cpu_model()),
        ("kernel", platform.release()),
        ("load average at start (1, 5, 15 min)", load),
        ("4 KiB write + fsync, median", f"{fsync_ms():.2f} ms ({tempfile.gettempdir()})"),
        ("Python", platform.python_version()),
        ("framepipe", framepipe.__version__),
        ("SQLAlchemy", sa.__version__),
        ("SQLite", sqlite3.sqlite_version),
        ("PostgreSQL server", pg_version or "not reachable"),
        ("Celery", celery_version or "not installed"),
    ]


# -- runs -----------------------------------------------------------------------------------------


@dataclass
class Series:
    """Repeated timings of one configuration and size."""

    seconds: list[float] = field(default_factory=list)
    commits: list[int] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def cell(self) -> str:
        if not self.seconds:
            return "-"
        text = f"{self.median:.2f} s"
        if len(self.seconds) > 1:
            text += f" ({min(self.seconds):.2f}-{max(self.seconds):.2f})"
        return text


def repeat_fanout(home: Home, n: int, store: str, repeat: int) -> Series:
    series = Series()
    for _ in range(repeat):
        with home() as settings:
            r = fanout.run_fanout(settings, n, store)
        series.seconds.append(r.seconds)
        series.commits.append(r.commits)
        log(f"  {store:<16} N={n:<5} {r.seconds:6.3f} s  {r.commits} write transactions")
    return series


@dataclass
class Results:
    info: list[tuple[str, str]] = field(default_factory=list)
    repeat: int = 1
    fp: dict[str, dict[int, Series]] = field(default_factory=dict)
    latency: list[fanout.LatencyResult] = field(default_factory=list)
    celery: dict[int, ChordResult] = field(default_factory=dict)  # .get()
    celery_np: dict[int, ChordResult] = field(default_factory=dict)  # follow_parents=False
    notes: list[str] = field(default_factory=list)


def run_framepipe(results: Results, *, postgres: bool) -> None:
    repeat = results.repeat
    for n in SIZES:
        for sync in ("FULL", "NORMAL"):
            store = f"SQLite {sync}"
            results.fp.setdefault(store, {})[n] = repeat_fanout(
                lambda sync=sync: fanout.sqlite_home(sync), n, store, repeat
            )
    if postgres:
        for n in PG_SIZES:
            results.fp.setdefault("PostgreSQL", {})[n] = repeat_fanout(
                fanout.postgres_home, n, "PostgreSQL", repeat
            )
    homes: list[tuple[str, Home]] = [
        ("SQLite FULL", lambda: fanout.sqlite_home("FULL")),
        ("SQLite NORMAL", lambda: fanout.sqlite_home("NORMAL")),
    ]
    if postgres:
        homes.append(("PostgreSQL", fanout.postgres_home))
    for store, home in homes:
        with home() as settings:
            lat = fanout.measure_latency(settings, store)
        log(
            f"  chain {store:<14} ready->started p50 {lat.ready_p50:.2f} ms, "
            f"completed->started p50 {lat.completed_p50:.2f} ms"
        )
        results.latency.append(lat)


def run_celery(results: Results) -> None:
    import celery_chord

    with celery_chord.worker():
        celery_chord.run_chord(20)  # warm-up
        for n in SIZES:
            for follow, into in ((True, results.celery), (False, results.celery_np)):
                r = celery_chord.run_chord(n, follow_parents=follow)
                log(
                    f"  Celery chord     N={n:<5} {r.seconds:6.3f} s (follow_parents={follow}, "
                    f"published in {r.publish_seconds:.3f} s)"
                )
                into[n] = r


# -- report ---------------------------------------------------------------------------------------


def _table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> list[str]:
    header = list(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def report(results: Results) -> str:
    sizes = [f"N={n:,}" for n in SIZES]
    runs = f"median of {results.repeat} runs (min-max)" if results.repeat > 1 else "one run each"
    out = [
        f"Generated by `benchmarks/run_all.py` on {results.info[0][1]}. framepipe cells: "
        f"{runs}; Celery: one run each.",
        "",
    ]

    out += ["### Fan-out/fan-in: submit to execution completed", ""]
    rows = []
    for store, by_n in results.fp.items():
        rows.append([f"framepipe, {store}"] + [by_n[n].cell() if n in by_n else "-" for n in SIZES])
    full = results.fp.get("SQLite FULL", {})
    if full:
        rows.append(
            ["framepipe SQLite FULL, steps/s"] + [f"{(n + 2) / full[n].median:,.0f}" for n in SIZES]
        )
        rows.append(
            ["framepipe SQLite FULL, write transactions per run"]
            + [f"{statistics.median(full[n].commits):.0f}" for n in SIZES]
        )
    for label, by_n in (
        ("Celery chord, `.get()` (Redis, prefork -c 2)", results.celery),
        ("Celery chord, `.get(follow_parents=False)`", results.celery_np),
    ):
        if not by_n:
            continue
        rows.append(
            [label]
            + [
                f"{by_n[n].seconds:.2f} s (publish {by_n[n].publish_seconds:.2f})"
                if n in by_n
                else "-"
                for n in SIZES
            ]
        )
        if full:
            rows.append(
                ["... Celery ÷ framepipe SQLite FULL"]
                + [f"{by_n[n].seconds / full[n].median:.1f}x" if n in by_n else "-" for n in SIZES]
            )
    rows.append(
        ["Celery (reference, an earlier run on the same kind of machine)"]
        + [f"{CELERY_REFERENCE[n]:.2f} s" for n in SIZES]
    )
    out += _table(["", *sizes], rows)

    out += ["", "### Ready -> started latency (chain of 501 steps, no queueing)", ""]
    out += _table(
        [
            "store",
            "ready -> started p50",
            "p95",
            "dependency completed -> started p50",
            "p95",
            "chain, per link",
            "write transactions per link",
        ],
        [
            [
                lat.store,
                f"{lat.ready_p50:.2f} ms",
                f"{lat.ready_p95:.2f} ms",
                f"{lat.completed_p50:.2f} ms",
                f"{lat.completed_p95:.2f} ms",
                f"{lat.per_link_ms:.2f} ms",
                f"{lat.commits / lat.links:.1f}",
            ]
            for lat in results.latency
        ],
    )

    out += ["", "### Targets (issue 2, SQLite, every state change durable)", ""]
    rows = []
    for n, limit in TARGETS.items():
        got = full.get(n)
        if got is None or not got.seconds:
            rows.append([f"N={n:,} <= {limit:.1f} s", "not measured", "-"])
            continue
        rows.append(
            [
                f"N={n:,} <= {limit:.1f} s",
                f"{got.median:.2f} s",
                "met" if got.median <= limit else "**not met**",
            ]
        )
    if 1000 in full and 5000 in full:
        per_1k = {n: 1000 * full[n].median / n for n in SIZES}
        growth = per_1k[5000] / per_1k[1000]
        rows.append(
            [
                "grows linearly: time per step at N=5,000 <= 1.5x that at N=1,000 "
                "(seconds per 1,000 steps at N=200 / 1,000 / 2,200 / 5,000)",
                f"{growth:.2f}x ({' / '.join(f'{v:.2f}' for v in per_1k.values())})",
                "met" if growth <= 1.5 else "**not met**",
            ]
        )
    lat = next((x for x in results.latency if x.store == "SQLite FULL"), None)
    if lat is not None:
        rows.append(
            [
                f"ready -> started p50 <= {LATENCY_TARGET_MS:.0f} ms",
                f"{lat.ready_p50:.2f} ms",
                "met" if lat.ready_p50 <= LATENCY_TARGET_MS else "**not met**",
            ]
        )
    out += _table(["target", "measured", "met?"], rows)

    if results.notes:
        out += ["", "Notes:", ""] + [f"- {note}" for note in results.notes]

    out += ["", "### Machine", ""]
    out += _table(["", ""], [[k, v] for k, v in results.info])
    return "\n".join(out) + "\n"


DOC_TEMPLATE = f"""# Benchmarks

Results of `benchmarks/run_all.py` (see `benchmarks/README.md`).

{START}
{END}
"""


def write_doc(text: str, path: Path = DOC) -> None:
    doc = path.read_text() if path.exists() else DOC_TEMPLATE
    if START not in doc or END not in doc:
        doc = doc.rstrip("\n") + f"\n\n## Results\n\n{START}\n{END}\n"
    head, _, rest = doc.partition(START)
    _, _, tail = rest.partition(END)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{START}\n{text}{END}{tail}")


def publish(text: str, doc: Path, *, write: bool) -> None:
    """Print a benchmark's report and, with ``write``, put it into ``doc`` between the
    results markers (saying so on stderr)."""
    print(text)
    if write:
        write_doc(text, doc)
        print(f"wrote {doc}", file=sys.stderr, flush=True)


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="framepipe runs per size")
    parser.add_argument("--skip-celery", action="store_true", help="do not run Celery")
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    args = parser.parse_args()
    logging.getLogger("framepipe").setLevel(logging.WARNING)

    results = Results(repeat=max(1, args.repeat))
    try:
        pg_version: str | None = fanout.postgres_version()
    except Exception as exc:
        pg_version = None
        results.notes.append(
            f"PostgreSQL not reachable at {fanout.PG_ADMIN_DSN} "
            f"({type(exc).__name__}): its rows are skipped."
        )
    try:
        import celery_chord

        celery_version: str | None = celery_chord.celery_version()
    except ImportError:
        celery_chord = None  # type: ignore[assignment]
        celery_version = None
    results.info = machine_info(pg_version, celery_version)

    log("framepipe ...")
    run_framepipe(results, postgres=pg_version is not None)

    if args.skip_celery:
        results.notes.append("Celery was not run (--skip-celery).")
    elif celery_chord is None:
        results.notes.append(
            "Celery is not installed (`pip install -e '.[bench]'`): its rows are skipped."
        )
    elif not celery_chord.redis_available():
        results.notes.append(
            f"Redis not reachable at {celery_chord.REDIS_URL}: the Celery rows are skipped."
        )
    else:
        log("Celery ...")
        try:
            run_celery(results)
        except Exception as exc:
            results.notes.append(
                f"The Celery run failed ({type(exc).__name__}: {exc}); rows missing."
            )
            log(f"Celery run failed: {exc!r}")

    text = report(results)
    print(text)
    if not args.no_write:
        write_doc(text)
        log(f"wrote {DOC.relative_to(ROOT)}")


def profile_by_thread(
    out: TextIO, main_prof: cProfile.Profile, profiles: dict[str, cProfile.Profile], top: int
) -> None:
    """Write the profiles of a run to ``out``, by own time: the event loop's, then the worker
    threads' merged by pool (``name#3`` and ``name_3`` count as ``name``)."""
    groups: dict[str, list[cProfile.Profile]] = {"event loop (main thread)": [main_prof]}
    for name, prof in profiles.items():
        groups.setdefault(name.split("#")[0].rstrip("_0123456789"), []).append(prof)
    for group, profs in groups.items():
        profs[0].create_stats()
        ps = pstats.Stats(profs[0], stream=out)
        for p in profs[1:]:
            p.create_stats()
            ps.add(p)
        out.write(f"\n-- {group} ({len(profs)} thread(s)), by own time --\n")
        ps.sort_stats("tottime").print_stats(top)


if __name__ == "__main__":
    main()
