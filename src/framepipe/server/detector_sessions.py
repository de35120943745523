"""Who owns which detector session, and what the open ones announced: the bookkeeping of a
:class:`~framepipe.server.detector.DetectorHub` (the rules are stated there, in its module).

Guarantees: a session belongs to the detector that first claimed it, for the life of the book,
also after it ended; a claim by another detector is refused and changes nothing. A detector
owns at most ``max_sessions`` sessions: beyond that its oldest ended session is forgotten, and
if none ended the claim is refused. A session's metadata (what its claims announced, merged) is
at most ``max_metadata_bytes`` of JSON: a claim that would grow it past that is refused and
changes nothing. A refusal is the ``error`` message to send the detector, naming the session
and the field at fault.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from framepipe.untrusted import json_size

__all__ = ["Limits", "SessionBook"]


class Limits(Protocol):
    """The bounds a book holds its sessions to, read at each claim (the hub's settings)."""

    @property
    def max_sessions(self) -> int: ...
    @property
    def max_metadata_bytes(self) -> int: ...


class SessionBook:
    """The owner of every session claimed, each detector's sessions (oldest first) and the
    metadata of the sessions not ended, within ``limits``. ``not_yours(session_id)`` is the
    refusal of another detector's session."""

    def __init__(self, limits: Limits, not_yours: Callable[[str], dict[str, Any]]) -> None:
        self._limits = limits
        self.owners: dict[str, str] = {}  # session -> detector id (kept after it ended)
        self.owned: dict[str, dict[str, None]] = {}  # detector id -> its sessions, oldest first
        self.open: dict[str, dict[str, Any]] = {}  # session -> id, metadata (not ended)
        self._not_yours = not_yours

    def owner(self, session_id: str) -> str | None:
        """The id of the detector owning ``session_id``, or None."""
        return self.owners.get(session_id)

    def open_of(self, detector_id: str) -> list[dict[str, Any]]:
        """The sessions of ``detector_id`` not ended, each its id and metadata."""
        return [self.open[s] for s in self.owned.get(detector_id, ()) if s in self.open]

    def end(self, session_id: str) -> None:
        """The session ended: its metadata is forgotten, its owner kept."""
        self.open.pop(session_id, None)

    def claim(
        self, detector_id: str, session_id: str, fields: Mapping[str, Any], where: str
    ) -> dict[str, Any] | None:
        """Make ``session_id`` (already checked) the session of ``detector_id`` and record its
        metadata ``fields`` (checked, from ``where``); the ``error`` message to send instead
        when it belongs to another detector, this one owns too many, or the session's metadata
        would grow past ``max_metadata_bytes``. Nothing changes when it is refused."""
        owner = self.owners.get(session_id)
        if owner is not None and owner != detector_id:
            return self._not_yours(session_id)
        known = self.open.get(session_id, {"session_id": session_id})
        if fields:
            merged = {k: v for k, v in {**known, **fields}.items() if k != "session_id"}
            size = json_size(merged)
            if size > self._limits.max_metadata_bytes:
                return {
                    "type": "error",
                    "session_id": session_id,
                    "field": where,
                    "detail": f"{where}: the session's metadata would be {size} bytes of "
                    f"JSON; at most {self._limits.max_metadata_bytes}",
                }
        if owner is None:
            owned = self.owned.setdefault(detector_id, {})
            if len(owned) >= self._limits.max_sessions:
                ended = next((s for s in owned if s not in self.open), None)
                if ended is None:
                    return {
                        "type": "error",
                        "session_id": session_id,
                        "field": "session_id",
                        "detail": f"this detector already has {self._limits.max_sessions} sessions "
                        "announced and not ended; session refused",
                    }
                del owned[ended]
                del self.owners[ended]
            owned[session_id] = None
            self.owners[session_id] = detector_id
        self.open.setdefault(session_id, known).update(fields)
        return None

    def check_use(
        self, detector_id: str, session_id: str, role: str, fields: dict[str, Any]
    ) -> tuple[dict[str, Any] | None, bool]:
        """Whether ``detector_id`` may send a message of ``role`` about ``session_id``: it owns
        the session, or claims it now. An ``end`` claims nothing, nor does an answer or a
        progress report about a session that is not open (one that ended: a late answer does
        not bring the session back). The refusal (or None) and whether the session is new."""
        if role == "end" or (role in ("answer", "progress") and session_id not in self.open):
            owner = self.owners.get(session_id)
            return (None if owner in (None, detector_id) else self._not_yours(session_id)), False
        was_new = session_id not in self.owners
        problem = self.claim(detector_id, session_id, fields, "message")
        return problem, problem is None and was_new
