"""Jumps: the ``assign`` step groups the card's files (each QR clip starts a jump, in time
order) and gives each jump's new videos its booking; what it decided, read by later steps."""

from __future__ import annotations

from typing import Any

from sd_plan import spawn_processing

from framepipe import StepContext

__all__ = ["assign", "booking_of", "held_reason"]


def booking_of(ctx: StepContext, path: str) -> dict[str, str] | None:
    """The booking ``assign`` gave the video ``path``; None when it is held or no video."""
    for jump in ctx.data.get("assign", {}).get("jumps", []):
        if path in jump["videos"]:
            return {"booking_id": jump["booking_id"], "passenger": jump["passenger"]}
    return None


def held_reason(ctx: StepContext, path: str) -> str:
    """Why ``assign`` held ``path`` (or why it is no video of a jump)."""
    for held in ctx.data.get("assign", {}).get("held", []):
        if held["path"] == path:
            return str(held["reason"])
    return "no booking"


def assign(ctx: StepContext) -> dict[str, Any]:
    """Group the card's files into jumps (each QR clip starts one, in time order): the new
    videos of each jump get its booking (their copies, planned by ``plan``, run after this);
    those whose booking cannot be told are held."""
    plan_data = ctx.data["plan"]
    new = set(plan_data["new"])
    small = set(plan_data["small"])
    known_qr: dict[str, dict[str, str]] = plan_data["known_qr"]
    files = sorted(ctx.inputs["files"], key=lambda e: (float(e.get("mtime", 0)), e["path"]))
    jumps: list[dict[str, Any]] = []
    held: list[dict[str, str]] = []
    problems: list[str] = []
    current: dict[str, Any] | None = None  # the jump new videos belong to
    reason = "no QR clip before it"
    qr_run: list[str] = []  # QR clips in a row, no video between them
    for entry in files:
        path = entry["path"]
        scan = ctx.data.get(f"qr/{path}")
        copied = ctx.data.get(f"copied/{path}", {})
        if copied.get("status") == "missing":
            problems.append(f"{path}: vanished from the card before it was copied")
            continue
        refused = (
            copied
            if copied.get("status") == "refused"
            else (scan if scan and scan["status"] == "refused" else None)
        )
        if refused is not None:  # a QR candidate that cannot be read: as if unreadable
            problems.append(f"{path}: not imported: {refused['error'].removeprefix(path + ': ')}")
            current, qr_run = None, []
            reason = f"after {path}, which could not be read from the shared folder"
            continue
        status = scan["status"] if scan else ("booking" if path in known_qr else "none")
        if status in ("unreadable", "ambiguous", "unrecognised"):
            assert scan is not None
            detail = {
                "unreadable": "a QR code that cannot be read",
                "ambiguous": f"several QR codes ({', '.join(scan.get('texts', []))})",
                "unrecognised": f"a QR code that is no booking ({scan.get('text')!r})",
            }[status]
            problems.append(f"{path}: {detail}")
            current, qr_run = None, []
            reason = f"after {path}, which holds {detail}"
            continue
        if status == "booking":
            found = (
                {"booking_id": scan["booking_id"], "passenger": scan["passenger"]}
                if scan
                else known_qr[path]
            )
            if qr_run and current is None and reason.startswith("after two QR clips"):
                qr_run.append(path)  # more codes after a conflicting pair: still conflicting
            elif qr_run and current is not None and current["booking_id"] != found["booking_id"]:
                problems.append(
                    f"{current['qr_clip']} ({current['booking_id']}) and {path} "
                    f"({found['booking_id']}): two QR clips of different bookings "
                    "with no video between them"
                )
                if jumps and jumps[-1] is current:
                    jumps.pop()
                current = None
                reason = f"after two QR clips of different bookings ({qr_run[-1]}, {path})"
                qr_run.append(path)
            elif qr_run and current is not None:
                qr_run.append(path)  # the same code filmed twice: one jump
            else:
                current = {**found, "qr_clip": path, "videos": []}
                jumps.append(current)
                qr_run = [path]
            continue
        qr_run = []
        if path not in new:
            continue
        if current is None:
            held.append({"path": path, "reason": reason})
            continue
        current["videos"].append(path)
        if path in small:  # copied already, as a QR candidate; a larger one's copy is planned
            spawn_processing(ctx, path, None)
    return {
        "assign": {
            "jumps": [j for j in jumps if j["videos"] or j["qr_clip"] not in known_qr],
            "held": held,
            "problems": problems,
        }
    }
