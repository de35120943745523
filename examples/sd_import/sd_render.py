"""Rendering a video: the ``extract_metadata`` step probes its copy, ``render`` makes intro +
the watermarked video + splash screen, uploads it and records it as imported."""

from __future__ import annotations

from typing import Any

from media_limits import limits
from retention import RENDERED
from sd_inputs import asset, card_file
from sd_jumps import booking_of
from sd_keys import identity, output_key
from sd_share import shared_dir_of, shared_file
from title_cards import title_card

from framepipe import StepContext
from framepipe.errors import MediaError
from framepipe.jobs.ledger import content_hash
from framepipe.media import concat, probe, watermark

__all__ = ["extract_metadata", "imported_elsewhere", "render"]


def imported_elsewhere(ctx: StepContext, path: str) -> dict[str, Any] | None:
    """``{"status": "imported_elsewhere", "execution_id", "object_key"}`` when the card file
    ``path`` was recorded as imported (ledger ``sd_import``) by another import since this one
    planned it, else None. That happens to an import resumed after it failed: a card holding
    the same clips (a mirrored or cloned card) was imported meanwhile. Its ``copy`` and
    ``render`` then do nothing for the file (not copied, not rendered a second time)."""
    found = ctx.ledger.get(identity(card_file(ctx, path)))
    if found is None or found.execution_id == ctx.execution_id:
        return None
    return {
        "status": "imported_elsewhere",
        "execution_id": found.execution_id,
        "object_key": found.meta.get("object_key"),
    }


def _record_copy_rendered_elsewhere(ctx: StepContext, path: str, dest: str) -> None:
    """Record this import's copy ``dest`` of the card file ``path``, which another import
    rendered and uploaded, as rendered (ledger ``sd_import.rendered``, committed with this
    step) with that import's object, so the shared folder's retention removes it as any
    rendered copy (verified against that object, due from when it was uploaded). Without that
    import's own record of the upload (its object's size and SHA-256) nothing is recorded and
    the copy is kept, as an unverifiable one must be."""
    found = ctx.ledger.get(identity(entry := card_file(ctx, path)))
    rendered = ctx.get_ledger(RENDERED)
    upload = rendered.get(str(found.meta.get("dest"))) if found is not None else None
    if upload is None:
        ctx.log.warning("%s: the upload of the import that rendered it is not recorded: kept", dest)
        return
    rendered.record(
        dest,
        size=entry["size"],
        meta={
            "object_key": upload.meta["object_key"],
            "object_size": upload.meta["object_size"],
            "sha256": upload.meta["sha256"],
            "booking_id": upload.meta.get("booking_id"),
            "uploaded_at": upload.meta.get("uploaded_at", upload.imported_at),
            "size": entry["size"],
            "fingerprint": entry["fingerprint"],
            "card_id": ctx.inputs["card_id"],
            "path": path,
            "rendered_by": upload.execution_id,
        },
    )


def extract_metadata(ctx: StepContext, path: str) -> dict[str, Any]:
    """Probe the copied video. A video that was not copied (held, vanished, refused) is not
    probed: nothing is returned. A copy that cannot be read as a video (a recording cut
    short, a file that is no video) is a problem of this file only: ``meta/<path>`` holds
    the error, it is not rendered, and the rest of the card imports."""
    copied = ctx.data.get(f"copied/{path}", {})
    if copied.get("status") != "copied":
        return {}
    try:
        with shared_file(shared_dir_of(ctx), copied["dest"]) as local:
            info = probe(local, **limits(length=False))
    except MediaError as exc:
        ctx.log.warning("%s cannot be read as a video: %s", path, exc.reason)
        return {f"meta/{path}": {"error": f"cannot be read as a video: {exc.reason}"}}
    width, height = info.display_size
    return {
        f"meta/{path}": {
            "duration": info.duration,
            "fps": info.fps,
            "frames": info.frames,
            "width": width,
            "height": height,
            "size": info.size,
            "video_codec": info.video_codec,
        }
    }


def render(
    ctx: StepContext, path: str, booking_id: str | None = None, passenger: str | None = None
) -> dict[str, Any]:
    """Intro + the video watermarked with passenger and booking + splash screen, uploaded to
    ``bookings/<booking>/<file>-<hash>.mp4`` (:func:`sd_keys.output_key`: one key per video),
    and the video recorded as imported (ledger, committed with this step: a video that was
    copied but never rendered is imported again at the next insertion).

    The booking is the one ``assign`` gave the video (``booking_id`` and ``passenger`` are
    those of a render spawned with them, before videos were planned). A video with no booking,
    no copy or no metadata (held, vanished, unreadable) is not rendered: nothing is returned,
    or ``render/<path>`` with the error when the video cannot be decoded here (a problem of
    this file only; the rest of the card imports)."""
    booking = (
        {"booking_id": booking_id, "passenger": passenger}
        if booking_id is not None and passenger is not None
        else booking_of(ctx, path)
    )
    copied = ctx.data.get(f"copied/{path}", {})
    meta = ctx.data.get(f"meta/{path}", {})
    if booking is None or copied.get("status") != "copied" or "width" not in meta:
        return {}
    elsewhere = imported_elsewhere(ctx, path)
    if elsewhere is not None:  # rendered by another import since this one was copied
        ctx.log.info("%s was imported by %s meanwhile: not rendered again", path, elsewhere)
        _record_copy_rendered_elsewhere(ctx, path, copied["dest"])
        return {f"render/{path}": elsewhere}
    booking_id, passenger = booking["booking_id"], booking["passenger"]
    dest = copied["dest"]
    work = ctx.tempdir()
    size = (meta["width"] - meta["width"] % 2, meta["height"] - meta["height"] % 2)
    fps = float(meta["fps"]) or 25.0
    intro = asset(ctx, "intro", work) or title_card(
        work / "intro.mp4", ["Tandem jump", passenger], size, fps=fps
    )
    splash = asset(ctx, "splash", work) or title_card(
        work / "splash.mp4", ["Thank you!", f"Booking {booking_id}"], size, fps=fps
    )
    ctx.progress(10, "title cards")
    try:
        with shared_file(shared_dir_of(ctx), dest) as src:
            marked = watermark(
                src,
                work / "marked.mp4",
                text=f"{passenger} | {booking_id}",
                position="bottom-left",
                margin=4,
                preset="ultrafast",
                progress=lambda pct: ctx.progress(10 + 0.45 * pct, "watermark"),
                **limits(),
            )
    except MediaError as exc:
        if str(exc.path) != dest:
            raise  # not the video's own fault: fail the step, to be retried
        ctx.log.warning("%s cannot be rendered: %s", path, exc.reason)
        return {f"render/{path}": {"error": f"cannot be rendered: {exc.reason}"}}
    final = concat(
        [intro, marked, splash],
        work / "final.mp4",
        width=size[0],
        height=size[1],
        fps=fps,
        preset="ultrafast",
        progress=lambda pct: ctx.progress(55 + 0.4 * pct, "intro + splash"),
        **limits(),
    )
    entry = card_file(ctx, path)
    key = output_key(booking_id, dest, entry)
    sha256 = content_hash(final)
    info = ctx.objects.put_file(key, final)
    ctx.ledger.record(  # imported: only now, with this step's completion
        identity(entry),
        size=entry["size"],
        meta={
            "path": path,
            "card_id": ctx.inputs["card_id"],
            "dest": dest,
            "kind": "video",
            "booking_id": booking_id,
            "passenger": passenger,
            "object_key": key,
        },
    )
    ctx.get_ledger(RENDERED).record(  # committed with this step: only a finished upload counts
        dest,
        size=entry["size"],
        meta={
            "object_key": key,
            "object_size": info.size,
            "sha256": sha256,
            "size": entry["size"],
            "fingerprint": entry["fingerprint"],
            "card_id": ctx.inputs["card_id"],
            "path": path,
            "booking_id": booking_id,
        },
    )
    ctx.progress(100, f"uploaded {key}")
    return {
        f"render/{path}": {
            "key": key,
            "size": info.size,
            "sha256": sha256,
            "booking_id": booking_id,
        }
    }
