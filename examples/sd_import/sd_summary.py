"""The ``summary`` step: what an insertion imported, held and found wrong, kept in the
execution's data and told to the card's detector (``sd:status``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sd_imports import session_of

from framepipe import StepContext
from framepipe.server.detector import get_hub

__all__ = ["summary"]


def _bookings(
    data: Mapping[str, Any], jumps: Sequence[Mapping[str, Any]], problems: list[str]
) -> dict[str, dict[str, Any]]:
    """Each booking's videos, outputs, ``missing`` and ``not_rendered`` videos, from the
    execution's ``data``; a video that could not be read is added to ``problems``."""
    bookings: dict[str, dict[str, Any]] = {}
    for jump in jumps:
        b = bookings.setdefault(
            jump["booking_id"],
            {
                "passenger": jump["passenger"],
                "videos": [],
                "outputs": [],
                "missing": [],
                "not_rendered": [],
            },
        )
        for video in jump["videos"]:
            status = data.get(f"copied/{video}", {}).get("status")
            if status == "missing":
                b["missing"].append(video)
                continue
            if status == "refused":  # told in the problems
                continue
            b["videos"].append(video)
            if status == "imported_elsewhere":  # by another import, after this one failed
                key = data[f"copied/{video}"].get("object_key")
                b["outputs"].extend([key] if key else [])
                continue
            rendered = data.get(f"render/{video}", {})
            error = data.get(f"meta/{video}", {}).get("error") or rendered.get("error")
            if error:
                b["not_rendered"].append(video)
                problems.append(f"{video}: not imported: {error}")
            elif "key" in rendered:
                b["outputs"].append(rendered["key"])
            elif rendered.get("object_key"):  # rendered by another import meanwhile
                b["outputs"].append(rendered["object_key"])
    return bookings


def _copy_problems(data: Mapping[str, Any], problems: list[str]) -> None:
    """Add each vanished or refused copy of ``data`` to ``problems``, once."""
    for key, value in data.items():
        if not key.startswith("copied/"):
            continue
        path = key.removeprefix("copied/")
        if value.get("status") == "missing":
            problem = f"{path}: vanished from the card before it was copied"
        elif value.get("status") == "refused":
            problem = f"{path}: not imported: {value['error'].removeprefix(path + ': ')}"
        else:
            continue
        if problem not in problems:
            problems.append(problem)


def _tell_detector(ctx: StepContext, status: str, result: Mapping[str, Any]) -> None:
    """Send the import's ``sd:status`` to the card's detector; a notice only: the detector may
    be gone, and nothing waits for it."""
    hub_id = ctx.inputs.get("hub")
    if not hub_id:
        return
    try:
        get_hub(hub_id).send_sync(
            session_of(ctx),
            {
                "type": "sd:status",
                "card_id": ctx.inputs.get("card_id"),
                "state": status,
                "execution_id": ctx.execution_id,
                "summary": result,
            },
        )
    except Exception as exc:
        ctx.log.info("status not sent to the detector: %s", exc)


def summary(ctx: StepContext) -> dict[str, Any]:
    """What this insertion imported, held and found wrong; told to the detector too. A file
    the detector left out (its name is not UTF-8, its path holds ``:``, it lies too deep) is a
    problem: the card needs attention, never ``imported`` or ``nothing_new`` with a video
    missing."""
    data = ctx.data
    assigned = data.get("assign", {"jumps": [], "held": [], "problems": []})
    copied = [
        k.removeprefix("copied/")
        for k, v in data.items()
        if k.startswith("copied/") and v.get("status") == "copied"
    ]
    problems = list(assigned["problems"])
    bookings = _bookings(data, assigned["jumps"], problems)
    _copy_problems(data, problems)
    skipped = [
        f"{s['path']}: not imported: the detector left it out: {s['reason']}"
        for s in ctx.inputs.get("skipped") or []
    ]
    problems.extend(skipped)
    if not data["plan"]["new"] and not skipped:
        status = "nothing_new"
    elif assigned["held"] or problems:
        status = "needs_attention"
    else:
        status = "imported"
    released = {
        k.removeprefix("released/"): v for k, v in data.items() if k.startswith("released/")
    }
    result = {
        "status": status,
        "card_id": ctx.inputs.get("card_id"),
        "copied": sorted(copied),
        "in_other_imports": data["plan"].get("taken", {}),
        "imported_elsewhere": {
            k.split("/", 1)[1]: v["execution_id"]
            for k, v in sorted(data.items())
            if k.startswith(("copied/", "render/"))
            and isinstance(v, dict)
            and v.get("status") == "imported_elsewhere"
        },
        "bookings": bookings,
        "held": assigned["held"],
        "problems": problems,
        "removed": sorted(k for k, v in released.items() if v["status"] == "removed"),
        "kept": {k: v["reason"] for k, v in sorted(released.items()) if v["status"] == "kept"},
    }
    _tell_detector(ctx, status, result)
    return {"summary": result}
