"""The order-accuracy station: a persistent capture per station against a capture per
order (the hand-written station's "before"), measured in one run.

``.venv/bin/python benchmarks/order_accuracy.py`` measures, prints a Markdown report and writes
it into ``docs/order-accuracy-benchmarks.md`` between ``<!-- results:start -->`` and
``<!-- results:end -->`` (``--no-write`` to leave the docs alone, ``--orders N``).

Both designs read the same generated station video (640x360 H.264 at 10 fps: N orders of 2 s
each with a QR order ticket, 1.5 s idle gaps) in real time through ffmpeg, read the tags with
the same zxing-cpp reader and store every frame of an order as JPEG in a local object store.

1. **Persistent** (framepipe, ``examples/order_accuracy``): two stations, each one ffmpeg
   process for the whole run (the video looped: a camera never ends); orders found from the
   tags; ``order.completed`` after a 1 s order timeout. Measured per order: latency (its last
   frame to the event, ``latency_s``).
2. **Per order** (the hand-written station's old design, rebuilt by hand the way it was): for each
   order, at the moment it starts, a new ffmpeg capture of that order's part of the video; its
   frames are read, tagged and stored; the order is complete when the capture ends. Measured per
   order: the capture's start (spawn -> first frame), the frames a live camera would have shown
   meanwhile (lost), and the latency (last frame -> complete).
3. **Scale-up**: a station added to the running app, until its first frame is processed
   (``station.first_frame``), five times.

This is a benchmark, not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import run_all

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "order_accuracy"
DOC = ROOT / "docs" / "order-accuracy-benchmarks.md"
sys.path.insert(0, str(EXAMPLE))

from make_video import default_schedule, make_station_video  # noqa: E402
from orders import FRAME_TEMPLATE, OrderAccuracy, QrTagReader  # noqa: E402

from framepipe import CommandSource, LocalObjectStore, Settings  # noqa: E402
from framepipe.errors import CaptureExitedError  # noqa: E402

FPS = 10
TIMEOUT = 1.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def persistent(video: Path, home: Path, orders: int) -> dict[str, Any]:
    """Two stations on the video; every order's latency and the capture starts."""
    service = OrderAccuracy(
        Settings(home=home), order_timeout=TIMEOUT, best_frames=3, store_events=False, loop=True
    )  # a camera never ends
    done: list[dict[str, Any]] = []
    starts: list[dict[str, Any]] = []
    firsts: list[float] = []
    finished = asyncio.Event()
    first_seen = asyncio.Event()

    def on_first(_event: str, data: dict[str, Any]) -> None:
        firsts.append(data["seconds"])
        first_seen.set()

    def on_order(order: dict[str, Any]) -> None:
        done.append(order)
        if len(done) >= 2 * orders:
            finished.set()

    service.on_order(on_order)
    service.app.on("source.started", lambda _e, d: starts.append(d))
    service.app.on("station.first_frame", on_first)
    await service.start()
    await service.apply({"station_1": str(video), "station_2": str(video)})
    await asyncio.wait_for(finished.wait(), 30 + orders * 5)
    # scale-up: a third station added to the running app, five times
    added: list[float] = []
    for i in range(5):
        first_seen.clear()
        await service.add_station(f"station_x{i}", str(video))
        await asyncio.wait_for(first_seen.wait(), 30)
        added.append(firsts[-1])
        await service.remove_station(f"station_x{i}")
    await service.stop()
    done = done[: 2 * orders]  # the looped video's later rounds are not counted
    latencies = [float(o["latency_s"]) for o in done]
    return {
        "orders": len(done),
        "captures": sum(1 for s in starts if s["source_id"] in ("station_1", "station_2")),
        "latency": latencies,
        "first_frame": firsts[:2],
        "added": added,
        "frames": sum(int(o["frames"]) for o in done),
    }


async def per_order(video: Path, home: Path, schedule: dict[str, Any]) -> dict[str, Any]:
    """One ffmpeg capture per order, started when the order starts (the old design)."""
    store = LocalObjectStore(home / "objects")
    reader = QrTagReader()
    shots = [s for s in schedule["shots"] if len(s["tags"]) == 1]
    startup: list[float] = []
    latency: list[float] = []
    missed: list[int] = []
    frames_total = 0
    t0 = time.monotonic()
    for shot in shots:
        start_s = shot["first_frame"] / FPS
        # the order starts in the video's time: wait for it, as a live station would
        await asyncio.sleep(max(0.0, start_s - (time.monotonic() - t0)))
        order_id = shot["tags"][0]
        spawned = time.monotonic()
        source = CommandSource(
            [
                "ffmpeg",
                "-hide_banner",
                "-loglevel",
                "error",
                "-nostdin",
                "-ss",
                f"{start_s:.3f}",
                "-t",
                f"{shot['seconds']:.3f}",
                "-re",
                "-i",
                str(video),
                "-an",
                "-f",
                "mjpeg",
                "-q:v",
                "3",
                "-",
            ],
            f"order_{order_id}",
        )
        first: float | None = None
        last_ts = 0.0
        count = 0
        try:
            async for frame in source.frames():
                if first is None:
                    first = time.monotonic()
                found = await asyncio.to_thread(reader.read, frame.image)
                key = FRAME_TEMPLATE.format(
                    station_id="station_1", segment_id=order_id, ts_ms=frame.ts_ms, seq=frame.seq
                )
                await asyncio.to_thread(store.put, key, frame.to_jpeg(85))
                last_ts = frame.ts_ms / 1000
                count += 1 if found else 0
        except CaptureExitedError as exc:
            if exc.exit_code != 0:
                raise
        completed = time.time()
        assert first is not None
        startup.append(first - spawned)
        missed.append(round((first - spawned) * FPS))
        latency.append(completed - last_ts)
        frames_total += count
    return {
        "orders": len(shots),
        "captures": len(shots),
        "startup": startup,
        "missed": missed,
        "latency": latency,
        "frames": frames_total,
    }


def report(p: dict[str, Any], o: dict[str, Any], orders: int) -> str:
    def ms(values: list[float], q: float) -> str:
        return f"{pct(values, q) * 1000:.0f} ms"

    rows = [
        ("orders completed", f"{p['orders']} (2 stations x {orders})", f"{o['orders']}"),
        (
            "capture processes started",
            f"{p['captures']} (one per station, once)",
            f"{o['captures']} (one per order)",
        ),
        (
            "capture start -> first frame, p50",
            f"{ms(p['first_frame'], 0.5)}, paid once",
            f"{ms(o['startup'], 0.5)}, paid by every order",
        ),
        (
            "frames a live camera shows before the capture is up, per order",
            "0",
            f"{statistics.mean(o['missed']):.1f} (lost)",
        ),
        (
            "order latency: last frame -> completed, p50",
            f"{ms(p['latency'], 0.5)} (+ the {TIMEOUT:g} s order timeout)",
            f"{ms(o['latency'], 0.5)} (the order's end is known in advance)",
        ),
        ("order latency, p95", ms(p["latency"], 0.95), ms(o["latency"], 0.95)),
        (
            "station added to a running app -> first frame processed, p50 (max)",
            f"{ms(p['added'], 0.5)} ({max(p['added']) * 1000:.0f} ms)",
            "-",
        ),
    ]
    lines = ["| | persistent (framepipe) | capture per order (before) |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    info = "\n".join(
        f"- {k}: {v}"
        for k, v in run_all.machine_info(None, None)
        if k not in ("PostgreSQL server", "Celery", "SQLAlchemy", "SQLite")
    )
    return "\n".join(lines) + "\n\nMachine:\n\n" + info + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=6)
    parser.add_argument("--no-write", action="store_true", help="print only, leave the docs")
    args = parser.parse_args()
    logging.getLogger("framepipe").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="fp-oa-bench-") as tmp:
        root = Path(tmp)
        video = root / "station.mp4"
        ids = [f"ORDER_{101 + i}" for i in range(args.orders)]
        schedule = make_station_video(
            video,
            default_schedule(ids, order_seconds=2.0, gap_seconds=1.5, lead_seconds=1.0),
            fps=FPS,
        )
        subprocess.run(["ffmpeg", "-version"], check=True, capture_output=True)
        p = asyncio.run(persistent(video, root / "persistent", args.orders))
        o = asyncio.run(per_order(video, root / "per_order", schedule))
    text = report(p, o, args.orders)
    print(text)
    print(json.dumps({"persistent": p, "per_order": o}, default=str), file=sys.stderr)
    if not args.no_write:
        run_all.write_doc(text, DOC)


if __name__ == "__main__":
    main()
