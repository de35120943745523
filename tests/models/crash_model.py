"""A model script that fails: a line on stdout, an error on stderr, exit code 3."""

import sys

print("progress: 10", flush=True)
print("loading weights from /models/anime.ckpt", file=sys.stderr)
print("RuntimeError: CUDA out of memory", file=sys.stderr)
sys.exit(3)
