"""A model script that finishes but leaves a helper behind: it starts a child ``sleep`` that
inherits its stdout and stderr (in its own session with ``--detach``, outside the script's
process group), records the child's pid in ``<output-dir>/helper.pid``, prints its
``frames_path`` and exits 0 while the child still runs."""

import argparse
import subprocess
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", required=True)
parser.add_argument("--detach", action="store_true")
args, _ = parser.parse_known_args()

child = subprocess.Popen(["sleep", "120"], start_new_session=args.detach)
(Path(args.output_dir) / "helper.pid").write_text(str(child.pid))
print(f"frames_path: {args.output_dir}", flush=True)
