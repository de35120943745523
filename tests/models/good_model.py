"""A model script on ``SubprocessModel``'s command-line protocol: writes frames, prints progress."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--style", default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--report-path", default=None, help="print this frames_path instead")
    args = parser.parse_args()

    data = Path(args.input).read_bytes()
    frames_dir = Path(args.output_dir) / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    print("loading model", flush=True)
    for i in range(args.frames):
        image = np.full((24, 32, 3), (args.seed + i + len(data)) % 256, np.uint8)
        cv2.imwrite(str(frames_dir / f"frame_{i:04d}.png"), image)
        print(f"progress: {int((i + 1) / args.frames * 100)}", flush=True)
    (frames_dir / "args.txt").write_text(f"{args.prompt}|{args.style}|{args.seed}")
    print(f"frames_path: {args.report_path or frames_dir}", flush=True)


if __name__ == "__main__":
    main()
