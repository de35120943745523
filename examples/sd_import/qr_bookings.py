"""QR clips: the booking a QR code's text holds, and the ``scan_qr`` step that reads it.

A QR clip's booking is kept in the ledger namespace :data:`QR_NAMESPACE`, so a later insertion
can attach new videos to a jump whose QR clip was imported before.
"""

from __future__ import annotations

import json
from typing import Any

from media_limits import limits
from sd_inputs import card_file
from sd_keys import identity
from sd_share import shared_dir_of, shared_file

from framepipe import StepContext
from framepipe.confined import LinkRefusedError
from framepipe.errors import MediaError
from framepipe.media import decode_qr

__all__ = ["QR_NAMESPACE", "parse_booking", "scan_qr"]

QR_NAMESPACE = "sd_import.qr"


def parse_booking(text: str) -> dict[str, str] | None:
    """The booking in a QR code's text, or None if the text is not a booking.

    Accepted: ``{"booking_id": "...", "passenger": "..."}`` (JSON) or ``BOOKING;PASSENGER``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if (
            isinstance(data, dict)
            and isinstance(data.get("booking_id"), str)
            and isinstance(data.get("passenger"), str)
            and data["booking_id"].strip()
            and data["passenger"].strip()
        ):
            return {
                "booking_id": data["booking_id"].strip(),
                "passenger": data["passenger"].strip(),
            }
        return None
    booking, sep, passenger = text.partition(";")
    if sep and booking.strip() and passenger.strip():
        return {"booking_id": booking.strip(), "passenger": passenger.strip()}
    return None


def scan_qr(ctx: StepContext, path: str) -> dict[str, Any]:
    """Read a QR code from a copied small file; a booking is recorded with the clip. A file
    that was not copied (vanished, refused) is not scanned: nothing is returned. A file that
    cannot be read as a video (a recording cut short after a second, random bytes) holds no
    QR code: ``none``, with the reason, so ``assign`` takes it as a video of its jump, which
    ``extract_metadata`` reports as not rendered; the rest of the card imports."""
    copied = ctx.data.get(f"copied/{path}", {})
    if copied.get("status") != "copied":
        return {}
    dest = copied["dest"]
    # The whole clip is scanned: a second, different code further on makes it ambiguous.
    try:
        with shared_file(shared_dir_of(ctx), dest) as local:
            result = decode_qr(
                local,
                every=2,
                progress=lambda pct: ctx.progress(pct, f"QR scan of {path}"),
                **limits(),
            )
    except LinkRefusedError as exc:  # replaced by a link since it was copied
        return {f"qr/{path}": {"status": "refused", "error": f"{path}: {exc}"}}
    except MediaError as exc:
        ctx.log.warning("%s holds no QR code: it cannot be read as a video: %s", path, exc.reason)
        return {f"qr/{path}": {"status": "none", "error": exc.reason}}
    out: dict[str, Any]
    if result is None:
        out = {"status": "none"}
    elif not result.readable:
        out = {"status": "unreadable", "frames": list(result.unreadable_frames[:10])}
    elif result.ambiguous:
        out = {"status": "ambiguous", "texts": result.texts}
    else:
        booking = parse_booking(result.texts[0])
        if booking is None:
            out = {"status": "unrecognised", "text": result.texts[0][:200]}
        else:
            out = {"status": "booking", **booking}
            entry = card_file(ctx, path)
            meta = {
                "path": path,
                "card_id": ctx.inputs["card_id"],
                "dest": dest,
                "kind": "qr",
                **booking,
            }
            ctx.ledger.record(identity(entry), size=entry["size"], meta=meta)
            ctx.get_ledger(QR_NAMESPACE).record(identity(entry), size=entry["size"], meta=booking)
    return {f"qr/{path}": out}
