"""A model script that fails (exit 1) until it has been run ``--fail-times`` times, counting
its runs in ``<output-dir>/runs.txt``; then it succeeds like a good model."""

import argparse
import sys
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", required=True)
parser.add_argument("--fail-times", type=int, default=1)
args, _ = parser.parse_known_args()

counter = Path(args.output_dir) / "runs.txt"
runs = int(counter.read_text()) + 1 if counter.exists() else 1
counter.write_text(str(runs))
if runs <= args.fail_times:
    print(f"transient failure {runs}", file=sys.stderr)
    sys.exit(1)
frames = Path(args.output_dir) / "frames"
frames.mkdir(exist_ok=True)
(frames / "frame_0000.png").write_bytes(b"")
print("progress: 100", flush=True)
print(f"frames_path: {frames}", flush=True)
