"""The embedded fan-out of two revisions of framepipe, side by side in one run.

``.venv/bin/python benchmarks/revisions.py --base <rev> [--sizes 200 2200 22000]`` checks out
``<rev>`` into a temporary git worktree and times the same fan-out (``benchmarks/fanout.py``:
``fan`` spawns N ``noop`` steps, ``join`` waits for all, on a fresh SQLite database) with the
base's code and with this working tree's, alternating the two so that a noisy machine weighs
on both alike. Each run is a fresh process (``PYTHONPATH`` picks the revision's ``src``).
Reports the median and the range per size, and the ratio of the medians.
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


def _time(src: Path, n: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD.format(bench=str(ROOT / "benchmarks"), n=n)],
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 2200, 22000])
    parser.add_argument("--repeat", type=int, default=3)
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
                before: list[float] = []
                after: list[float] = []
                for _ in range(args.repeat):
                    before.append(_time(base / "src", n))
                    after.append(_time(ROOT / "src", n))
                b, a = statistics.median(before), statistics.median(after)
                print(
                    f"| {n:,} | {b:.2f} ({min(before):.2f}-{max(before):.2f}) "
                    f"| {a:.2f} ({min(after):.2f}-{max(after):.2f}) | {a / b:.2f} |",
                    flush=True,
                )
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False
            )


if __name__ == "__main__":
    main()
