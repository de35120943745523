"""Micro-batching of calls made from many threads: :class:`Batcher`.

A live stage's workers each hold one frame; a model that runs a batch about as fast as one
frame wants them together. Guarantees:

* One thread takes the first request, waits up to ``max_wait`` seconds for more (at most
  ``size``), and runs each group of requests with the same ``group_key`` (e.g. the same input
  shapes: they can be stacked) as one call.
* Every caller gets its own result, in the order its request was made within the call, or
  its own exception: a call that fails is made again request by request, so one bad request
  fails only itself.
* ``close()`` runs what was submitted, then stops the thread; a request submitted after it
  gets None.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Batcher"]

In = TypeVar("In")
Out = TypeVar("Out")

_STOP = object()


@dataclass
class _Request(Generic[In, Out]):
    item: In
    future: concurrent.futures.Future[Out]


class Batcher(Generic[In, Out]):
    """Runs ``run(items) -> results`` (one result per item, in order) on batches of items
    submitted from many threads (see the module)."""

    def __init__(
        self,
        run: Callable[[list[In]], list[Out]],
        *,
        size: int,
        max_wait: float,
        group_key: Callable[[In], Hashable] = lambda _item: None,
        name: str = "batcher",
    ) -> None:
        if size < 1 or max_wait < 0:
            raise ValueError(f"batch size must be >= 1 and max_wait >= 0, got {size}, {max_wait}")
        self.run = run
        self.size = size
        self.max_wait = max_wait
        self.group_key = group_key
        self._queue: queue.SimpleQueue[_Request[In, Out] | object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: In) -> Out | None:
        """This item's result, once its batch ran (blocks the calling thread); None when the
        batcher was closed before it took the item."""
        request: _Request[In, Out] = _Request(item, concurrent.futures.Future())
        with self._lock:
            if self._closed:
                return None
            self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        """Run what was submitted, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            assert isinstance(first, _Request)
            batch: list[_Request[In, Out]] = [first]
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.size:
                remaining = deadline - time.monotonic()
                try:
                    item = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                assert isinstance(item, _Request)
                batch.append(item)
            groups: dict[Hashable, list[_Request[In, Out]]] = {}
            for request in batch:
                groups.setdefault(self.group_key(request.item), []).append(request)
            for group in groups.values():
                self._dispatch(group)

    def _dispatch(self, group: list[_Request[In, Out]]) -> None:
        try:
            results = self.run([r.item for r in group])
        except Exception as exc:
            if len(group) == 1:
                group[0].future.set_exception(exc)
                return
            for request in group:  # one bad item fails only itself
                self._dispatch([request])
            return
        for request, out in zip(group, results, strict=True):
            request.future.set_result(out)
