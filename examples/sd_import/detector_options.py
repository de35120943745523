"""The SD-card detector's command line: its options, the checks on them, and what a refused
connection to the backend says about them.

:func:`parse_args` guarantees a usable set of options or exits with argparse's usage error
naming the option that is wrong: at least one ``--watch`` or ``--card``, a ``--backend`` that is
a ``ws://`` or ``wss://`` URL, and never ``--create-shared`` with ``--shared-is-mount``.
:func:`refusal_reason` never shows the token or the URL's credentials (the URL is shown
through :func:`framepipe.urls.safe_url`).
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from shared_root import add_shared_options

from framepipe.urls import safe_url

__all__ = ["parse_args", "refusal_reason"]


def parse_args(argv: list[str] | None, description: str) -> argparse.Namespace:
    """The detector's options from ``argv`` (``sys.argv`` when None), checked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--watch",
        type=Path,
        action="append",
        default=[],
        help="a folder whose subfolders are cards (repeatable)",
    )
    parser.add_argument(
        "--card",
        type=Path,
        action="append",
        default=[],
        help="a folder that is a card while it exists, e.g. E:\\ (repeatable)",
    )
    parser.add_argument("--backend", required=True, help="ws://HOST:PORT/ws/detector")
    add_shared_options(parser, when=" (at start and before each copy)")
    parser.add_argument(
        "--token",
        default=os.environ.get("FRAMEPIPE_API_TOKEN"),
        help="the service's bearer token (default: FRAMEPIPE_API_TOKEN)",
    )
    parser.add_argument("--detector-id", default=socket.gethostname())
    parser.add_argument("--interval", type=float, default=1.0, help="poll interval (s)")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="a new card's listing must be unchanged this long (s); 0: at once",
    )
    parser.add_argument(
        "--max-rate", type=float, default=None, help="copy at most this many bytes per second"
    )
    parser.add_argument(
        "--max-backoff",
        type=float,
        default=30.0,
        help="longest wait between reconnection attempts (s)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    if not args.watch and not args.card:
        parser.error("give --watch DIR and/or --card DIR")
    if not args.backend.lower().startswith(("ws://", "wss://")):
        parser.error(
            f"--backend {args.backend!r}: give the backend's detector WebSocket, "
            "ws://HOST:PORT/ws/detector (wss:// behind TLS)"
        )
    if args.create_shared and args.shared_is_mount:
        parser.error("--create-shared and --shared-is-mount: a mount point is not created here")
    return args


def refusal_reason(code: int, backend: str, token: str | None) -> str:
    """Why the backend likely refused the detector's connection with HTTP ``code``."""
    endpoint = f"or {safe_url(backend)} is not its detector WebSocket (/ws/detector)"
    if not token:
        return f"no token was given (--token, FRAMEPIPE_API_TOKEN), {endpoint}"
    if code in (401, 403):
        return f"the token is not the backend's FRAMEPIPE_API_TOKEN, {endpoint}"
    return f"{safe_url(backend)} is not the backend's detector WebSocket"
