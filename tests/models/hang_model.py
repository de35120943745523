"""A model script that hangs: it spawns a child ``sleep``, records both pids in
``<output-dir>/pids.txt``, reports a little progress, then sleeps."""

import argparse
import os
import subprocess
import time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", required=True)
args, _ = parser.parse_known_args()

child = subprocess.Popen(["sleep", "120"])
pids = Path(args.output_dir) / "pids.txt"
tmp = pids.with_suffix(".tmp")
tmp.write_text(f"{os.getpid()} {child.pid}")
tmp.rename(pids)
print("progress: 5", flush=True)
time.sleep(120)
