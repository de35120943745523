"""A frame injector: reads a video file (or a synthetic pattern) and routes its frames to the
registered processors through a :class:`~framepipe.processors.ProcessorRegistry`.

::

    python examples/processor_fleet/inject.py --camera-id cam1 --rate 10 --count 100 \\
        --source video.mp4 --capability face_detection --capability motion_detection \\
        --wait-results

It waits (``--wait-processors`` s, 60 by default) until a processor offers each capability,
saying so once on stderr (``inject: waiting up to 60s for a processor of face_detection``) for
a capability no processor offers yet. Then it sends each frame as a JPEG entry to the least
loaded processor of each capability, at ``--rate`` frames per second (0: as fast as the
processors take them; a route waits while every processor of the capability is busy, so a slow
processor slows the injector down instead of piling frames up).
Frame ids are ``<camera>:<run>:<seq>:<capability>`` (one entry per capability).

Without ``--wait-results`` it routes, waits until the processors have answered every frame
(their results go to their result streams, e.g. ``faces:detected``), and prints how many frames
it sent. With ``--wait-results`` it also collects each result and prints a summary per
capability (results, errors, frames with faces, frames with motion). ``--json`` prints the
summary as one JSON line. Exit code: 0, 1 when a frame failed, 2 when no processor came,
130 when stopped by Ctrl-C or SIGTERM (it stops sending at once, stops waiting for results
and prints the summary of what it sent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inject_summary import CapabilityStats, Summary, record_result

from framepipe.errors import FramepipeError, NoProcessorError, ProcessorRegistryError
from framepipe.frames import Frame
from framepipe.logs import configure_logging
from framepipe.processors import ProcessorRegistry
from framepipe.processors.fleet import frame_entry
from framepipe.processors.fleet.environment import redis_url_from
from framepipe.sources import PatternSource, Source, VideoSource

__all__ = ["CapabilityStats", "InjectOptions", "Summary", "inject", "main", "open_source"]

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_NAMESPACE = "framepipe:"


@dataclass
class InjectOptions:
    """What to inject, where, and how fast (see the module docstring)."""

    camera_id: str = "cam1"
    source: str = "pattern"
    """A video file path or URL, or ``pattern`` (synthetic colour bars with a moving box)."""
    capabilities: list[str] = field(default_factory=lambda: ["face_detection"])
    count: int | None = 100
    """Frames to send (None: until the source ends; an endless pattern needs a count)."""
    rate: float = 10.0
    """Frames per second; 0 sends as fast as the processors take them."""
    redis_url: str = DEFAULT_REDIS_URL
    namespace: str = DEFAULT_NAMESPACE
    wait_results: bool = False
    wait_processors: float = 60.0
    route_wait: float = 30.0
    result_timeout: float = 60.0
    max_age: float | None = None
    """Seconds after which a routed frame (without ``wait_results``) is of no use: a processor
    that reaches it later skips it (None: never). With ``wait_results`` a frame's deadline is
    ``result_timeout``."""
    max_in_flight: int = 20
    """Frames awaiting a result per capability (with ``wait_results``)."""
    quality: int = 85
    loop: bool = False
    width: int = 320
    height: int = 240


def open_source(options: InjectOptions) -> Source:
    """The source named by ``options.source``: ``pattern`` or a video file/URL."""
    if options.source == "pattern":
        if options.count is None:
            raise ValueError("--source pattern needs --count (the pattern is endless)")
        return PatternSource(
            options.camera_id,
            width=options.width,
            height=options.height,
            fps=options.rate if options.rate > 0 else 25.0,
            count=options.count,
            realtime=False,
        )
    if "://" not in options.source and not Path(options.source).is_file():
        raise FileNotFoundError(f"video file {options.source} does not exist")
    return VideoSource(options.source, options.camera_id, loop=options.loop)


async def _drain(registry: ProcessorRegistry, capabilities: Sequence[str], timeout: float) -> bool:  # noqa: ASYNC109 - a plain bound
    """Wait until no processor of ``capabilities`` holds a frame of this registry."""
    deadline = time.monotonic() + timeout
    wanted = set(capabilities)
    while True:
        busy = sum(
            p.outstanding
            for p in registry.processors(include_departed=False)
            if wanted & set(p.capabilities)
        )
        if busy == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(0.05)


class _Injector:
    """One run: the registry, the per-capability limits and the tasks awaiting results."""

    def __init__(
        self, options: InjectOptions, registry: ProcessorRegistry, summary: Summary
    ) -> None:
        self.options = options
        self.registry = registry
        self.summary = summary
        self.capabilities = list(summary.capabilities)
        self.run = secrets.token_hex(3)
        self.limits = {
            c: asyncio.Semaphore(max(1, options.max_in_flight)) for c in self.capabilities
        }
        self.pending: set[asyncio.Task[None]] = set()

    async def send(self, frame: Frame) -> None:
        """Route one frame to each capability (encoded to JPEG once). With ``wait_results``
        the result is awaited in a task (at most ``max_in_flight`` per capability)."""
        base = await asyncio.to_thread(frame_entry, frame, quality=self.options.quality)
        for capability in self.capabilities:
            entry: dict[str, Any] = dict(base)
            entry["frame_id"] = f"{self.options.camera_id}:{self.run}:{frame.seq}:{capability}"
            if self.options.wait_results:
                await self.limits[capability].acquire()
                task = asyncio.create_task(self._call(entry, capability))
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)
            else:
                await self.registry.route(
                    entry, capability, wait=self.options.route_wait, max_age=self.options.max_age
                )
            self.summary.capabilities[capability].routed += 1

    async def _call(self, entry: dict[str, Any], capability: str) -> None:
        stats = self.summary.capabilities[capability]
        try:
            result = await self.registry.call(entry, capability, wait=self.options.route_wait)
        except ProcessorRegistryError as exc:
            stats.errors += 1
            self.summary.error_messages.append(f"{entry['frame_id']}: {exc}")
        else:
            record_result(stats, result)
            if not result.ok:
                self.summary.error_messages.append(
                    f"{result.frame_id}: {result.error_kind} error: {result.error}"
                )
        finally:
            self.limits[capability].release()

    async def finish(self) -> None:
        """Wait for the results (or, without ``wait_results``, for the processors to answer
        every routed frame)."""
        if self.pending:
            await asyncio.wait(set(self.pending))
        if not self.options.wait_results:
            self.summary.drained = await _drain(
                self.registry, self.capabilities, self.options.result_timeout
            )

    def cancel(self) -> None:
        """Stop waiting for results (the run was interrupted)."""
        for task in list(self.pending):
            task.cancel()


async def _wait_for_processor(
    registry: ProcessorRegistry, capability: str, wait_processors: float
) -> None:
    """Return once a live processor offers ``capability``; when none does yet, say once on
    stderr how long it waits, then wait (:class:`~framepipe.errors.NoProcessorError` when
    none comes in time)."""
    try:
        await registry.wait_for_processor(capability, timeout=0)
        return
    except NoProcessorError:
        if wait_processors <= 0:
            raise
    print(
        f"inject: waiting up to {wait_processors:g}s for a processor of {capability}",
        file=sys.stderr,
        flush=True,
    )
    await registry.wait_for_processor(capability, timeout=wait_processors)


async def inject(options: InjectOptions) -> Summary:
    """Send the frames of ``options.source`` to the processors; the run's :class:`Summary`.

    Raises :class:`~framepipe.errors.NoProcessorError` when a capability has no processor
    within ``wait_processors`` seconds, and the registry's errors when Redis is unreachable."""
    if not options.capabilities:
        raise ValueError("give at least one --capability")
    if options.count is not None and options.count < 1:
        raise ValueError("--count must be >= 1")
    summary = Summary(
        options.camera_id,
        options.source,
        capabilities={c: CapabilityStats() for c in dict.fromkeys(options.capabilities)},
    )
    source = open_source(options)
    registry = ProcessorRegistry(
        options.redis_url,
        options.namespace,
        route_timeout=options.route_wait,
        result_timeout=options.result_timeout,
    )
    async with registry:
        loop = asyncio.get_running_loop()
        started = loop.time()
        injector = _Injector(options, registry, summary)

        async def run() -> None:
            for capability in summary.capabilities:
                await _wait_for_processor(registry, capability, options.wait_processors)
            nonlocal started
            started = loop.time()
            async with contextlib.aclosing(source.frames()) as frames:
                async for frame in frames:
                    if options.count is not None and summary.frames >= options.count:
                        break
                    if options.rate > 0:
                        delay = started + summary.frames / options.rate - loop.time()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    await injector.send(frame)
                    summary.frames += 1
            await injector.finish()

        running = asyncio.create_task(run())
        try:
            with _interruptible(running, summary):
                try:
                    await running
                except asyncio.CancelledError:
                    if not summary.interrupted:
                        raise
        finally:
            injector.cancel()
            summary.elapsed_s = loop.time() - started
    return summary


@contextlib.contextmanager
def _interruptible(running: asyncio.Task[None], summary: Summary) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM while inside: cancel ``running`` and mark ``summary``
    interrupted, so that the caller reports what was sent so far. The first signal only;
    a second Ctrl-C interrupts as Python does (``KeyboardInterrupt``)."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def interrupt() -> None:
        for sig in signals:
            loop.remove_signal_handler(sig)
        summary.interrupted = True
        running.cancel()

    installed = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # (not the main thread)
            loop.add_signal_handler(sig, interrupt)
            installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


# -- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(
        description="Route frames of a video file or a synthetic pattern to registered processors."
    )
    parser.add_argument("--camera-id", default="cam1", help="camera id of the frames (cam1)")
    parser.add_argument(
        "--source",
        default="pattern",
        help="a video file (or URL), or 'pattern' for synthetic frames",
    )
    parser.add_argument(
        "--rate", type=float, default=10.0, help="frames per second (10; 0: as fast as processed)"
    )
    parser.add_argument(
        "--count",
        type=int,
        default=None,
        help="frames to send (default: the whole file; 100 for a pattern)",
    )
    parser.add_argument(
        "--capability",
        action="append",
        dest="capabilities",
        metavar="NAME",
        help="capability to route to (repeatable; default face_detection)",
    )
    parser.add_argument(
        "--redis-url",
        default=redis_url_from(None, os.environ).value,
        help="Redis URL (default: env REDIS_URL, else REDIS_HOST and REDIS_PORT)",
    )
    parser.add_argument(
        "--namespace",
        default=os.environ.get("FRAMEPIPE_NAMESPACE", DEFAULT_NAMESPACE),
        help="registry key prefix (env FRAMEPIPE_NAMESPACE)",
    )
    parser.add_argument(
        "--wait-results", action="store_true", help="collect every result and summarise them"
    )
    parser.add_argument(
        "--wait-processors",
        type=float,
        default=60.0,
        help="seconds to wait for a processor of each capability (60)",
    )
    parser.add_argument(
        "--result-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for a frame's result (60)",
    )
    parser.add_argument(
        "--max-age",
        type=float,
        default=None,
        help="seconds after which a routed frame is skipped by the processor that reaches it "
        "(default: never; with --wait-results, --result-timeout is the deadline)",
    )
    parser.add_argument(
        "--max-in-flight", type=int, default=20, help="frames awaiting a result per capability (20)"
    )
    parser.add_argument("--loop", action="store_true", help="loop a video file")
    parser.add_argument("--quality", type=int, default=85, help="JPEG quality (85)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "WARNING"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Inject, print the summary; the exit code (0 ok, 1 failed frames, 2 no processor, 130
    interrupted)."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level.upper(), stream=sys.stderr)
    count = args.count if args.count is not None or args.source != "pattern" else 100
    options = InjectOptions(
        camera_id=args.camera_id,
        source=args.source,
        capabilities=args.capabilities or ["face_detection"],
        count=count,
        rate=args.rate,
        redis_url=args.redis_url,
        namespace=args.namespace,
        wait_results=args.wait_results,
        wait_processors=args.wait_processors,
        result_timeout=args.result_timeout,
        max_age=args.max_age,
        max_in_flight=args.max_in_flight,
        quality=args.quality,
        loop=args.loop,
    )
    try:
        summary = asyncio.run(inject(options))
    except NoProcessorError as exc:
        print(
            f"inject: error: {exc} (is the processor running, in namespace {options.namespace!r}?)",
            file=sys.stderr,
        )
        return 2
    except (FramepipeError, FileNotFoundError, ValueError) as exc:
        print(f"inject: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print("\n".join(summary.lines()))
    if summary.interrupted:
        print(f"inject: interrupted after {summary.frames} frame(s)", file=sys.stderr)
        return 130
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
