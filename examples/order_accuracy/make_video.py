"""Make a synthetic station video: a counter seen from above, order tickets that come and go,
idle gaps, and optionally a damaged tag and two tickets at once. The tickets carry a QR tag
(``--ticket qr``, the default) or their order number printed as text (``--ticket text``:
``ORDER_101`` is printed ``ORDER #101``), for the OCR reader; printed tickets can lie at an
angle, be out of focus and be partly covered by a hand.

    python examples/order_accuracy/make_video.py station.mp4
    python examples/order_accuracy/make_video.py station.mp4 --orders ORDER_101,ORDER_102 \\
        --order-seconds 4 --gap-seconds 3 --fps 10 --damaged --conflict
    python examples/order_accuracy/make_video.py printed.mp4 --ticket text \\
        --angle 12 --blur 1.2 --occlusion 0.25

Next to the video it writes ``<video>.json``: the schedule (what is in view from which frame)
and, per order, how many frames show its tag. Needs PyAV, and ``segno`` for QR tickets.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

__all__ = [
    "Shot",
    "Ticket",
    "default_schedule",
    "make_station_video",
    "printed_number",
    "qr_tag",
    "text_tag",
]

Ticket = Literal["qr", "text"]
SKIN = (118, 150, 205)  # BGR of the hand that covers part of a ticket


@dataclass
class Shot:
    """``seconds`` of one view: ``tags`` (order ids on tickets in view), ``damaged`` (a
    ticket whose tag does not read), nothing = an idle counter. How the tickets lie:
    ``angle`` (degrees, counter-clockwise), ``blur`` (sigma of a Gaussian defocus, pixels) and
    ``occlusion`` (the fraction of each ticket's width, from its left edge, under a hand)."""

    seconds: float
    tags: list[str] = field(default_factory=list)
    damaged: bool = False
    angle: float = 0.0
    blur: float = 0.0
    occlusion: float = 0.0
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


def printed_number(order_id: str) -> str:
    """What a printed ticket shows for ``order_id``: ``ORDER_101`` -> ``ORDER #101``; any
    other id as it is."""
    match = re.fullmatch(r"ORDER_(\d+)", order_id)
    return f"ORDER #{match.group(1)}" if match else order_id


def text_tag(text: str) -> np.ndarray:
    """A printed order ticket: a header, the order number in large type, a line of small
    print under it (no number in it), on white paper with a thin border."""
    number = printed_number(text)
    font = cv2.FONT_HERSHEY_DUPLEX
    (tw, th), _ = cv2.getTextSize(number, font, 0.85, 2)
    width = max(200, tw + 24)
    ticket = np.full((112, width), 250, np.uint8)
    cv2.rectangle(ticket, (0, 0), (width - 1, 111), 200, 1)
    cv2.putText(ticket, "PICK-UP", (12, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.5, 60, 1, cv2.LINE_AA)
    cv2.line(ticket, (12, 34), (width - 12, 34), 120, 1)
    cv2.putText(ticket, number, (12, 40 + th + 8), font, 0.85, 0, 2, cv2.LINE_AA)
    cv2.putText(ticket, "burger, fries, cola", (12, 100), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 70, 1)
    return cv2.cvtColor(ticket, cv2.COLOR_GRAY2BGR)


def _smudge(ticket: np.ndarray) -> np.ndarray:
    """A printed ticket with its order number scribbled over: seen, never read."""
    out = ticket.copy()
    for i, y in enumerate(range(44, 78, 4)):
        cv2.line(out, (8, y), (out.shape[1] - 8, y + (6 if i % 2 else -6)), (20, 20, 20), 3)
    return out


def _damage(ticket: np.ndarray) -> np.ndarray:
    """A ticket with a band of its QR code inverted: still found, never decoded."""
    out = ticket.copy()
    side = out.shape[1]  # the QR code is the square top of the ticket
    rows, cols = slice(int(side * 0.42), int(side * 0.58)), slice(20, side - 20)
    out[rows, cols] = 255 - out[rows, cols]
    return out


def _place(
    image: np.ndarray, ticket: np.ndarray, x: int, y: int, shot: Shot, defocus: float
) -> None:
    """Lays ``ticket`` on ``image`` with its top-left corner (before turning) at (x, y): turned
    by ``shot.angle`` around its centre, defocused (``shot.blur`` plus ``defocus``) together
    with its edges, and the left ``shot.occlusion`` of it under a hand reaching in from
    below."""
    th, tw = ticket.shape[:2]
    pad = 40
    canvas = np.zeros((th + 2 * pad, tw + 2 * pad, 3), np.uint8)
    alpha = np.zeros(canvas.shape[:2], np.float32)
    canvas[pad : pad + th, pad : pad + tw] = ticket
    alpha[pad : pad + th, pad : pad + tw] = 1.0
    turn = cv2.getRotationMatrix2D((pad + tw / 2, pad + th / 2), shot.angle, 1.0)
    size = (canvas.shape[1], canvas.shape[0])
    canvas = cv2.warpAffine(canvas, turn, size, flags=cv2.INTER_LINEAR)
    alpha = cv2.warpAffine(alpha, turn, size, flags=cv2.INTER_LINEAR)
    sigma = shot.blur + defocus
    if sigma > 0:
        canvas = cv2.GaussianBlur(canvas, (0, 0), sigma)
        alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)
    x0, y0 = x - pad, y - pad
    h, w = image.shape[:2]
    cx0, cy0 = max(0, -x0), max(0, -y0)
    cx1, cy1 = min(canvas.shape[1], w - x0), min(canvas.shape[0], h - y0)
    if cx1 <= cx0 or cy1 <= cy0:
        return
    region = image[y0 + cy0 : y0 + cy1, x0 + cx0 : x0 + cx1].astype(np.float32)
    a = alpha[cy0:cy1, cx0:cx1, None]
    blended = region * (1 - a) + canvas[cy0:cy1, cx0:cx1].astype(np.float32) * a
    image[y0 + cy0 : y0 + cy1, x0 + cx0 : x0 + cx1] = blended.astype(np.uint8)
    if shot.occlusion > 0:
        edge = shot.occlusion * tw
        hand = np.array(
            [[-12, -6], [edge - 10, -6], [edge, 10], [edge, th + 60], [-12, th + 60]],
            np.float32,
        )
        hand += pad
        moved = cv2.transform(hand[None], turn)[0] + (x0, y0)
        cv2.fillPoly(image, [np.round(moved).astype(np.int32)], SKIN, cv2.LINE_AA)


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
    angle: float = 0.0,
    blur: float = 0.0,
    occlusion: float = 0.0,
) -> list[Shot]:
    """Idle lead-in, then each order's ticket for ``order_seconds`` followed by an idle gap.
    ``damaged`` adds a ticket that does not decode in the first gap; ``conflict`` shows the
    last two orders' tickets together for half a second between them (no gap there).
    ``angle``, ``blur`` and ``occlusion`` (see :class:`Shot`) apply to every ticket."""

    def tickets(seconds: float, tags: list[str], damaged: bool = False) -> Shot:
        return Shot(seconds, tags, damaged, angle=angle, blur=blur, occlusion=occlusion)

    shots = [Shot(lead_seconds)]
    for i, order_id in enumerate(orders):
        last_pair = conflict and len(orders) >= 2 and i == len(orders) - 2
        shots.append(tickets(order_seconds, [order_id]))
        if last_pair:
            shots.append(tickets(0.5, [order_id, orders[i + 1]]))
            continue
        shots.append(Shot(gap_seconds))
        if damaged and i == 0:
            shots.append(tickets(1.0, ["DAMAGED"], damaged=True))
            shots.append(Shot(gap_seconds))
    return shots


def make_station_video(
    path: Path | str,
    shots: Sequence[Shot],
    *,
    fps: int = 10,
    size: tuple[int, int] = (640, 360),
    seed: int = 7,
    ticket: Ticket = "qr",
) -> dict[str, object]:
    """Encode ``shots`` as an H.264 clip at ``fps``; write and return its schedule (see the
    module docstring). The tickets drift and blur a little from frame to frame, so some frames
    of an order are sharper than others. ``ticket`` is ``qr`` (QR tags) or ``text`` (the order
    number printed, see :func:`text_tag`)."""
    if ticket not in ("qr", "text"):
        raise ValueError(f"ticket must be 'qr' or 'text', not {ticket!r}")
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
                        if ticket == "qr":
                            made = qr_tag(tag)
                            tickets[key] = _damage(made) if shot.damaged else made
                        else:
                            made = text_tag(tag)
                            tickets[key] = _smudge(made) if shot.damaged else made
                    paper = tickets[key]
                    th, tw = paper.shape[:2]
                    x = 40 + slot * (tw + 40) + (i % 6) * 3
                    y = (height - th) // 2 + (i % 3) * 2
                    defocus = 0.8 if i % 4 == 3 else 0.0  # every fourth frame a little blurred
                    if ticket == "qr" and not (shot.angle or shot.blur or shot.occlusion):
                        if defocus:
                            paper = cv2.GaussianBlur(paper, (3, 3), defocus)
                        image[y : y + th, x : x + tw] = paper
                    else:
                        _place(image, paper, x, y, shot, defocus)
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
        "ticket": ticket,
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
    parser.add_argument(
        "--ticket",
        choices=["qr", "text"],
        default="qr",
        help="QR tags, or the order number printed as text (for the OCR reader)",
    )
    parser.add_argument("--angle", type=float, default=0.0, help="tickets turned by DEG")
    parser.add_argument("--blur", type=float, default=0.0, help="defocus sigma in pixels")
    parser.add_argument(
        "--occlusion",
        type=float,
        default=0.0,
        help="fraction (0-1) of each ticket's width under a hand, from the left",
    )
    args = parser.parse_args(argv)
    if not 0.0 <= args.occlusion < 1.0 or args.blur < 0:
        parser.error("--occlusion must be in [0, 1) and --blur >= 0")
    orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    shots = default_schedule(
        orders,
        order_seconds=args.order_seconds,
        gap_seconds=args.gap_seconds,
        lead_seconds=args.lead_seconds,
        damaged=args.damaged,
        conflict=args.conflict,
        angle=args.angle,
        blur=args.blur,
        occlusion=args.occlusion,
    )
    schedule = make_station_video(args.output, shots, fps=args.fps, ticket=args.ticket)
    print(
        f"wrote {args.output} ({schedule['frames']} frames at {args.fps} fps) and "
        f"{args.output}.json",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
