"""The ``copy`` step: the backend asks the card's detector for one file and checks the copy.

The detector copies (``sd_copy.py``); this side names where the copy goes
(:func:`card_paths.copy_dest`), asks through the card's session (:func:`sd_imports.session_of`)
and verifies the copy it finds in the shared folder (size, fingerprint) before anything reads it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from card_paths import copy_dest
from sd_imports import session_of
from sd_inputs import card_file
from sd_jumps import booking_of, held_reason
from sd_plan import spawn_processing
from sd_render import imported_elsewhere
from sd_share import measure_copy, shared_dir_of

from framepipe import StepContext
from framepipe.confined import LinkRefusedError
from framepipe.errors import DetectorError
from framepipe.server.detector import get_hub

__all__ = ["copy"]


def _refused(path: str, error: object) -> dict[str, Any]:
    return {f"copied/{path}": {"status": "refused", "error": f"{path}: {error}"}}


async def copy(
    ctx: StepContext, path: str, booking: dict[str, str] | None = None, video: bool = False
) -> dict[str, Any]:
    """Ask the detector for one file; verify the copy; spawn what comes next.

    A ``video`` (spawned by ``plan``, run after ``assign``) is copied only when ``assign``
    gave it a booking; a held one is not copied (nothing is returned for it). ``booking``
    is that of a copy spawned with it (by ``assign`` before videos were planned).

    A file the detector no longer finds is ``missing`` (not retried: listing it again is the
    detector's job). A copy the detector refuses, or one that is a link (or not a regular
    file) in the shared folder, is ``refused`` with the reason (not retried: a person must
    look at the share). Anything else that goes wrong (the detector gone, a short copy, a
    wrong fingerprint) raises, and the step is retried (``COPY_RETRIES`` in ``sd_pipeline.py``)."""
    entry = card_file(ctx, path)
    if video and booking is None and booking_of(ctx, path) is None:
        ctx.log.info("%s is held (%s): not copied", path, held_reason(ctx, path))
        return {}
    if video or booking is not None:
        elsewhere = await asyncio.to_thread(imported_elsewhere, ctx, path)
        if elsewhere is not None:  # a resumed import: another imported it meanwhile
            ctx.log.info("%s was imported by %s meanwhile: not copied", path, elsewhere)
            return {f"copied/{path}": elsewhere}
    shared_dir = await asyncio.to_thread(shared_dir_of, ctx)  # before the detector copies
    session_id = await asyncio.to_thread(session_of, ctx)
    hub = get_hub(ctx.inputs["hub"])
    size = int(entry["size"])
    # Named by its content too: a reused card's new file of the same name lands beside the
    # earlier import's copy, never over it (card_paths.copy_dest).
    dest = copy_dest(ctx.inputs["card_id"], path, size, entry["fingerprint"])

    def on_progress(message: Mapping[str, Any]) -> None:
        done = int(message.get("bytes", 0))
        ctx.progress(99 * done / size if size else 0, f"copying {path}")

    answer = await hub.request(
        session_id,
        {
            "type": "sd:copy_request",
            "card_id": ctx.inputs["card_id"],
            "path": path,
            "dest": dest,
            "size": size,
            "fingerprint": entry["fingerprint"],
        },
        what=f"the copy of {path}",
        on_progress=on_progress,
    )
    if not answer.get("ok"):
        if answer.get("code") == "vanished":
            ctx.log.warning("%s vanished from the card before it was copied", path)
            return {f"copied/{path}": {"status": "missing", "error": answer.get("error")}}
        if answer.get("code") == "refused":
            ctx.log.warning("the detector refused to copy %s: %s", path, answer.get("error"))
            reason = str(answer.get("error") or "no reason given").removeprefix(f"{path}: ")
            return _refused(path, f"the detector refused the copy: {reason}")
        raise DetectorError(
            f"copy of {path} failed: {answer.get('error', 'no reason given')}",
            detector_id=hub.owner(session_id),
            session_id=session_id,
        )
    try:
        got_size, got_fingerprint = await asyncio.to_thread(measure_copy, shared_dir, dest)
    except LinkRefusedError as exc:
        ctx.log.warning("the copy of %s is not read: %s", path, exc)
        return _refused(path, exc)
    except FileNotFoundError:
        raise DetectorError(
            f"says {path} was copied, but {dest} is not in the shared folder "
            "(is the shared folder the same on both sides?)",
            session_id=session_id,
        ) from None
    if got_size != size or got_fingerprint != entry["fingerprint"]:
        raise DetectorError(
            f"copy of {path} at {dest} in the shared folder does not match "
            f"the card's file (size {got_size} of {size}, or another "
            "fingerprint)",
            session_id=session_id,
        )
    if booking is not None:  # spawned by assign with its booking (an import made before)
        spawn_processing(ctx, path, ctx.step_key)
    elif not video:  # a QR candidate (plan spawned its scan too: the same step)
        ctx.spawn_step("scan_qr", params={"path": path}, depends_on=[ctx.step_key])
    ctx.progress(100, f"copied {path}")
    return {f"copied/{path}": {"status": "copied", "dest": dest, "size": size}}
