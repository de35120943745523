"""The doorbell's command line and the original system's ``main()`` (``src.main``).

``python examples/doorbell/run.py --camera visitor.mp4`` runs it from a shell;
``from doorbell.main import main; exit_code = main(config={...})`` runs it from Python with a
configuration dict (merged over the options, the environment and the defaults) and returns the
exit code: 0, or 1 when the system ended in the ``ERROR`` state or could not start. Either way
it runs until a file played once is processed, ``system_error``, Ctrl-C or SIGTERM.

Prints one JSON line per visitor event (and doorbell press) on stdout; health every
``--status-every`` seconds on stderr, and the final metrics as ``metrics: {json}`` there. A
video file played once ends the run when it is processed (``--loop`` repeats it,
``--realtime`` paces it); otherwise Ctrl-C or SIGTERM stops it gracefully. SIGHUP reloads the
known faces (``kill -HUP <pid>``: a photo added to, replaced in or removed from the folder takes
effect without a restart; the result is one ``[doorbell] known faces reloaded`` line on stderr,
and each unusable photo a ``known face ... rejected`` warning). Press Enter (with
``--stdin-bell``) to ring the doorbell.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from doorbell.config import _merge
from doorbell.known_faces import Reloader
from doorbell.manager import OrchestratorManager, SystemState
from framepipe.errors import FramepipeError
from framepipe.logs import configure_logging

__all__ = ["build_parser", "config_from_args", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The command-line options; the environment variables of the README apply too."""
    parser = argparse.ArgumentParser(description="Face-recognition doorbell on framepipe.")
    parser.add_argument(
        "--camera",
        help="video file, device (/dev/video0 or 0) or stream URL "
        "(default: DOORBELL_CAMERA or /dev/video0)",
    )
    parser.add_argument("--data-dir", help="data folder (known_faces/, objects/); default data")
    parser.add_argument(
        "--known", help="known faces folder (<name>.jpg); default <data-dir>/known_faces"
    )
    parser.add_argument(
        "--objects",
        help="object store URL or folder for captures and events; default <data-dir>/objects",
    )
    parser.add_argument("--realtime", action="store_true", help="pace a file at its fps")
    parser.add_argument("--loop", action="store_true", help="repeat a file")
    parser.add_argument("--workers", type=int, help="workers per face stage")
    parser.add_argument("--model", choices=("hog", "cnn"), help="face detector")
    parser.add_argument(
        "--encoding-model",
        choices=("small", "large"),
        help="5-point (small) or 68-point (large) landmarks",
    )
    parser.add_argument("--tolerance", type=float, help="largest distance of a match (0.6)")
    parser.add_argument("--motion", action="store_true", help="motion gate before detection")
    parser.add_argument(
        "--visit-timeout", type=float, help="seconds without a face that end a visit (5)"
    )
    parser.add_argument("--webhook", help="POST each visitor event as JSON to this URL")
    parser.add_argument(
        "--status-every",
        type=float,
        default=30.0,
        help="seconds between health lines on stderr (0: never)",
    )
    parser.add_argument(
        "--stdin-bell", action="store_true", help="each line on stdin rings the doorbell"
    )
    parser.add_argument("--log-level", default="INFO")
    return parser


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The manager's config dict from the options given (others: environment, defaults)."""
    config: dict[str, Any] = {
        "camera": {},
        "pipeline_config": {
            "face_detection": {},
            "face_recognition": {},
            "motion_detection": {},
            "event_processing": {},
        },
        "notifications": {},
    }
    pc = config["pipeline_config"]
    if args.camera is not None:
        config["camera"]["source"] = args.camera
    if args.realtime:
        config["camera"]["realtime"] = True
    if args.loop:
        config["camera"]["loop"] = True
    if args.data_dir:
        config["data_dir"] = args.data_dir
    if args.known:
        config["known_faces_dir"] = args.known
    if args.objects:
        config["objects_url"] = args.objects
    if args.workers is not None:
        pc["face_detection"]["worker_count"] = pc["face_recognition"]["worker_count"] = args.workers
    if args.model:
        pc["face_detection"]["model"] = args.model
    if args.encoding_model:
        pc["face_recognition"]["encoding_model"] = args.encoding_model
    if args.tolerance is not None:
        pc["face_recognition"]["tolerance"] = args.tolerance
    if args.motion:
        pc["motion_detection"]["enabled"] = True
    if args.visit_timeout is not None:
        pc["event_processing"]["visit_timeout"] = args.visit_timeout
    if args.webhook:
        config["notifications"]["webhook_url"] = args.webhook
    return config


def main(argv: Sequence[str] | None = None, *, config: Mapping[str, Any] | None = None) -> int:
    """Run until the file ends, ``system_error``, Ctrl-C or SIGTERM; the exit code. ``argv``
    defaults to the command line's, or to none when ``config`` is given; ``config`` is merged
    over the options. See the module docstring."""
    if argv is None:
        argv = [] if config is not None else sys.argv[1:]
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper(), stream=sys.stderr)
    merged = config_from_args(args)
    _merge(merged, config or {})
    try:
        manager = OrchestratorManager(merged)
    except FramepipeError as exc:
        print(f"doorbell: error: {exc}", file=sys.stderr)
        return 1
    done = threading.Event()

    def show(data: dict[str, Any]) -> None:
        print(json.dumps(data, default=str), flush=True)

    for event in ("visitor.known", "visitor.unknown", "doorbell.pressed"):
        manager.register_event_callback(event, show)
    manager.register_event_callback("system_error", lambda data: done.set())
    manager.register_event_callback(  # a file played to its end; failures are recovered
        "pipeline.stopped", lambda data: done.set() if data.get("state") == "stopped" else None
    )
    reload = Reloader(manager.orchestrator.reload_known_faces)
    previous: dict[signal.Signals, Any] = {}
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda *_: done.set())
        if hasattr(signal, "SIGHUP"):  # not on Windows
            previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, lambda *_: reload.wanted.set())

    def stopping() -> None:
        """From here on a Ctrl-C is said and ignored: a KeyboardInterrupt raised in the
        middle of the stop left the pipeline running, lost the open visit and aborted the
        process ("terminate called without an active exception")."""
        if main_thread:
            previous.setdefault(signal.SIGINT, signal.getsignal(signal.SIGINT))
            signal.signal(signal.SIGINT, _again)

    try:
        return _serve(manager, args, done, reload, stopping)
    finally:
        for number, handler in previous.items():  # main() called from a program: give it back
            signal.signal(number, handler)


def _again(signum: int, frame: object) -> None:
    """SIGINT while the doorbell stops: said, not acted on (the stop is under way)."""
    print(
        "[doorbell] already stopping: queued frames and the open visit are being finished "
        "(kill -KILL to abandon them)",
        file=sys.stderr,
        flush=True,
    )


def _serve(
    manager: OrchestratorManager,
    args: argparse.Namespace,
    done: threading.Event,
    reload: Reloader,
    stopping: Callable[[], None],
) -> int:
    """Start, report health until ``done`` or Ctrl-C, stop (``stopping()`` called first, also
    after a Ctrl-C during the start); the exit code."""
    try:
        manager.start()
    except FramepipeError as exc:
        stopping()
        print(f"doorbell: error: {exc}", file=sys.stderr)
        manager.stop()
        return 1
    except KeyboardInterrupt:
        stopping()
        manager.stop()
        return 0
    reload.start()
    if args.stdin_bell:

        def bell() -> None:
            for _line in sys.stdin:
                manager.trigger_doorbell()

        threading.Thread(target=bell, daemon=True).start()
    try:
        while not done.wait(args.status_every or None):
            health = manager.get_health_status()
            print(
                f"[doorbell] {health.state.value} score={health.performance_score} "
                f"uptime={health.uptime:.0f}s error={health.last_error}"
                + (f" ({health.performance_reason})" if health.performance_reason else ""),
                file=sys.stderr,
            )
    except KeyboardInterrupt:
        pass
    finally:
        stopping()
        reload.stop()
        health = manager.get_health_status()
        manager.stop()
        metrics = manager.orchestrator.get_pipeline_metrics()
        print("metrics: " + json.dumps(metrics, default=str), file=sys.stderr, flush=True)
    if health.state is SystemState.ERROR:
        print(f"doorbell: stopped in ERROR: {health.last_error}", file=sys.stderr)
        return 1
    return 0
