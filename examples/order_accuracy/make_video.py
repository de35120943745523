"""Make a synthetic station video: a counter seen from above, order tickets with QR tags that
come and go, idle gaps, and optionally a damaged tag and two tickets at once.

    python examples/order_accuracy/make_video.py station.mp4
    python examples/order_accuracy/make_video.py station.mp4 --orders ORDER_101,ORDER_102 \\
        --order-seconds 4 --gap-seconds 3 --fps 10 --damaged --conflict

Next to the video it writes ``<video>.json``: the schedule (what is in view from which frame)
and, per order, how many frames show its tag. Needs ``segno`` (QR codes) and PyAV.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

__all__ = ["Shot", "default_schedule", "make_station_video", "qr_tag"]


@dataclass
class Shot:
    """``seconds`` of one view: ``tags`` (order ids on tickets in view), ``damaged`` (a
    ticket whose QR does not decode), nothing = an idle counter."""

    seconds: float
    tags: list[str] = field(default_factory=list)
    damaged: bool = False
    first_frame: int = 0
    frames: int = 0


def qr_tag(text: str, scale: int = 5) -> np.ndarray:
    """A printed order ticket: the QR code of ``text`` with its quiet zone and the id below."""
    try:
        import segno
    except ImportError as exc:
        raise SystemExit("make_video needs segno: pip install segno") from exc
    matrix = np.array([list(row) for row in segno.make_qr(text, error="m").matrix], np.uint8)
    modules = np.pad(matrix, 4)
    gray = np.where(np.kron(modules, np.ones((scale, scale), np.uint8)) > 0, 0, 255)
    ticket = np.full((gray.shape[0] + 26, gray.shape[1]), 255, np.uint8)
    ticket[: gray.shape[0]] = gray
    cv2.putText(ticket, text, (6, ticket.shape[0] - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, 0, 1)
    return cv2.cvtColor(ticket, cv2.COLOR_GRAY2BGR)


def _damage(ticket: np.ndarray) -> np.ndarray:
    """A ticket with a band of its QR code inverted: still found, never decoded."""
    out = ticket.copy()
    side = out.shape[1]  # the QR code is the square top of the ticket
    rows, cols = slice(int(side * 0.42), int(side * 0.58)), slice(20, side - 20)
    out[rows, cols] = 255 - out[rows, cols]
    return out


def _counter(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    image = np.full((height, width, 3), (92, 110, 124), np.uint8)
    image += rng.integers(0, 12, image.shape, dtype=np.uint8)
    cv2.rectangle(image, (20, 20), (width - 20, height - 20), (70, 80, 90), 3)
    return image


def default_schedule(
    orders: Sequence[str],
    *,
    order_seconds: float = 3.0,
    gap_seconds: float = 2.5,
    lead_seconds: float = 1.0,
    damaged: bool = False,
    conflict: bool = False,
) -> list[Shot]:
    """Idle lead-in, then each order's ticket for ``order_seconds`` followed by an idle gap.
    ``damaged`` adds a ticket that does not decode in the first gap; ``conflict`` shows the
    last two orders' tickets together for half a second between them (no gap there)."""
    shots = [Shot(lead_seconds)]
    for i, order_id in enumerate(orders):
        last_pair = conflict and len(orders) >= 2 and i == len(orders) - 2
        shots.append(Shot(order_seconds, [order_id]))
        if last_pair:
            shots.append(Shot(0.5, [order_id, orders[i + 1]]))
            continue
        shots.append(Shot(gap_seconds))
        if damaged and i == 0:
            shots.append(Shot(1.0, ["DAMAGED"], damaged=True))
            shots.append(Shot(gap_seconds))
    return shots


def make_station_video(
    path: Path | str,
    shots: Sequence[Shot],
    *,
    fps: int = 10,
    size: tuple[int, int] = (640, 360),
    seed: int = 7,
) -> dict[str, object]:
    """Encode ``shots`` as an H.264 clip at ``fps``; write and return its schedule (see the
    module docstring). The tickets drift and blur a little from frame to frame, so some frames
    of an order are sharper than others."""
    path = Path(path)
    width, height = size
    rng = np.random.default_rng(seed)
    tickets: dict[tuple[str, bool], np.ndarray] = {}
    tagged: dict[str, int] = {}
    n = 0
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "18", "g": str(fps)}
        for shot in shots:
            shot.first_frame = n
            shot.frames = round(shot.seconds * fps)
            for i in range(shot.frames):
                image = _counter(width, height, rng)
                for slot, tag in enumerate(shot.tags):
                    key = (tag, shot.damaged)
                    if key not in tickets:
                        ticket = qr_tag(tag)
                        tickets[key] = _damage(ticket) if shot.damaged else ticket
                    ticket = tickets[key]
                    if i % 4 == 3:  # every fourth frame a little out of focus
                        ticket = cv2.GaussianBlur(ticket, (3, 3), 0.8)
                    th, tw = ticket.shape[:2]
                    x = 40 + slot * (tw + 40) + (i % 6) * 3
                    y = (height - th) // 2 + (i % 3) * 2
                    image[y : y + th, x : x + tw] = ticket
                    if not shot.damaged and len(shot.tags) == 1:
                        tagged[tag] = tagged.get(tag, 0) + 1
                frame = av.VideoFrame.from_ndarray(image, format="bgr24")
                frame.pts, frame.time_base = n, Fraction(1, fps)
                container.mux(stream.encode(frame))
                n += 1
        container.mux(stream.encode(None))
    schedule: dict[str, object] = {
        "video": path.name,
        "fps": fps,
        "frames": n,
        "size": [width, height],
        "shots": [asdict(s) for s in shots],
        "tagged_frames": tagged,
    }
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(schedule, indent=2))
    return schedule


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the .mp4 to write")
    parser.add_argument(
        "--orders",
        default="ORDER_101,ORDER_102,ORDER_103",
        help="comma-separated order ids, in order of appearance",
    )
    parser.add_argument("--order-seconds", type=float, default=3.0)
    parser.add_argument("--gap-seconds", type=float, default=2.5)
    parser.add_argument("--lead-seconds", type=float, default=1.0)
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument(
        "--damaged", action="store_true", help="add a ticket whose QR does not decode"
    )
    parser.add_argument(
        "--conflict",
        action="store_true",
        help="show the last two orders' tickets together for 0.5 s",
    )
    args = parser.parse_args(argv)
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    shots = default_schedule(
        orders,
        order_seconds=args.order_seconds,
        gap_seconds=args.gap_seconds,
        lead_seconds=args.lead_seconds,
        damaged=args.damaged,
        conflict=args.conflict,
    )
    schedule = make_station_video(args.output, shots, fps=args.fps)
    print(
        f"wrote {args.output} ({schedule['frames']} frames at {args.fps} fps) and "
        f"{args.output}.json",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
