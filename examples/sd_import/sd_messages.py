"""The SD-card import's detector vocabulary: what a card detector (``detector.py``) and the
backend (``backend.py``) say to each other over framepipe's detector hub
(:mod:`framepipe.server.detector`, which knows none of it), as the models the backend
registers on its hub with :func:`register_sd_messages`.

A session is one insertion of a card. Besides the hub's own ``detector:hello`` (whose
``sessions`` entries carry the card's metadata too), ``detector:welcome`` and ``error``::

    detector -> backend  {"type": "detector:sd_inserted", "session_id": "...", "card_id": "...",
                          "label": "...", "root": "...", "file_count": N}
    detector -> backend  {"type": "sd:file_list", "session_id": "...", "card_id": "...",
                          "label": "...", "files": [{"path": "DCIM/0001.MP4", "size": N,
                          "mtime": T, "fingerprint": "..."}, ...],
                          "skipped": [{"path": "DCIM/GX\ufffd05.MP4", "reason": "..."}]}
    backend -> detector  {"type": "sd:status", "session_id": "...", "card_id": "...",
                          "state": "importing" | "already_importing", "execution_id": "..."}
    backend -> detector  {"type": "sd:copy_request", "request_id": "...", "session_id": "...",
                          "path": "DCIM/0001.MP4", "dest": "...", ...}
    detector -> backend  {"type": "sd:copy_progress", "request_id": "...", "bytes": N,
                          "total": M}
    detector -> backend  {"type": "sd:file_copied", "request_id": "...", "ok": true, ...}
    detector -> backend  {"type": "detector:sd_removed", "session_id": "...", "card_id": "..."}

The card's metadata (:class:`CardInfo`: ``card_id``, ``label``, ``root``, ``file_count``) is
the session metadata the hub lists in ``GET /api/detectors``; text of at most 1000 characters
and a whole number >= 0, refused naming the field (``message.file_count``) otherwise. Every
message the detector sends is validated by its model before the hub records anything or the
backend sees it: a file list with a path such as ``..``, ``x\\x00.mp4`` or one listed twice is
refused naming the entry (``message.files[3].path``), and starts nothing.
"""

from __future__ import annotations

from card_paths import MAX_PATH, card_path
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from framepipe.server.detector import DetectorHub, Handler

__all__ = [
    "CARD_ID_PATTERN",
    "CardInfo",
    "CardInserted",
    "CardRemoved",
    "CopyProgress",
    "FileCopied",
    "FileEntry",
    "FileList",
    "SkippedFile",
    "register_sd_messages",
]

_TEXT = 1000  # longest card id, label or card root announced
CARD_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$"  # a folder name, never '..'


class FileEntry(BaseModel):
    """One file of a card, as the detector lists it (metadata only)."""

    model_config = ConfigDict(extra="ignore")
    path: str = Field(min_length=1, max_length=MAX_PATH)
    size: int = Field(ge=0)
    mtime: float
    fingerprint: str = Field(min_length=8, max_length=128)

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        """The path as ``a/b/c`` if :func:`card_paths.card_path` accepts it (the rule the
        detector lists by), else the reason."""
        return card_path(value)


class SkippedFile(BaseModel):
    """A file on the card the detector did not list (a name that is not UTF-8, a path the
    backend would refuse, a folder too deep): the path as text and why, so the import tells
    the operator instead of calling the card imported."""

    model_config = ConfigDict(extra="ignore")
    path: str = Field(min_length=1, max_length=MAX_PATH + 1)
    reason: str = Field(max_length=_TEXT)


class CardInfo(BaseModel):
    """A card session's metadata, each field optional (a message names only what it knows)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    card_id: str | None = Field(None, max_length=_TEXT)
    label: str | None = Field(None, max_length=_TEXT)
    root: str | None = Field(None, max_length=_TEXT, description="Where the card is mounted.")
    file_count: int | None = Field(None, ge=0)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")


class CardInserted(_Message):
    """``detector:sd_inserted``: a card is in (its metadata: :class:`CardInfo`)."""

    session_id: str


class CardRemoved(_Message):
    """``detector:sd_removed``: the card is out; its session ends."""

    session_id: str


class FileList(_Message):
    """``sd:file_list``: the card's files (metadata only); paths distinct."""

    session_id: str = Field(min_length=1, max_length=200)
    card_id: str = Field(min_length=1, max_length=200, pattern=CARD_ID_PATTERN)
    label: str = Field(default="", max_length=_TEXT)
    files: list[FileEntry] = Field(max_length=100_000)
    at_start: bool = Field(
        False,
        description="The card was in the reader when the detector started (the detector is "
        "new, not the card): with nothing new on it, no import is started.",
    )
    skipped: list[SkippedFile] = Field(
        default_factory=list,
        max_length=100_000,
        description="Files (or folders) on the card the detector left out, with the reason.",
    )

    @model_validator(mode="after")
    def _distinct(self) -> FileList:
        seen: dict[str, int] = {}
        for n, entry in enumerate(self.files):
            first = seen.setdefault(entry.path, n)
            if first != n:
                raise ValueError(
                    f"files[{n}].path: {entry.path!r} is listed twice (also files[{first}])"
                )
        return self


class CopyProgress(_Message):
    """``sd:copy_progress``: bytes of a requested copy done so far."""

    request_id: str
    bytes: int = Field(0, ge=0)
    total: int | None = None


class FileCopied(_Message):
    """``sd:file_copied``: the answer to ``sd:copy_request`` (``ok``; when not, a ``code``
    and an ``error``; the step reads the rest)."""

    request_id: str
    ok: bool


def register_sd_messages(
    hub: DetectorHub, *, on_file_list: Handler, on_inserted: Handler | None = None
) -> None:
    """Register the SD import's detector messages on ``hub`` (made with
    ``session_metadata=CardInfo``): ``sd:file_list`` goes to ``on_file_list``,
    ``detector:sd_inserted`` records the card (and goes to ``on_inserted``, if given),
    ``sd:copy_progress`` and ``sd:file_copied`` answer the steps' copy requests, and
    ``detector:sd_removed`` ends the card's session."""
    hub.register_message("detector:sd_inserted", CardInserted, on_inserted)
    hub.register_message("sd:file_list", FileList, on_file_list)
    hub.register_message("sd:copy_progress", CopyProgress, role="progress")
    hub.register_message("sd:file_copied", FileCopied, role="answer")
    hub.register_message("detector:sd_removed", CardRemoved, role="end")
