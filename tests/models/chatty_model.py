"""A model script that writes what real models write around the protocol: a progress bar
redrawn with ``\\r`` on stderr, a line far longer than a pipe's buffer on stdout and on stderr,
hundreds of KB of warnings, invalid UTF-8; then the protocol's lines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--input", required=True)
    parser.add_argument("--output-dir", required=True)
    args, _ = parser.parse_known_args()
    frames_dir = Path(args.output_dir) / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    err = sys.stderr.buffer
    for i in range(1500):  # a tqdm bar: one line redrawn in place
        err.write(f"\r{i / 15:5.1f}%|{'#' * (i // 50):<30}|".encode())
    err.write(b"\n" + b"e" * 200_000 + b"\n")  # a dumped tensor, say
    err.write(b"warning: \xff\xfe not UTF-8 " + b"w" * 100 + b"\n")
    err.write((b"warning " + b"w" * 100 + b"\n") * 2000)
    err.write(b"last words\n")
    err.flush()
    out = sys.stdout.buffer
    out.write(b"x" * 300_000 + b"\n")
    out.write(b"progress: 50\n")
    out.write(f"frames_path: {frames_dir}\n".encode())
    out.flush()
    sys.exit(int(Path(args.input).read_bytes() == b"fail"))


if __name__ == "__main__":
    main()
