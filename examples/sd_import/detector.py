#!/usr/bin/env python3
"""The SD-card detector: a small host process that sees cards and copies what the backend asks.

    python examples/sd_import/detector.py --watch /media \\
        --backend ws://127.0.0.1:8000/ws/detector --shared /shared-videos [--card E:\\ ...]

Cards: every subfolder of a ``--watch`` folder is a card (``/media/$USER/*`` on Linux), but
never a symbolic link there (it is not followed, wherever it points; a warning names it), and
every ``--card`` folder (``E:\\`` on Windows) is one while it exists and holds files. The
folders are polled (``--interval``, 1 s); a card counts once its listing is the same twice in a
row ``--settle`` seconds apart (a card still mounting is not announced half-listed). A card
that cannot be listed, for whatever reason, is logged and tried again at the next poll: it
never stops the detector or the other cards.

A card is the very folder the poll saw, not whatever has its name later: the poll notes its
identity (device and inode, of the folder itself, not of what a link there points to), and
each listing and each copy opens the card's root once
(:func:`framepipe.confined.open_root`): a ``--watch`` card relative to its watch folder with
``O_NOFOLLOW | O_DIRECTORY``, so a link put in its place (by whoever can write to a shared
watch folder, between the poll and the open) is refused and not followed, and checked to be
the folder the poll saw; everything below it is reached from that open folder. A card whose
folder became a link is refused (``code: refused``, naming the card), one that is another
folder now (replaced, mounted again) is ``not_mounted``; nothing is read from either, and the
next poll takes it as removed (and lists the new folder, a link never).

The listing (:func:`list_card`) holds only paths the backend accepts (the rule of
``card_paths.py``, which the backend checks ``sd:file_list`` with): a file whose path it would
refuse (a ``:`` or a backslash in a name, a name that is not UTF-8, a path over 1000
characters) is skipped with a warning naming it, so the rest of the card still imports.
Folders deeper than :data:`MAX_DEPTH` below the card are not looked into (warned about).

For each new card it sends ``detector:sd_inserted`` and ``sd:file_list`` (path relative to the
card with ``/``, size, mtime, and a cheap content fingerprint: BLAKE2b of the size and the
first and last 64 KiB), and ``detector:sd_removed`` when it goes. It answers every
``sd:copy_request`` by copying the file into the shared folder, one file at a time:

* to a temporary name beside the target (``.NAME.part``), in chunks (``--max-rate`` limits
  the speed), reporting ``sd:copy_progress``; then ``fsync``, then the copy's size and
  fingerprint are checked against the listing, and only then is it renamed to its final name
  (atomic on the same volume) and the folder synced: a final name is always a whole, checked
  file; an interrupted copy leaves at most a ``.part`` file, which the next attempt removes
  and creates anew;
* no symbolic link is followed, on the card or in the shared folder: each folder on the way is
  opened below its root without following links (:func:`framepipe.confined.open_dir_beneath`)
  and every name in it is opened, created, renamed and removed relative to that folder; the
  temporary file is created exclusively (``O_CREAT | O_EXCL | O_NOFOLLOW``), so a link or file
  planted under its name is never written through. A link (or anything but a regular file or
  folder, such as a fifo) where a file or folder is expected is refused, naming it relative
  to its root; a planted ``.part`` link is left in place for a person to look at. The card's
  listing skips links, and names each one that would otherwise be imported (a video, a
  folder) in its ``skipped`` with the reason: logged once when the card is announced, and
  reported by the import. (Windows has no ``dir_fd``: there each segment is checked not to be a
  link before the path is used, which a racing writer could defeat; the exclusive create
  still never writes through a link);
* ``sd:file_copied`` says ``ok: true`` with ``dest``, ``size`` and ``fingerprint``, or
  ``ok: false`` with ``code`` (``vanished``: the file is no longer on the card; ``changed``:
  its size or content differs from the listing; ``not_mounted``: the card is gone, or its
  folder is another folder now; ``refused``: a path outside the card or the shared folder, a
  link where a file or folder is expected, or the card's folder replaced by a link since it
  was listed (the error names the card); ``io_error``) and ``error``, which names the file and
  the reason;
* a file already at its destination with the right size and fingerprint is not copied again.

The backend never reads the card. The token goes in an ``Authorization: Bearer`` header, never
in the URL (which access logs and proxies record). The connection reconnects by itself with
exponential backoff and jitter (the ``websockets`` client's, from 1 s up to ``--max-backoff``,
30 s); after a reconnect the detector says which cards it still has (``detector:hello``), so
copies the backend retries reach it, and announces the cards the backend has not acknowledged
yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import signal
import sys
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

from detector_copies import card_for, copy_reply, log_copied, not_inserted, progress_reporter
from detector_messages import hello as detector_hello
from detector_messages import note_message, read_message
from detector_options import parse_args, refusal_reason
from sd_cards import Card, Listing, as_text, card_id_of, card_label, list_card
from sd_copy import CopyAborted, copy_file
from sd_roots import Seen, card_roots
from shared_root import SharedFolderError, check_shared
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import backoff
from websockets.exceptions import ConnectionClosed, InvalidStatus

from framepipe.urls import safe_url

__all__ = ["Card", "Detector", "card_id_of", "card_label", "copy_file", "list_card"]

log = logging.getLogger("sd_detector")


# -- the process -----------------------------------------------------------------------------


class Detector:
    """Watches folders for cards, talks to the backend, copies on request."""

    def __init__(
        self,
        *,
        backend: str,
        shared: Path,
        token: str | None,
        watch: list[Path],
        cards: list[Path],
        detector_id: str,
        interval: float = 1.0,
        settle: float = 1.0,
        max_rate: float | None = None,
        max_backoff: float = 30.0,
        create_shared: bool = False,
        shared_mount: bool = False,
    ) -> None:
        self.backend = backend
        self.shared = shared
        self.create_shared = create_shared
        self.shared_mount = shared_mount
        self.token = token
        self.watch = watch
        self.card_dirs = cards
        self.detector_id = detector_id
        self.interval = interval
        self.settle = settle
        self.max_rate = max_rate
        self.max_backoff = max_backoff
        self.cards: dict[Path, Card] = {}
        self.ws: ClientConnection | None = None
        self.copies: asyncio.Queue[tuple[ClientConnection, dict[str, Any]]] = asyncio.Queue()
        self._abort = threading.Event()
        self._warned: dict[Path, str] = {}  # what was last said about a root or a link
        self._links: set[Path] = set()  # links in the --watch folders at the last poll

    # watching

    def _roots(self) -> dict[Path, Seen]:
        """The cards now (:func:`sd_roots.card_roots`); each link in a ``--watch`` folder is
        named in a warning once: it is never a card, wherever it points."""
        roots, links = card_roots(self.watch, self.card_dirs)
        for link in links:
            self._warn_once(
                link,
                f"{as_text(str(link))} is a link, not a card: links in a --watch folder are "
                "not followed",
            )
        self._links = links
        return roots

    def _warn_once(self, about: Path, message: str) -> None:
        """Log ``message`` about ``about`` unless it was the last said about it (a poll every
        second must not repeat it)."""
        if self._warned.get(about) != message:
            self._warned[about] = message
            log.warning("%s", message)

    async def _list(self, root: Path, seen: Seen) -> Listing | None:
        """:func:`list_card` of ``root``, the folder the poll saw (``seen``), or None when
        listing it failed in any way (also when its folder became a link or another folder
        since the poll): the failure is logged (with its traceback once) and that card is
        tried again at the next poll, so one card can never stop the detector or the other
        cards."""
        try:
            files = await asyncio.to_thread(
                list_card, root, identity=seen.identity, watched=seen.watched
            )
        except Exception as exc:
            message = f"card at {as_text(str(root))} could not be listed: {exc!r}"
            if self._warned.get(root) != message:
                self._warned[root] = message
                log.exception("%s; trying again at the next poll", message)
            return None
        self._warned.pop(root, None)
        return files

    async def watch_cards(self) -> None:
        """Poll for cards until cancelled: announce each new card once its listing settled,
        and the removal of each card that is gone. A card that cannot be listed is skipped
        (see :meth:`_list`); nothing about one card ends this loop."""
        pending: dict[Path, tuple[Seen, Listing]] = {}
        at_start: dict[Path, Seen] | None = None  # the cards in the readers at the start
        while True:
            roots = await asyncio.to_thread(self._roots)
            if at_start is None:
                at_start = dict(roots)
            for root in [r for r in at_start if roots.get(r) != at_start[r]]:
                del at_start[root]  # gone or another folder since: inserted while running
            for root in list(self.cards):
                card = self.cards[root]
                if roots.get(root) != (card.identity, card.watched):
                    del self.cards[root]
                    card.removed = True
                    if root in roots:  # another folder there now: removed, listed anew
                        log.warning(
                            "card %s at %s is another folder now: taken as removed",
                            card.card_id,
                            root,
                        )
                    else:
                        log.info("card %s removed from %s", card.card_id, root)
                    await self._send(
                        {
                            "type": "detector:sd_removed",
                            "session_id": card.session_id,
                            "card_id": card.card_id,
                        }
                    )
            for root in roots.keys() - self.cards.keys():
                seen = roots[root]
                files = await self._list(root, seen)
                if files is None or not (files or files.skipped):
                    # An empty folder is no card: a mount point before its card is mounted
                    # (an automounter's /media/$USER/LABEL), or left behind by a lazy unmount.
                    pending.pop(root, None)
                    continue
                if self.settle > 0 and pending.get(root) != (seen, files):
                    pending[root] = (seen, files)  # listed again after --settle to count
                    continue
                pending.pop(root, None)
                label = card_label(root)
                card = Card(
                    root,
                    label,
                    card_id_of(label, files),
                    files,
                    skipped=files.skipped,
                    watched=seen.watched,
                    identity=seen.identity,
                    at_start=at_start.pop(root, None) == seen,  # its first announcement only
                )
                self.cards[root] = card
                log.info("card %s inserted at %s: %d files", card.card_id, root, len(files))
                for left in files.unlogged:  # once per insertion (listed more than once)
                    log.warning(
                        "card %s: skipped %s: %s", card.card_id, left["path"], left["reason"]
                    )
                await self._announce(card)
            for root in list(pending):
                if root not in roots:
                    del pending[root]
            for gone in [p for p in self._warned if p not in roots and p not in self._links]:
                del self._warned[gone]  # said again if it comes back
            await asyncio.sleep(self.settle if pending else self.interval)

    async def _send(self, message: dict[str, Any], ws: ClientConnection | None = None) -> bool:
        ws = ws or self.ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(message))
        except ConnectionClosed:
            return False
        return True

    async def _announce(self, card: Card) -> None:
        """Announce ``card`` on the connection, once per connection (a card found while the
        connection opens is not announced by both the poll and the reconnect)."""
        ws = self.ws
        if ws is None or card.announced_on is ws:
            return
        card.announced_on = ws
        if await self._send(card.inserted(), ws):
            await self._send(card.file_list(), ws)

    # the connection

    async def connection(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

        def delays() -> Generator[float]:
            return backoff(
                initial_delay=min(1.0, self.max_backoff),
                min_delay=min(1.0, self.max_backoff),
                max_delay=self.max_backoff,
            )

        options: dict[str, Any] = {}
        if "reconnect_delays" in inspect.signature(connect.__init__).parameters:
            options["reconnect_delays"] = delays  # older websockets: WEBSOCKETS_BACKOFF_* env
        async for ws in connect(
            self.backend, additional_headers=headers, max_size=2**26, open_timeout=10, **options
        ):
            try:
                hello = detector_hello(self.detector_id, self.cards.values())
                await ws.send(json.dumps(hello))
                self.ws = ws
                self._abort = threading.Event()
                log.info("connected to %s as %s", safe_url(self.backend), self.detector_id)
                for card in list(self.cards.values()):
                    if not card.acknowledged:
                        await self._announce(card)
                async for raw in ws:
                    await self._on_message(ws, raw)
            except ConnectionClosed as exc:
                log.warning("connection to the backend closed (%s); reconnecting", exc)
            finally:
                self._abort.set()  # a copy for this connection: the backend will ask again
                self.ws = None

    async def _on_message(self, ws: ClientConnection, raw: str | bytes) -> None:
        message = read_message(raw)
        if message is None:
            return
        if message["type"] == "sd:copy_request":
            await self.copies.put((ws, message))
        else:
            note_message(message, self.cards.values())

    async def copier(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            ws, request = await self.copies.get()
            if ws is not self.ws:
                continue  # asked on a connection that is gone: the backend asks again
            await self._copy(loop, ws, request)

    async def _copy(
        self, loop: asyncio.AbstractEventLoop, ws: ClientConnection, request: dict[str, Any]
    ) -> None:
        card = card_for(self.cards.values(), request)
        if card is None:
            await self._send(not_inserted(request), ws)
            return

        def send(message: dict[str, Any]) -> None:
            asyncio.run_coroutine_threadsafe(self._send(message, ws), loop)

        progress = progress_reporter(request, card, send)
        log.info("copying %s of %s", request.get("path"), card.card_id)
        try:
            result = await asyncio.to_thread(
                copy_file,
                card,
                str(request.get("path")),
                self.shared,
                str(request.get("dest")),
                size=int(request.get("size", -1)),
                fingerprint=str(request.get("fingerprint")),
                abort=self._abort,
                progress=progress,
                max_rate=self.max_rate,
                shared_mount=self.shared_mount,
            )
        except CopyAborted:
            log.warning("copy of %s stopped: the connection closed", request.get("path"))
            return
        await self._send({**copy_reply(request), **result}, ws)
        log_copied(request, result)

    async def run(self) -> None:
        """Watch, stay connected and copy until one of them fails (raised) or this is
        cancelled (SIGTERM): either way the others are cancelled and awaited, so the
        connection closes before the loop ends (left running, the loop's shutdown tore its
        send generator down mid-send and logged an error at every stop).

        The shared folder is checked first (:func:`shared_root.check_shared`: created only
        with ``create_shared``; with ``shared_mount`` it must be a mount point; writable): a
        :class:`~shared_root.SharedFolderError` naming it is raised before anything runs."""
        check_shared(self.shared, create=self.create_shared, mount=self.shared_mount, writable=True)
        tasks = [
            asyncio.create_task(self.watch_cards(), name="watch"),
            asyncio.create_task(self.connection(), name="connection"),
            asyncio.create_task(self.copier(), name="copier"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # a failed task fails the detector loudly


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, __doc__.split("\n\n")[0])
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s detector %(levelname)s %(message)s",
    )
    detector = Detector(
        backend=args.backend,
        shared=args.shared,
        token=args.token,
        watch=args.watch,
        cards=args.card,
        detector_id=args.detector_id,
        interval=args.interval,
        settle=args.settle,
        max_rate=args.max_rate,
        max_backoff=args.max_backoff,
        create_shared=args.create_shared,
        shared_mount=args.shared_is_mount,
    )

    async def run() -> None:
        task = asyncio.create_task(detector.run())
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):  # Windows: Ctrl-C only
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except SharedFolderError as exc:
        log.error("not started: %s", exc)  # noqa: TRY400  (the reason is the whole story)
        return 2
    except InvalidStatus as exc:
        code = exc.response.status_code
        why = refusal_reason(code, args.backend, args.token)
        log.error("the backend refused the connection (HTTP %d): %s", code, why)  # noqa: TRY400
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
