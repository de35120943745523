"""What one injection run reports: per capability, the frames routed and answered, the faces
and motion found and which processors answered (:class:`CapabilityStats`), and the run's
:class:`Summary` (as JSON and as lines for a terminal).

Guarantees: a summary fails (:attr:`Summary.failed`) when a frame got an error, a frame went
unanswered, or the run said an error; an interrupted run says so in its report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from framepipe.processors import ProcessorResult

__all__ = ["CapabilityStats", "Summary", "record_result"]


@dataclass
class CapabilityStats:
    """What happened to the frames sent for one capability."""

    routed: int = 0
    results: int = 0
    errors: int = 0
    frames_with_faces: int = 0
    faces: int = 0
    names: dict[str, int] = field(default_factory=dict)
    frames_moving: int = 0
    processors: dict[str, int] = field(default_factory=dict)
    """Frames answered per processor id."""


@dataclass
class Summary:
    """The outcome of one injection run."""

    camera_id: str
    source: str
    frames: int = 0
    elapsed_s: float = 0.0
    capabilities: dict[str, CapabilityStats] = field(default_factory=dict)
    error_messages: list[str] = field(default_factory=list)
    drained: bool = True
    """All routed frames were answered (or, with results, collected) before the end."""
    interrupted: bool = False
    """Stopped by Ctrl-C (SIGINT) or SIGTERM: no frame was sent after it, and the results
    not in yet were not waited for."""

    @property
    def fps(self) -> float:
        """Frames sent per second."""
        return self.frames / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def failed(self) -> bool:
        """True when a frame got an error (or no answer)."""
        return (
            bool(self.error_messages)
            or not self.drained
            or any(s.errors for s in self.capabilities.values())
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        data = asdict(self)
        data["fps"] = round(self.fps, 2)
        data["elapsed_s"] = round(self.elapsed_s, 3)
        return data

    def lines(self) -> list[str]:
        """A human-readable report."""
        out = [
            f"camera {self.camera_id}: {self.frames} frame(s) from {self.source} sent in "
            f"{self.elapsed_s:.2f}s ({self.fps:.1f} fps)"
        ]
        for capability, stats in self.capabilities.items():
            text = f"  {capability}: {stats.routed} routed"
            if stats.results or stats.errors:
                text += f", {stats.results} result(s), {stats.errors} error(s)"
            if stats.frames_with_faces:
                names = ", ".join(f"{n} x{c}" for n, c in sorted(stats.names.items()))
                text += f", faces in {stats.frames_with_faces} frame(s)" + (
                    f" (recognised: {names})" if names else ""
                )
            if stats.frames_moving:
                text += f", motion in {stats.frames_moving} frame(s)"
            if stats.processors:
                text += (
                    " [" + ", ".join(f"{p}: {n}" for p, n in sorted(stats.processors.items())) + "]"
                )
            out.append(text)
        if self.interrupted:
            out.append("  interrupted: the frames not answered by then were not waited for")
        elif not self.drained:
            out.append("  some frames were not answered in time")
        out += [f"  error: {message}" for message in self.error_messages[:10]]
        return out


def record_result(stats: CapabilityStats, result: ProcessorResult) -> None:
    """Count ``result`` (an answer, or an error) in ``stats``: its processor, the faces it
    found and the names recognised, motion."""
    stats.processors[result.processor_id] = stats.processors.get(result.processor_id, 0) + 1
    if not result.ok:
        stats.errors += 1
        return
    stats.results += 1
    data = result.data or {}
    faces = data.get("faces")
    if isinstance(faces, list) and faces:
        stats.frames_with_faces += 1
        stats.faces += len(faces)
        for face in faces:
            name = face.get("name") if isinstance(face, dict) else None
            if name:
                stats.names[name] = stats.names.get(name, 0) + 1
    if data.get("moving"):
        stats.frames_moving += 1
