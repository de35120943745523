"""The embedded fan-out of two revisions of framepipe, side by side in one run.

``.venv/bin/python benchmarks/revisions.py --base <rev> [--sizes 200 2200 22000]`` checks out
``<rev>`` into a temporary git worktree and times the same fan-out (``benchmarks/fanout.py``:
``fan`` spawns N ``noop`` steps, ``join`` waits for all, on a fresh SQLite database) with the
base's code and with this working tree's, alternating the two so that a noisy machine weighs
on both alike. Each run is a fresh process (``PYTHONPATH`` picks the revision's ``src``).
Reports the median and the range per size, and the ratio of the medians. A run that does not
finish within ``--timeout`` seconds is reported as stalled (counted, not timed): revisions
before d00b6f4 could hang once the crash journal passed 1 MiB.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Run inside the child: the fan-out of benchmarks/fanout.py, timed from submit to completion.
_CHILD = """
import logging, sys
sys.path.insert(0, {bench!r})
from fanout import run_fanout, sqlite_home
logging.getLogger("framepipe").setLevel(logging.WARNING)
with sqlite_home("FULL") as settings:
    print(run_fanout(settings, {n}, "sqlite").seconds)
"""


def _time(src: Path, n: int, timeout: float) -> float | None:
    """Seconds of one fan-out of ``n`` steps with the code under ``src``; None if it stalled."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD.format(bench=str(ROOT / "benchmarks"), n=n)],
            env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None
    return float(out.stdout.strip().splitlines()[-1])


def _cell(runs: list[float | None]) -> tuple[str, float | None]:
    done = [r for r in runs if r is not None]
    stalled = len(runs) - len(done)
    note = f", {stalled} stalled" if stalled else ""
    if not done:
        return f"all {stalled} stalled", None
    m = statistics.median(done)
    return f"{m:.2f} ({min(done):.2f}-{max(done):.2f}{note})", m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2200, 22000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a stall")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fp-rev-") as tmp:
        base = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.base],
            check=True,
        )
        try:
            print(f"| steps | {args.base[:10]} (s) | this tree (s) | this / base |")
            print("|---|---|---|---|")
            for n in args.sizes:
                before: list[float | None] = []
                after: list[float | None] = []
                for _ in range(args.repeat):
                    before.append(_time(base / "src", n, args.timeout))
                    after.append(_time(ROOT / "src", n, args.timeout))
                (b_text, b), (a_text, a) = _cell(before), _cell(after)
                ratio = f"{a / b:.2f}" if a is not None and b is not None else "-"
                print(f"| {n:,} | {b_text} | {a_text} | {ratio} |", flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False
            )


if __name__ == "__main__":
    main()
