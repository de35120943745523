"""The SD-card import pipeline: new files only, QR clips first, bookings from the
QR codes, every video rendered with intro, watermark and splash screen.

One execution per card insertion. Its inputs come from the backend (``backend.py``) when a
detector sends ``sd:file_list``: ``hub`` (the service's detector hub), ``session_id``,
``detector_id``, ``card_id``, ``files`` (``path``, ``size``, ``mtime``, ``fingerprint`` each),
``shared_dir`` (where copies land, as the backend sees it) and ``small_limit`` (bytes; smaller
files are QR-clip candidates). Optional: ``intro`` and ``splash`` (videos, as local paths or
object keys; default: title cards made here).

The inputs are declared (:class:`SdImportInputs`), so whoever submits an execution, the
backend's detector handler or a client of ``POST /api/executions``, is checked before it
exists: a malformed file list, card id or limit is refused naming the field, and
``shared_dir`` (a :data:`~framepipe.jobs.inputs.LocalPath`) and a local ``intro`` or
``splash`` must lie inside the submitter's ``input_roots``. Over HTTP those are the setting
``FRAMEPIPE_INPUT_ROOTS`` (none by default), so a client cannot point an import at a folder of
its choice and have it read; the backend's own submissions are confined to its shared folder
(and the folders of the intro and splash it was configured with). Every step reads those paths
through :func:`framepipe.jobs.inputs.local_input`, which checks them against the execution's
recorded roots again.

Steps (``*`` = one instance per file)::

    plan            the ledger drops what was imported, and what another import that has
                    not ended lists (it renders those); copy* -> scan_qr* for every new small
                    file, and copy* -> extract_metadata* -> render* for every new video, its
                    copy run after assign: every step plan can know of exists from the start,
                    so the progress bar does not stand still while work is added
    copy*           the detector copies one file into the shared folder; verified here
                    (size, fingerprint). A video is copied only once assign gave it a
                    booking (a held one is not copied). Copies are chained (each waits for
                    the one before): the card reader copies one file at a time anyway, and a
                    chain holds one engine slot, not one per file, so renders get slots and
                    rendering starts while later files are still copying
    scan_qr*        decode_qr on a copied small file: a booking, nothing, or a problem
    assign          (after every scan) files in time order, each QR clip starting a jump; the
                    jump's new videos get its booking (a small one, copied already, gets its
                    extract_metadata* -> render* here)
    extract_metadata*, render*
                    render uploads, records the video as imported (ledger ``sd_import``) and
                    its copy in the ledger namespace sd_import.rendered (object key, size,
                    SHA-256). A video that cannot be read (no video, cut short) is a problem
                    of that file: reported, not rendered, the rest of the card imports
    retention       (after every render) with a retention policy (input ``retention``,
                    retention.py): release* for each rendered copy, of any import, now due
    release*        removes one copy once its upload is verified (retention.release_copy)
    summary         (at the end) what was imported, held, removed and kept, and why

Copies land in the shared folder at ``<card_id>/<folders>/<stem>-<hash><suffix>``
(:func:`card_paths.copy_dest`: the hash is of the file's size and content fingerprint), so a
card used again whose file of the same name holds another video (a camera that restarted its
numbering) never overwrites the earlier import's copy, nor its record in ``sd_import.rendered``
(keyed by the copy); the same file inserted again has the same name and is not copied twice.

The ledger (``fp_ledger``, namespace ``sd_import``: the original import service's ``imported_file``
table) holds a video once it is rendered and uploaded (QR clips: once their code is read; namespace
``sd_import.qr`` keeps each QR clip's booking so a later insertion can attach new videos to a jump
whose QR clip was imported before). Entries are committed with the step's completion, so a video
copied but not rendered (a failed or interrupted import, an unreadable file) is never taken as
imported: the next insertion imports it again. A file is identified by its size and content
fingerprint, not its path: a card mounted elsewhere is the same card.

Files another import lists that has not ended (pending, running, interrupted or failed: one a
later insertion of the card resumes, ``backend.py``) are left to it (``plan.taken``, the
summary's ``in_other_imports``), so no video is rendered twice.

Files held (not imported or copied, considered again at the next insertion): videos with no QR
clip before them, after an unreadable or unrecognised QR clip, or after two QR clips of
different bookings. Files that vanished between listing and copy are reported ``missing``;
videos that cannot be read ``not_rendered`` in their booking, with the reason in the problems.

The shared folder is read only through :func:`shared_file`: every copy is opened below
``shared_dir`` without following a symbolic link at any level
(:func:`framepipe.confined.open_beneath`), and what reads it (the size and fingerprint check,
the QR scan, probing, rendering) reads that opened file and nothing else. A link (or anything
but a regular file) where a copy should be, planted by whoever can write to the share, is
never followed: the copy step reports the file ``refused`` with the reason naming the link
(relative to the shared folder; neither the size nor the content of what it points to is
read or told), does not retry it, and the card's other files import; a QR candidate refused
this way holds the videos after it like an unreadable QR clip. The detector refusing a copy
(``code: refused``, e.g. a planted ``.part`` link on its side) is reported the same way.
Paths in ``files`` must pass :func:`card_paths.card_path` (checked when an execution is
submitted, and :func:`framepipe.confined.relative_parts` again by ``plan``, which fails at
once naming the entry).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from card_paths import copy_dest
from copy_retries import copy_retries_from_env
from pydantic import BaseModel, ConfigDict, Field
from retention import REMOVED, RENDERED, Retention, due_copies, referenced_copies, release_copy
from sd_imports import SESSIONS, UNENDED
from sd_messages import CARD_ID_PATTERN, FileEntry

from framepipe import Pipeline, StepContext
from framepipe.config import load_settings
from framepipe.confined import LinkRefusedError, fd_path, open_beneath, relative_parts
from framepipe.errors import DetectorError, InvalidInputError, MediaError
from framepipe.jobs.inputs import LocalPath, LocalPathOrKey, copy_local_file, local_input
from framepipe.jobs.keys import step_key
from framepipe.jobs.ledger import content_hash, file_fingerprint
from framepipe.media import concat, decode_qr, limits_from, probe, stitch, watermark
from framepipe.media.frames import write_image
from framepipe.server.detector import get_hub

__all__ = [
    "CARD_ID_PATTERN",
    "QR_NAMESPACE",
    "FileEntry",
    "SdImportInputs",
    "output_key",
    "parse_booking",
    "sd_import",
    "shared_dir_of",
    "shared_file",
    "title_card",
]

QR_NAMESPACE = "sd_import.qr"
COPY_RETRIES = copy_retries_from_env()
"""The ``copy`` step's retries: ``SD_IMPORT_COPY_RETRIES``, ``SD_IMPORT_COPY_RETRY_DELAY``."""


class SdImportInputs(BaseModel):
    """The inputs of one import (see the module): checked at submit, whoever submits."""

    model_config = ConfigDict(extra="forbid")
    hub: str = Field(min_length=1, max_length=200, description="The detector hub's id.")
    session_id: str = Field(min_length=1, max_length=200)
    detector_id: str | None = Field(None, max_length=200)
    card_id: str = Field(min_length=1, max_length=200, pattern=CARD_ID_PATTERN)
    label: str = Field("", max_length=1000)
    shared_dir: LocalPath = Field(
        description="The shared folder as the backend sees it; inside the submitter's input_roots."
    )
    small_limit: int = Field(
        50 * 1024 * 1024, ge=0, description="Files smaller than this (bytes) are QR candidates."
    )
    files: list[FileEntry] = Field(max_length=100_000)
    intro: LocalPathOrKey | None = None
    splash: LocalPathOrKey | None = None
    retention: Retention | None = Field(
        None, description="When copies leave the shared folder (retention.py); None keeps them."
    )


sd_import = Pipeline(
    "sd_import", description="SD-card import of tandem-jump videos", inputs=SdImportInputs
)


# -- helpers ---------------------------------------------------------------------------------


def identity(entry: Mapping[str, Any]) -> str:
    """A file's ledger identity: its size and content fingerprint."""
    return f"{int(entry['size'])}:{entry['fingerprint']}"


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


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._") or "x"


def output_key(booking_id: str, dest: str, entry: Mapping[str, Any]) -> str:
    """The object key of the rendered video of the copy ``dest`` (:func:`card_paths.copy_dest`:
    ``<card_id>/<folders>/<stem>-<hash><suffix>``, or ``<card_id>/<path>`` before, in the
    shared folder) of the card file ``entry``: ``bookings/<booking>/<stem>-<hash>.mp4``
    (``bookings/B1001/GX000002-3f09c1d2ab47.mp4``).

    The hash is the one step keys use (:func:`framepipe.jobs.keys.step_key`: BLAKE2b of the
    canonical JSON, 12 hex digits) of the video's identity: its copy ``dest`` and its
    :func:`identity` (size and content fingerprint). So the same file of the same card always
    renders to the same key (a retried render replaces its own upload, nothing else), and two
    videos of one booking never share a key, whether they differ by folder
    (``100GOPRO/GX000002.MP4`` and ``101GOPRO/GX000002.MP4``), by card (two cameras' cards
    for one jump) or by content. The stem, the card file's name without its extension (ASCII
    letters, digits, ``_ . -``; other runs become ``_``), only makes the key readable."""
    digest = step_key("output", {"copy": dest, "identity": identity(entry)}).partition(":")[2]
    stem = PurePosixPath(str(entry.get("path") or dest)).stem  # the card's name, not the copy's
    return f"bookings/{_safe(booking_id)}/{_safe(stem)}-{digest}.mp4"


def title_card(
    dst: Path, lines: Sequence[str], size: tuple[int, int], *, fps: float = 25, seconds: float = 1.0
) -> Path:
    """A still title card (white text on dark blue) of ``seconds`` as an H.264 MP4."""
    width, height = size
    image = np.zeros((height, width, 3), np.uint8)
    image[:] = (90, 40, 20)
    scale = max(0.3, height / 360)
    thickness = max(1, round(2 * scale))
    step = int(40 * scale)
    top = height // 2 - step * (len(lines) - 1) // 2
    for i, line in enumerate(lines):
        (tw, _), _ = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
        cv2.putText(
            image,
            line,
            (max(0, (width - tw) // 2), top + i * step),
            cv2.FONT_HERSHEY_SIMPLEX,
            scale,
            (255, 255, 255),
            thickness,
            cv2.LINE_AA,
        )
    still = write_image(dst.with_suffix(".png"), image)
    count = max(1, round(seconds * fps))
    return stitch([still] * count, dst, fps=fps, preset="ultrafast", **limits())


def limits(*, length: bool = True) -> dict[str, Any]:
    """The limits these steps give the media functions: the settings ``media_max_pixels``,
    ``media_max_duration`` and ``media_max_frame_count`` (``FRAMEPIPE_MEDIA_MAX_*``; not the
    length ones for ``probe``, which takes none), read when a step runs."""
    return limits_from(load_settings(), length=length)


def shared_dir_of(ctx: StepContext) -> Path:
    """The execution's shared folder, checked against its recorded ``input_roots`` again
    (:func:`~framepipe.jobs.inputs.local_input`: a
    :class:`~framepipe.errors.PathNotAllowedError` outside them)."""
    value = ctx.inputs.get("shared_dir")
    if not isinstance(value, str):
        raise InvalidInputError("the shared folder is missing", where="inputs.shared_dir")
    folder = local_input(ctx, value, where="inputs.shared_dir", declared=True)
    if folder is None:
        raise InvalidInputError("must be an absolute local path", where="inputs.shared_dir")
    return folder


def _asset(ctx: StepContext, name: str, work: Path) -> Path | None:
    """The ``intro`` or ``splash`` input in ``work``: a local file allowed by the execution's
    roots (copied without following links) or an object; None when not given."""
    value = ctx.inputs.get(name)
    if not value:
        return None
    local = local_input(ctx, value, where=f"inputs.{name}", declared=True)
    if local is None:
        return ctx.objects.get_file(value, work / f"{name}-{PurePosixPath(value).name}")
    return copy_local_file(local, work / f"{name}-{local.name}")


@contextlib.contextmanager
def shared_file(shared_dir: str | os.PathLike[str], dest: str) -> Iterator[Path]:
    """The copy ``dest`` (relative, ``/``) in the shared folder, opened below ``shared_dir``
    without following any link, as a path naming that open file (``/proc/self/fd/N``): a
    library given it reads this file, whatever is renamed or linked in the share meanwhile.

    Raises :class:`~framepipe.confined.LinkRefusedError` naming the link (or the entry that is
    not a regular file) relative to the shared folder, ``FileNotFoundError`` when there is no
    copy; a :class:`~framepipe.errors.MediaError` about the file is raised again naming
    ``dest`` instead of the internal path (in its reason too)."""
    parts = relative_parts(dest, "dest")
    fd = open_beneath(shared_dir, parts, os.O_RDONLY, where="in the shared folder")
    try:
        path = Path(fd_path(fd))
        try:
            yield path
        except MediaError as exc:
            if exc.path != path:
                raise
            raise MediaError(dest, exc.reason.replace(str(path), dest)) from None
    finally:
        os.close(fd)


def _measure(shared_dir: Path, dest: str) -> tuple[int, str]:
    """Size and fingerprint of the copy ``dest`` (see :func:`shared_file`)."""
    with shared_file(shared_dir, dest) as local:
        return local.stat().st_size, file_fingerprint(local)


def _held_reason(ctx: StepContext, path: str) -> str:
    """Why ``assign`` held ``path`` (or why it is no video of a jump)."""
    for held in ctx.data.get("assign", {}).get("held", []):
        if held["path"] == path:
            return str(held["reason"])
    return "no booking"


def _refused(path: str, error: object) -> dict[str, Any]:
    return {f"copied/{path}": {"status": "refused", "error": f"{path}: {error}"}}


def _file(ctx: StepContext, path: str) -> dict[str, Any]:
    for entry in ctx.inputs["files"]:
        if entry["path"] == path:
            return dict(entry)
    raise KeyError(f"{path!r} is not in the card's file list")


def _spawn_processing(ctx: StepContext, path: str, after: str | None) -> None:
    """``extract_metadata`` -> ``render`` of the video ``path`` (after the step ``after``)."""
    meta = ctx.spawn_step(
        "extract_metadata", params={"path": path}, depends_on=[after] if after else None
    )
    ctx.spawn_step("render", params={"path": path}, depends_on=[meta])


def _booking_of(ctx: StepContext, path: str) -> dict[str, str] | None:
    """The booking ``assign`` gave the video ``path``; None when it is held or no video."""
    for jump in ctx.data.get("assign", {}).get("jumps", []):
        if path in jump["videos"]:
            return {"booking_id": jump["booking_id"], "passenger": jump["passenger"]}
    return None


def _session(ctx: StepContext) -> str:
    """The card session to ask and tell: that of the latest insertion of the card that found
    this import unended (ledger namespace :data:`~sd_imports.SESSIONS`, written by the
    backend), else the one it was started with."""
    entry = ctx.get_ledger(SESSIONS).get(ctx.execution_id)
    session = entry.meta.get("session_id") if entry is not None else None
    return session if isinstance(session, str) and session else str(ctx.inputs["session_id"])


def _taken(ctx: StepContext, identities: Mapping[str, str]) -> dict[str, str]:
    """Paths (of ``identities``: path -> identity) that another import of this card that has
    not ended (:data:`~sd_imports.UNENDED`) lists too, each with that import's id: it renders
    them, not this one. A read of the state store."""
    wanted = {ident: path for path, ident in identities.items()}
    found: dict[str, str] = {}
    for info in ctx.executions(status=UNENDED, limit=1_000_000):
        if (
            info.id == ctx.execution_id
            or info.inputs.get("card_id") != ctx.inputs.get("card_id")
            or not isinstance(info.inputs.get("files"), list)
        ):
            continue
        for entry in info.inputs["files"]:
            with contextlib.suppress(KeyError, TypeError, ValueError):
                path = wanted.get(identity(entry))
                if path is not None:
                    found.setdefault(path, info.id)
    return found


# -- steps -----------------------------------------------------------------------------------


@sd_import.step(weight=0.5)
def plan(ctx: StepContext) -> dict[str, Any]:
    """Drop what the ledger holds and what another unfinished import renders; copy the new
    small files first (QR candidates, each then scanned), then, once ``assign`` has told their
    bookings, each new video: every step the import will run that plan can know of exists
    from here on, so its progress does not stand still while work is added."""
    shared_dir_of(ctx)  # an import that may not read its shared folder stops here
    files = ctx.inputs.get("files")
    if not isinstance(files, list):
        raise TypeError("input 'files' must be the card's file list")
    for n, entry in enumerate(files):
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("path"), str)
            or not isinstance(entry.get("size"), int)
            or not isinstance(entry.get("fingerprint"), str)
        ):
            raise TypeError(f"file list entry {n} ({entry!r}) needs path, size, fingerprint")
        relative_parts(entry["path"], f"inputs.files[{n}].path")
    limit = int(ctx.inputs.get("small_limit", 50 * 1024 * 1024))
    ids = {e["path"]: identity(e) for e in files}
    new_ids = set(ctx.ledger.filter_new(ids.values()))
    qr_ledger = ctx.get_ledger(QR_NAMESPACE)
    known_qr: dict[str, dict[str, Any]] = {}
    for path, ident in ids.items():
        if ident not in new_ids:
            entry = qr_ledger.get(ident)
            if entry is not None:
                known_qr[path] = dict(entry.meta)
    fresh = [e for e in files if ids[e["path"]] in new_ids]
    taken = _taken(ctx, {e["path"]: ids[e["path"]] for e in fresh})
    new = [e for e in fresh if e["path"] not in taken]
    # Every QR candidate is scanned, also one another import lists: the bookings of the
    # videos after it depend on it, and a scan is cheap.
    small = [e for e in fresh if e["size"] < limit]
    previous: str | None = None
    for e in small:  # one after another: the card reader copies one file at a time anyway
        previous = ctx.spawn_step(
            "copy", params={"path": e["path"]}, depends_on=[previous] if previous else None
        )
        ctx.spawn_step("scan_qr", params={"path": e["path"]}, depends_on=[previous])
    previous = None
    for e in sorted(new, key=lambda e: (float(e.get("mtime", 0)), e["path"])):
        if e["size"] < limit:
            continue  # a small video's processing is spawned by assign
        previous = ctx.spawn_step(
            "copy",
            params={"path": e["path"], "video": True},
            depends_on=[previous] if previous else ["assign"],
        )
        _spawn_processing(ctx, e["path"], previous)
    ctx.progress(100, f"{len(new)} new of {len(files)} files, {len(small)} small")
    return {
        "plan": {
            "card_id": ctx.inputs.get("card_id"),
            "files": len(files),
            "new": [e["path"] for e in new],
            "small": [e["path"] for e in small],
            "known_qr": known_qr,
            "taken": taken,
        }
    }


@sd_import.step(retries=COPY_RETRIES.retries, retry_delay=COPY_RETRIES.delay, weight=1.0)
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
    wrong fingerprint) raises, and the step is retried (:data:`COPY_RETRIES`)."""
    entry = _file(ctx, path)
    if video and booking is None and _booking_of(ctx, path) is None:
        ctx.log.info("%s is held (%s): not copied", path, _held_reason(ctx, path))
        return {}
    shared_dir = await asyncio.to_thread(shared_dir_of, ctx)  # before the detector copies
    session_id = await asyncio.to_thread(_session, ctx)
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
        got_size, got_fingerprint = await asyncio.to_thread(_measure, shared_dir, dest)
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
        _spawn_processing(ctx, path, ctx.step_key)
    elif not video:  # a QR candidate (plan spawned its scan too: the same step)
        ctx.spawn_step("scan_qr", params={"path": path}, depends_on=[ctx.step_key])
    ctx.progress(100, f"copied {path}")
    return {f"copied/{path}": {"status": "copied", "dest": dest, "size": size}}


@sd_import.step(weight=0.5)
def scan_qr(ctx: StepContext, path: str) -> dict[str, Any]:
    """Read a QR code from a copied small file; a booking is recorded with the clip. A file
    that was not copied (vanished, refused) is not scanned: nothing is returned."""
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
            entry = _file(ctx, path)
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


@sd_import.step(depends_on=["plan", "scan_qr"], weight=0.5)
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
            _spawn_processing(ctx, path, None)
    return {
        "assign": {
            "jumps": [j for j in jumps if j["videos"] or j["qr_clip"] not in known_qr],
            "held": held,
            "problems": problems,
        }
    }


@sd_import.step(weight=0.5)
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


@sd_import.step(weight=3.0)
def render(
    ctx: StepContext, path: str, booking_id: str | None = None, passenger: str | None = None
) -> dict[str, Any]:
    """Intro + the video watermarked with passenger and booking + splash screen, uploaded to
    ``bookings/<booking>/<file>-<hash>.mp4`` (:func:`output_key`: one key per video), and the
    video recorded as imported (ledger, committed with this step: a video that was copied but
    never rendered is imported again at the next insertion).

    The booking is the one ``assign`` gave the video (``booking_id`` and ``passenger`` are
    those of a render spawned with them, before videos were planned). A video with no booking,
    no copy or no metadata (held, vanished, unreadable) is not rendered: nothing is returned,
    or ``render/<path>`` with the error when the video cannot be decoded here (a problem of
    this file only; the rest of the card imports)."""
    booking = (
        {"booking_id": booking_id, "passenger": passenger}
        if booking_id is not None and passenger is not None
        else _booking_of(ctx, path)
    )
    copied = ctx.data.get(f"copied/{path}", {})
    meta = ctx.data.get(f"meta/{path}", {})
    if booking is None or copied.get("status") != "copied" or "width" not in meta:
        return {}
    booking_id, passenger = booking["booking_id"], booking["passenger"]
    dest = copied["dest"]
    work = ctx.tempdir()
    size = (meta["width"] - meta["width"] % 2, meta["height"] - meta["height"] % 2)
    fps = float(meta["fps"]) or 25.0
    intro = _asset(ctx, "intro", work) or title_card(
        work / "intro.mp4", ["Tandem jump", passenger], size, fps=fps
    )
    splash = _asset(ctx, "splash", work) or title_card(
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
    entry = _file(ctx, path)
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


@sd_import.step(depends_on=["assign", "copy", "scan_qr", "extract_metadata", "render"], weight=0.1)
def retention(ctx: StepContext) -> dict[str, Any]:
    """The shared folder's retention sweep (``retention.py``): one ``release`` step for every
    copy, of this import or an earlier one, that the execution's policy says may go now."""
    raw = ctx.inputs.get("retention")
    policy = Retention.model_validate(raw) if raw else Retention()
    if policy.keeps_all:
        return {"retention": {"policy": policy.describe(), "due": []}}
    shared_dir = shared_dir_of(ctx)
    due = due_copies(ctx.get_ledger(RENDERED).entries(), policy, shared_dir, time.time())
    for entry in due:
        ctx.spawn_step("release", params={"copy_path": entry.identity})
    ctx.log.info("retention (%s): %d copies due", policy.describe(), len(due))
    return {"retention": {"policy": policy.describe(), "due": [e.identity for e in due]}}


@sd_import.step(weight=0.2)
def release(ctx: StepContext, copy_path: str) -> dict[str, Any]:
    """Remove one copy from the shared folder once its upload is verified
    (:func:`retention.release_copy`); logged, and recorded in the ledger namespace
    ``sd_import.removed``. A copy that is not proven safe is kept, with the reason."""
    shared_dir = shared_dir_of(ctx)
    relative_parts(copy_path, "copy_path")
    referenced = referenced_copies(ctx)
    outcome = release_copy(
        shared_dir=shared_dir,
        dest=copy_path,
        entry=ctx.get_ledger(RENDERED).get(copy_path),
        objects=ctx.objects,
        referenced_by=referenced.get(copy_path),
        work=ctx.tempdir(),
    )
    if outcome["status"] == "removed":
        ctx.log.info(
            "removed %s from the shared folder: %s is in the object store (%d bytes, SHA-256 %s)",
            copy_path,
            outcome["object_key"],
            outcome["object_size"],
            outcome["sha256"],
        )
        ctx.get_ledger(REMOVED).record(
            copy_path, size=outcome["size"], meta={**outcome, "execution_id": ctx.execution_id}
        )
    elif outcome["status"] == "kept":
        ctx.log.warning("kept %s in the shared folder: %s", copy_path, outcome["reason"])
    return {f"released/{copy_path}": outcome}


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
            rendered = data.get(f"render/{video}", {})
            error = data.get(f"meta/{video}", {}).get("error") or rendered.get("error")
            if error:
                b["not_rendered"].append(video)
                problems.append(f"{video}: not imported: {error}")
            elif "key" in rendered:
                b["outputs"].append(rendered["key"])
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
            _session(ctx),
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


@sd_import.step(depends_on=["retention", "release"], weight=0.1)
def summary(ctx: StepContext) -> dict[str, Any]:
    """What this insertion imported, held and found wrong; told to the detector too."""
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
    if not data["plan"]["new"]:
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
        "bookings": bookings,
        "held": assigned["held"],
        "problems": problems,
        "removed": sorted(k for k, v in released.items() if v["status"] == "removed"),
        "kept": {k: v["reason"] for k, v in sorted(released.items()) if v["status"] == "kept"},
    }
    _tell_detector(ctx, status, result)
    return {"summary": result}
