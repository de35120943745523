#!/usr/bin/env python3
"""The SD-import backend: framepipe's HTTP service with the detector WebSocket and the
``sd_import`` pipeline.

    FRAMEPIPE_API_TOKEN=change-me python examples/sd_import/backend.py \\
        --shared /shared-videos --port 8000 [--small-limit 50MB]

Detectors connect to ``ws://HOST:PORT/ws/detector``; browsers open ``http://HOST:PORT/`` (the
dashboard) or ``ws://HOST:PORT/ws`` (``pipeline:progress`` and every event). The hub knows the
SD-card vocabulary only as this backend registers it (``sd_messages.py``). On ``sd:file_list``
the hub has checked the list (a malformed one is answered with ``error`` naming the entry,
``message.files[3].path``, and starts nothing: a path must be relative to the card, with
``/``, and hold no empty, ``.`` or ``..`` segment, backslash or NUL; no path may be listed
twice); the backend then starts one execution of ``sd_import`` per card insertion and answers
``sd:status`` (``importing`` with the execution id). Which imports of the card have not ended
is read from the state store (:mod:`sd_imports`), so it holds across restarts of the backend:

* a card whose import is pending or running (on this backend or on workers) is answered
  ``already_importing`` with that execution's id: the running import copies everything new,
  so nothing is lost and nothing is copied twice; it asks for its next copies through the new
  insertion's session (the one it started with may be gone);
* a card whose import stopped, ``interrupted`` (the backend stopped or crashed under it) or
  ``failed`` (a copy that never succeeded, the detector gone), has that import resumed from
  where it stopped (``importing`` with its id, ``resumed``), asking for copies through the
  new insertion's session; a new import is started as well only for files it does not list
  (its ``plan`` leaves the resumed import's files to it);
* a card the detector found in its reader when it started (``at_start``: the detector, not
  the card, is new) with no file the ledger does not hold is answered ``nothing_new`` without
  an execution: restarting a detector starts no empty import per card.

When the backend starts, every import its predecessor left ``interrupted`` (stopped or killed
under it on this machine) is resumed at once (:func:`resume_interrupted`), without waiting for
the card to be inserted again: the detectors reconnect and say which cards they still hold,
and the import asks for its next copies through the session it last used (a detector that
restarted meanwhile announces the card anew, and the import then uses that session). An
import that cannot go on (its card was removed while the backend was down) fails its copies
and is resumed by the card's next insertion, as above. ``failed`` imports are not resumed at
start: they stopped for a reason the log names. An import that fails or is cancelled is told to
its card's detector (``sd:status`` ``failed``/``cancelled`` with the error,
:func:`tell_ended_badly`), which logs it for the person at the reader.

Local files: the handler submits each import with ``input_roots`` = the shared folder (and
the folders of an ``intro`` or ``splash`` given as local paths in ``extra_inputs``), so its
steps can read no other local file; the detector supplies names relative to the card and the
share, never local paths. Imports submitted by HTTP clients (``POST /api/executions``) are
confined by the setting ``FRAMEPIPE_INPUT_ROOTS`` instead (none by default: such an import is
refused, since its ``shared_dir`` is a local folder).

Retention of the shared folder (``retention.py``): ``SHARED_VIDEOS_DELETE_AFTER_UPLOAD=true``
(``--delete-after-upload``) and/or ``SHARED_VIDEOS_RETENTION_DAYS=N`` (``--retention-days N``)
let each import remove copies whose rendered videos are verified in the object store; neither
set keeps every copy. A malformed value stops the backend naming the setting.

A failed copy is tried again ``SD_IMPORT_COPY_RETRIES`` times (4 by default), the first retry
after ``SD_IMPORT_COPY_RETRY_DELAY`` seconds (1), each further wait doubling (``copy_retries.py``);
the backend reads them where it loads the pipeline, and so does each ``framepipe worker``. A
malformed value stops the backend naming the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from copy_retries import copy_retries_from_env
from retention import Retention, retention_from_env
from sd_imports import SESSIONS, UNENDED
from sd_keys import identity
from sd_messages import CardInfo, FileEntry, FileList, register_sd_messages
from shared_root import SharedFolderError, add_shared_options, check_shared

from framepipe.config import Settings, load_settings
from framepipe.errors import ConfigError, FramepipeError
from framepipe.jobs import JobClient
from framepipe.jobs.client import ExecutionSummary
from framepipe.jobs.ledger import Ledger
from framepipe.jobs.loading import load_pipeline
from framepipe.jobs.pipeline import Pipeline
from framepipe.logs import get_logger
from framepipe.server import create_app
from framepipe.server.detector import DetectorHub, DetectorMessage

__all__ = [
    "CardLocks",
    "FileEntry",
    "FileList",
    "build_app",
    "make_hub",
    "parse_size",
    "resume_interrupted",
]

HERE = Path(__file__).resolve().parent
PIPELINE_REF = f"{HERE / 'sd_pipeline.py'}:sd_import"
IMPORTED = "sd_import"
"""The ledger namespace of what was imported (``sd_pipeline.py``: the pipeline's name)."""

_log = get_logger("sd_import.backend")


async def unended_imports(jobs: JobClient, pipeline: str, card_id: str) -> list[ExecutionSummary]:
    """The imports of ``card_id`` that have not ended (:data:`sd_imports.UNENDED`), newest
    first, from the state store: what a restarted backend finds as its predecessor left it."""
    rows = await jobs.list(status=UNENDED, pipeline=pipeline, limit=10_000, with_inputs=True)
    return [row for row in rows if (row.inputs or {}).get("card_id") == card_id]


CardLocks = collections.defaultdict[str, asyncio.Lock]
"""One lock per card id: two detectors announcing one card at once, or an announcement and
the resume at start, must not both start or resume its import."""


def card_locks() -> CardLocks:
    """Fresh :data:`CardLocks`."""
    return collections.defaultdict(asyncio.Lock)


async def resume_interrupted(jobs: JobClient, pipeline: Pipeline, locks: CardLocks) -> list[str]:
    """Resume every import of ``pipeline`` that is ``interrupted`` (see the module), each under
    its card's lock; returns their ids. One that cannot be resumed is named in a warning and
    left for its card's next insertion."""
    try:
        rows = await jobs.list(
            status=("interrupted",), pipeline=pipeline.name, limit=10_000, with_inputs=True
        )
    except FramepipeError as exc:
        _log.warning("imports left interrupted could not be listed, none resumed: %s", exc)
        return []
    resumed = []
    for row in reversed(rows):  # oldest first
        card = str((row.inputs or {}).get("card_id", ""))
        async with locks[card]:
            try:
                if (await jobs.get(row.id, with_steps=False)).status.value != "interrupted":
                    continue  # the card's insertion resumed it meanwhile
                await jobs.retry(row.id, pipeline)
            except FramepipeError as exc:
                _log.warning(
                    "import %s of card %s was left interrupted and could not be resumed: %s",
                    row.id,
                    card,
                    exc,
                )
                continue
        _log.info("import %s of card %s was left interrupted; resumed", row.id, card)
        resumed.append(row.id)
    return resumed


_ENDED_BADLY = {"execution.failed": "failed", "execution.cancelled": "cancelled"}


async def tell_ended_badly(
    jobs: JobClient, hub: DetectorHub, pipeline: Pipeline, *, poll: float = 1.0
) -> None:
    """Tell each card's detector when an import of ``pipeline`` fails or is cancelled
    (``sd:status`` ``failed`` or ``cancelled``, with its execution id and error), through the
    session it last used: the ``summary`` step that tells it otherwise never runs, and the
    person at the reader would see nothing. Reads the stored events from now on, whoever ran
    the import (this backend or a worker); a detector that is gone is not told (a notice)."""
    after = await jobs.newest_event_id()
    while True:
        page = await jobs.events(after=after, limit=1000)
        after = page.next
        for event in page:
            state = _ENDED_BADLY.get(event.type)
            if state is None or event.execution_id is None:
                continue
            try:
                info = await jobs.get(event.execution_id, with_steps=False)
                if info.pipeline != pipeline.name:
                    continue
                seen = await asyncio.to_thread(Ledger(jobs.store, SESSIONS).get, info.id)
                session = (seen.meta if seen else {}).get("session_id") or info.inputs.get(
                    "session_id"
                )
                told = isinstance(session, str) and await hub.send(
                    session,
                    {
                        "type": "sd:status",
                        "card_id": info.inputs.get("card_id"),
                        "state": state,
                        "execution_id": info.id,
                        "error": info.error,
                    },
                )
            except FramepipeError as exc:
                _log.info("the end of import %s not told: %s", event.execution_id, exc)
                continue
            if not told:
                _log.info(
                    "the end of import %s (%s) not told: its detector is not connected",
                    info.id,
                    state,
                )
        if len(page) < 1000:
            await asyncio.sleep(poll)


def parse_size(text: str) -> int:
    """``50MB``, ``512KiB``, ``1000`` -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]?i?b?)\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 50MB, 512KiB, 1000)")
    unit = match.group(2).lower().rstrip("b").rstrip("i")
    factor = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[unit]
    return int(float(match.group(1)) * factor)


def make_hub(
    pipeline: Pipeline,
    *,
    shared_dir: Path,
    small_limit: int = 50 * 1024**2,
    reconnect_wait: float = 30.0,
    extra_inputs: dict[str, Any] | None = None,
    retention: Retention | None = None,
    locks: CardLocks | None = None,
) -> DetectorHub:
    """A detector hub that speaks the SD import's vocabulary (:mod:`sd_messages`, card
    metadata :class:`CardInfo`) and whose ``sd:file_list`` handler starts an import of
    ``pipeline``.

    Each import is submitted with ``input_roots``: ``shared_dir`` and the folder of an
    ``intro`` or ``splash`` that ``extra_inputs`` gives as an absolute local path (see the
    module), recorded with the execution and applied by its steps wherever they run.
    ``retention`` (default: keep every copy) is recorded with each import too, so its
    ``retention`` step applies it on whichever worker runs it (``retention.py``). ``locks``:
    the card locks it shares with :func:`resume_interrupted` (default: its own)."""
    hub = DetectorHub("sd_import", reconnect_wait=reconnect_wait, session_metadata=CardInfo)
    input_roots = [shared_dir]
    for name in ("intro", "splash"):
        value = (extra_inputs or {}).get(name)
        if isinstance(value, str) and os.path.isabs(value):
            input_roots.append(Path(value).parent)
    locks = card_locks() if locks is None else locks

    async def on_file_list(msg: DetectorMessage) -> None:
        listing = msg.parsed_as(FileList)  # checked by the hub against FileList
        async with locks[listing.card_id]:
            await start_import(msg, listing)

    async def status(msg: DetectorMessage, listing: FileList, state: str, **more: Any) -> None:
        await msg.reply(
            {
                "type": "sd:status",
                "session_id": listing.session_id,
                "card_id": listing.card_id,
                "state": state,
                **more,
            }
        )

    async def use_session(
        jobs: JobClient, msg: DetectorMessage, listing: FileList, execution_id: str
    ) -> None:
        """Have the import ``execution_id`` ask for its copies (from its next attempt on) and
        send its status through this insertion's session: the one it started with may be
        gone (the detector restarted, the card re-seated, another reader)."""
        seen = {"session_id": listing.session_id, "detector_id": msg.detector_id}
        await asyncio.to_thread(Ledger(jobs.store, SESSIONS).record, execution_id, meta=seen)

    async def resume(
        jobs: JobClient, msg: DetectorMessage, listing: FileList, stopped: ExecutionSummary
    ) -> bool:
        """Resume ``stopped`` through this insertion's session; False if it cannot be."""
        try:
            await use_session(jobs, msg, listing, stopped.id)
            await jobs.retry(stopped.id, pipeline)
        except FramepipeError as exc:
            _log.warning(
                "import %s of card %s (%s) could not be resumed: %s",
                stopped.id,
                listing.card_id,
                stopped.status.value,
                exc,
            )
            return False
        _log.info(
            "import %s of card %s (%s) resumed for its insertion by detector %s",
            stopped.id,
            listing.card_id,
            stopped.status.value,
            msg.detector_id,
        )
        return True

    async def start_import(msg: DetectorMessage, listing: FileList) -> None:
        jobs = JobClient(engine=msg.engine)  # the service's engine, started and stopped by it
        unended = await unended_imports(jobs, pipeline.name, listing.card_id)
        active = [e for e in unended if e.status.value in ("pending", "running")]
        if active:
            await use_session(jobs, msg, listing, active[0].id)
            await status(msg, listing, "already_importing", execution_id=active[0].id)
            return
        resumed = [e for e in unended if await resume(jobs, msg, listing, e)]
        listed = {identity(f.model_dump()) for f in listing.files}
        covered = {identity(f) for e in resumed for f in (e.inputs or {}).get("files", [])}
        if resumed and listed <= covered:
            await status(
                msg,
                listing,
                "importing",
                execution_id=resumed[0].id,
                resumed=[e.id for e in resumed],
            )
            return
        if listing.at_start and not resumed:
            imported = Ledger(jobs.store, IMPORTED)
            if not await asyncio.to_thread(imported.filter_new, sorted(listed)):
                await status(msg, listing, "nothing_new", execution_id=None)
                return
        inputs = {
            "hub": hub.id,
            "session_id": listing.session_id,
            "detector_id": msg.detector_id,
            "card_id": listing.card_id,
            "label": listing.label,
            "shared_dir": str(shared_dir),
            "small_limit": small_limit,
            "files": [f.model_dump() for f in listing.files],
            "skipped": [s.model_dump() for s in listing.skipped],
            **(extra_inputs or {}),
        }
        if retention is not None and not retention.keeps_all:
            inputs["retention"] = retention.model_dump()
        execution_id = await jobs.submit(pipeline, inputs, input_roots=input_roots)
        more = {"resumed": [e.id for e in resumed]} if resumed else {}
        await status(msg, listing, "importing", execution_id=execution_id, **more)

    register_sd_messages(hub, on_file_list=on_file_list)
    return hub


def build_app(
    settings: Settings,
    *,
    shared_dir: Path,
    small_limit: int = 50 * 1024**2,
    token: str | None = None,
    reconnect_wait: float = 30.0,
    retention: Retention | None = None,
) -> Any:
    """The service: ``create_app`` with the ``sd_import`` pipeline and its detector hub; once
    it has started, the imports left interrupted are resumed (:func:`resume_interrupted`)."""
    pipeline = load_pipeline(PIPELINE_REF)
    locks = card_locks()
    hub = make_hub(
        pipeline,
        shared_dir=shared_dir,
        small_limit=small_limit,
        reconnect_wait=reconnect_wait,
        retention=retention,
        locks=locks,
    )
    app = create_app(settings, pipelines=[pipeline], token=token, detector_hub=hub)
    serve = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app_: Any) -> AsyncIterator[None]:
        async with serve(app_):
            running = app.state.service.running
            resuming = asyncio.create_task(resume_interrupted(running.jobs, pipeline, locks))
            telling = asyncio.create_task(tell_ended_badly(running.jobs, hub, pipeline))
            try:
                yield
            finally:
                for task in (resuming, telling):
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task

    app.router.lifespan_context = lifespan
    return app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shared_options(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--small-limit",
        type=parse_size,
        default=50 * 1024**2,
        help="files smaller than this are QR-clip candidates (default 50MB)",
    )
    parser.add_argument(
        "--delete-after-upload",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="remove a copy from the shared folder once its rendered video is verified in "
        "the object store (default: SHARED_VIDEOS_DELETE_AFTER_UPLOAD, else no)",
    )
    parser.add_argument(
        "--retention-days",
        type=float,
        default=None,
        help="remove a copy this many days after its video was uploaded (verified first; "
        "default: SHARED_VIDEOS_RETENTION_DAYS, else never)",
    )
    args = parser.parse_args(argv)
    import uvicorn

    try:
        settings = load_settings()
        policy = retention_from_env()
        retries = copy_retries_from_env()  # what loading the pipeline reads: stop here, named
    except ConfigError as exc:
        parser.error(str(exc))
    if args.delete_after_upload is not None:
        policy = policy.model_copy(update={"after_upload": args.delete_after_upload})
    if args.retention_days is not None:
        if not args.retention_days >= 0:
            parser.error("--retention-days: use a number of days >= 0")
        policy = policy.model_copy(update={"days": args.retention_days})
    token = settings.api_token or os.environ.get("FRAMEPIPE_API_TOKEN")
    if not token and args.host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("without a token (FRAMEPIPE_API_TOKEN) the backend binds only loopback")
    if args.create_shared and args.shared_is_mount:
        parser.error("--create-shared and --shared-is-mount: a mount point is not created here")
    try:
        check_shared(args.shared, create=args.create_shared, mount=args.shared_is_mount)
    except SharedFolderError as exc:
        parser.error(str(exc))
    print(f"shared folder {args.shared}: {policy.describe()}", file=sys.stderr)
    print(retries.describe(), file=sys.stderr)
    app = build_app(
        settings,
        shared_dir=args.shared.resolve(),
        small_limit=args.small_limit,
        token=token,
        retention=policy,
    )
    uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
