"""Sinks: where a live pipeline's frames end up. :class:`FrameStore` writes JPEGs to the object
store under hierarchical keys and reads them back."""

from __future__ import annotations

import heapq
import string
import threading
from collections.abc import Iterator
from typing import Any

from framepipe.backends.objects import ObjectInfo, ObjectStore
from framepipe.errors import ConfigError
from framepipe.frames import Frame, decode_jpeg
from framepipe.processors.base import Processor
from framepipe.stream.segment import Segment

__all__ = ["FrameStore", "Sink"]

DEFAULT_TEMPLATE = "frames/{source_id}/{segment_id}/frame_{ts_ms}_{seq}.jpg"


class Sink(Processor):
    """A processor at the end of a pipeline: :meth:`write` each frame (in worker threads unless
    ``async``); :meth:`segment_closed` runs once all of a segment's frames were written."""

    workers: int = 1

    def process(self, item: Any) -> Any:
        self.write(item)
        return item

    def write(self, frame: Frame) -> None:
        """Consume one frame."""
        raise NotImplementedError

    def segment_closed(self, segment: Segment) -> None:
        """Called (in a worker thread) after every frame of ``segment`` went through write."""


class FrameStore(Sink):
    """Writes frames as JPEG to ``objects`` under ``template`` and keeps what it stored per
    segment in ``segment.stored``.

    ``template`` fields: ``source_id``, ``segment_id``, ``seq``, ``ts_ms``, ``key`` and any
    ``frame.meta`` entry. Frames outside any segment are skipped unless ``store_unsegmented``
    (they then use ``segment_id="none"``). With ``select_best=N`` the N frames with the highest
    ``frame.meta[score_key]`` of each segment are copied under ``selected_prefix`` (same key
    below it), in ``selected_store`` when given (another bucket) or the same store, when the
    segment closes; their keys go to ``segment.selected``."""

    def __init__(
        self,
        objects: ObjectStore,
        *,
        template: str = DEFAULT_TEMPLATE,
        quality: int = 85,
        workers: int = 2,
        store_unsegmented: bool = False,
        select_best: int = 0,
        score_key: str = "score",
        selected_prefix: str = "selected/",
        selected_store: ObjectStore | None = None,
    ) -> None:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f}
        if not fields:
            raise ConfigError(
                f"frame key template {template!r} has no fields: every frame "
                "would overwrite the same object"
            )
        self.objects = objects
        self.template = template
        self.quality = quality
        self.workers = workers
        self.store_unsegmented = store_unsegmented
        self.select_best = select_best
        self.score_key = score_key
        self.selected_prefix = selected_prefix.rstrip("/") + "/" if selected_prefix else ""
        self.selected_store = selected_store
        self.name = "frame_store"
        self._lock = threading.Lock()
        self._by_segment: dict[str, list[tuple[int, str, float]]] = {}

    def key_for(self, frame: Frame) -> str:
        """The object key ``frame`` is stored under."""
        values = dict(frame.meta)
        values.update(
            source_id=frame.source_id,
            segment_id=frame.segment_id or "none",
            seq=frame.seq,
            ts_ms=frame.ts_ms,
        )
        try:
            return self.template.format(**values)
        except KeyError as exc:
            raise ConfigError(
                f"frame key template {self.template!r} uses {exc.args[0]!r}, "
                f"which frame {frame.source_id}#{frame.seq} does not have"
            ) from exc

    def write(self, frame: Frame) -> None:
        if frame.segment_id is None and not self.store_unsegmented:
            return
        key = self.key_for(frame)
        self.objects.put(key, frame.to_jpeg(self.quality))
        if frame.segment_id is not None:
            score = frame.meta.get(self.score_key)
            with self._lock:
                self._by_segment.setdefault(frame.segment_id, []).append(
                    (frame.seq, key, float(score) if score is not None else float("-inf"))
                )

    def segment_closed(self, segment: Segment) -> None:
        with self._lock:
            written = self._by_segment.pop(segment.id, [])
        written.sort()
        segment.stored = [key for _, key, _ in written]
        if self.select_best > 0 and written:
            best = heapq.nlargest(self.select_best, written, key=lambda w: (w[2], -w[0]))
            for _, key, _ in sorted(best):
                target = self.selected_prefix + key
                if self.selected_store is None:
                    self.objects.copy(key, target)
                else:
                    self.selected_store.put(target, self.objects.get(key))
                segment.selected.append(target)

    def list_frames(self, source_id: str, segment_id: str | None = None) -> list[ObjectInfo]:
        """Stored frames of a source (and segment), by key order; only for the default-shaped
        templates that start with ``<prefix>/{source_id}/{segment_id}/``."""
        prefix = self.template.split("{source_id}")[0] + f"{source_id}/"
        if segment_id is not None:
            prefix += f"{segment_id}/"
        return list(self.objects.list(prefix))

    def read_frames(self, source_id: str, segment_id: str) -> Iterator[Frame]:
        """The stored frames of one segment, decoded, in capture order (``ts_ms``, ``seq``
        from the default key names; key order otherwise)."""
        entries = []
        for info in self.list_frames(source_id, segment_id):
            stem = info.key.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            parts = stem.split("_")
            try:
                ts_ms, seq = int(parts[-2]), int(parts[-1])
            except (IndexError, ValueError):
                ts_ms, seq = 0, 0
            entries.append((ts_ms, seq, info.key))
        for ts_ms, seq, key in sorted(entries):
            yield Frame(
                image=decode_jpeg(self.objects.get(key)),
                source_id=source_id,
                seq=seq,
                ts_ms=ts_ms,
                segment_id=segment_id,
                meta={"key": key},
            )
