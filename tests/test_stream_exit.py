"""A call that a stop abandons never holds the program's exit: a sink's ``segment_closed`` or
an async/inline processor's ``teardown`` that never returns is left to its daemon thread,
named in a warning, and the process ends once ``asyncio.run`` returns (the pipeline run in a
child process, which must exit; a hang check, not a speed test)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import asyncio
import logging
import sys
import threading
import time

from framepipe.processors import Processor
from framepipe.sources import PatternSource
from framepipe.stream import Segmenter, Sink, Stage, StreamPipeline

logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
STUCK = sys.argv[1]  # which call never returns
NEVER = threading.Event()  # never set
flowing = threading.Event()


def tag(frame):
    if frame.seq >= 10:
        flowing.set()
    order_2 = STUCK == "segment_closed_while_running" and frame.seq >= 5
    frame.meta["order"] = "ORDER_2" if order_2 else "ORDER_1"
    return frame


class Store(Sink):
    name = "store"

    def write(self, frame):
        time.sleep(0.05)  # slower than the camera: the stop cuts the drain short

    def segment_closed(self, segment):
        if STUCK.startswith("segment_closed"):
            NEVER.wait()


class Model(Processor):
    name = "model"

    def process(self, frame):
        return frame

    def teardown(self):
        if STUCK == "teardown_inline":
            NEVER.wait()


class AsyncModel(Processor):
    name = "async_model"

    async def process(self, frame):
        return frame

    def teardown(self):
        if STUCK == "teardown_async":
            NEVER.wait()


async def main():
    pipeline = StreamPipeline(
        "door",
        PatternSource("cam", fps=50),
        stages=[Stage(AsyncModel()), Stage(Model(), inline=True), Stage(tag, name="tag")],
        segmenter=Segmenter("order", timeout=30),
        sinks=[Store()],
        teardown_timeout=0.5,
    )
    await pipeline.start()
    while not flowing.is_set():
        await asyncio.sleep(0.01)
    await asyncio.wait_for(pipeline.stop(drain_timeout=0.2), 30)
    print("stopped:", pipeline.state.value, flush=True)


asyncio.run(main())
print("asyncio.run returned", flush=True)
"""


@pytest.mark.parametrize(
    ("stuck", "named"),
    [
        # a segment closed during the run: its segment_closed was running when stop() came
        ("segment_closed_while_running", "sink 'store': segment_closed(ORDER_1)"),
        # the segment the stop cut, handed to the sink at its teardown
        ("segment_closed_at_stop", "sink 'store': segment_closed(ORDER_1)"),
        ("teardown_async", "stage 'async_model': teardown()"),
        ("teardown_inline", "stage 'model': teardown()"),
    ],
)
def test_a_call_the_stop_abandoned_does_not_hold_the_exit(
    tmp_path: Path, stuck: str, named: str
) -> None:
    script = tmp_path / "pipeline.py"
    script.write_text(SCRIPT)
    try:
        done = subprocess.run(
            [sys.executable, str(script), stuck],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired as hung:
        out = hung.stdout.decode() if isinstance(hung.stdout, bytes) else hung.stdout
        pytest.fail(f"the process did not exit after the pipeline stopped; stdout: {out!r}")
    assert "stopped: stopped" in done.stdout, done.stderr
    assert "asyncio.run returned" in done.stdout, done.stderr
    assert done.returncode == 0, done.stderr
    assert "did not tear down within 0.5s" in done.stderr
    assert named in done.stderr  # the abandoned call, in a warning
    assert "Traceback" not in done.stderr
