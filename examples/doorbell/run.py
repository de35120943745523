"""Run the doorbell on a camera: a video file, a device or an RTSP/HTTP URL.

::

    python examples/doorbell/run.py --camera visitor.mp4 --known data/known_faces
    python examples/doorbell/run.py --camera /dev/video0          # or --camera 0
    python examples/doorbell/run.py --camera rtsp://user:pass@cam.local/stream1

Prints one JSON line per visitor event (and doorbell press) on stdout; health every
``--status-every`` seconds on stderr, and the final metrics as ``metrics: {json}`` there. A
video file played once ends the run when it is processed (``--loop`` repeats it,
``--realtime`` paces it); otherwise Ctrl-C or SIGTERM stops it gracefully, and SIGHUP
(``kill -HUP <pid>``) reloads the known faces without a restart. Press Enter (with
``--stdin-bell``) to ring the doorbell. Exit code 0, or 1 when the system ended in the ERROR
state.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from doorbell.main import build_parser, config_from_args, main

__all__ = ["build_parser", "config_from_args", "main"]

if __name__ == "__main__":
    sys.exit(main())
