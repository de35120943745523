"""The SD-card import pipeline: new files only, QR clips first, bookings from the
QR codes, every video rendered with intro, watermark and splash screen.

One execution per card insertion. Its inputs come from the backend (``backend.py``) when a
detector sends ``sd:file_list``: ``hub`` (the service's detector hub), ``session_id``,
``detector_id``, ``card_id``, ``files`` (``path``, ``size``, ``mtime``, ``fingerprint`` each),
``shared_dir`` (where copies land, as the backend sees it) and ``small_limit`` (bytes; smaller
files are QR-clip candidates). Optional: ``intro`` and ``splash`` (videos, as local paths or
object keys; default: title cards made here).

The inputs are declared (:class:`sd_inputs.SdImportInputs`), so whoever submits an execution,
the backend's detector handler or a client of ``POST /api/executions``, is checked before it
exists (``sd_inputs.py`` says how, and which folders an import may read).

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

The shared folder is read only through :func:`sd_share.shared_file`: every copy is opened below
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

Where each part is: this module declares the pipeline, its steps in order with their weights,
dependencies and retries; the steps and what they share are in modules of their own:

=====================  ==========================================================================
``sd_inputs.py``       the declared inputs, and reading the intro, the splash and a file's entry
``sd_share.py``        the shared folder: where it is, each copy opened without following a link
``sd_keys.py``         a file's ledger identity, its render's object key
``sd_plan.py``         ``plan``
``copy_requests.py``   ``copy`` (asking the detector, checking the copy)
``qr_bookings.py``     ``scan_qr``, and the booking a QR code holds
``sd_jumps.py``        ``assign``, and the booking or the reason to hold it it gave each video
``sd_render.py``       ``extract_metadata``, ``render``
``title_cards.py``     the title cards made when no intro or splash is given
``media_limits.py``    the limits every step gives the media functions
``retention_steps.py`` ``retention``, ``release`` (the rules: ``retention.py``)
``sd_summary.py``      ``summary``
=====================  ==========================================================================
"""

from __future__ import annotations

from copy_requests import copy
from copy_retries import copy_retries_from_env
from media_limits import limits
from qr_bookings import QR_NAMESPACE, parse_booking, scan_qr
from retention_steps import release, retention
from sd_inputs import SdImportInputs
from sd_jumps import assign
from sd_keys import output_key
from sd_messages import CARD_ID_PATTERN, FileEntry
from sd_plan import plan
from sd_render import extract_metadata, render
from sd_share import shared_dir_of, shared_file
from sd_summary import summary
from title_cards import title_card

from framepipe import Pipeline

__all__ = [
    "CARD_ID_PATTERN",
    "COPY_RETRIES",
    "QR_NAMESPACE",
    "FileEntry",
    "SdImportInputs",
    "limits",
    "output_key",
    "parse_booking",
    "sd_import",
    "shared_dir_of",
    "shared_file",
    "title_card",
]

COPY_RETRIES = copy_retries_from_env()
"""The ``copy`` step's retries: ``SD_IMPORT_COPY_RETRIES``, ``SD_IMPORT_COPY_RETRY_DELAY``."""

sd_import = Pipeline(
    "sd_import", description="SD-card import of tandem-jump videos", inputs=SdImportInputs
)
sd_import.add_step(plan, weight=0.5)
sd_import.add_step(copy, retries=COPY_RETRIES.retries, retry_delay=COPY_RETRIES.delay, weight=1.0)
sd_import.add_step(scan_qr, weight=0.5)
sd_import.add_step(assign, depends_on=["plan", "scan_qr"], weight=0.5)
sd_import.add_step(extract_metadata, weight=0.5)
sd_import.add_step(render, weight=3.0)
sd_import.add_step(
    retention,
    depends_on=["assign", "copy", "scan_qr", "extract_metadata", "render"],
    weight=0.1,
)
sd_import.add_step(release, weight=0.2)
sd_import.add_step(summary, depends_on=["retention", "release"], weight=0.1)
