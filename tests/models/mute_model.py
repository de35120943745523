"""A model script that does its work (writes a frame) but prints nothing at all and exits 0;
it counts its runs in ``<output-dir>/runs.txt``."""

import argparse
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--output-dir", required=True)
args, _ = parser.parse_known_args()

out = Path(args.output_dir)
counter = out / "runs.txt"
counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))
frames = out / "frames"
frames.mkdir(exist_ok=True)
(frames / "frame_0000.png").write_bytes(b"")
