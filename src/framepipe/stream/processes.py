"""Worker processes for stages whose processor holds the GIL (``Stage(fn, processes=N)``).

dlib's face encoder and much pure-Python work do not release the GIL, so threads of one
process take turns on one core. A process stage runs its processor in N worker processes
instead. Guarantees:

* Each worker process gets its own copy of the processor (pickled once, with the ``spawn``
  start method, so the parent's threads and locks never leak into it), calls ``setup()`` once
  when it starts and ``teardown()`` once when the stage stops.
* Pixels travel through shared memory, one buffer per worker: the frame's picture as it is (the
  decoder's YUV planes, a BGR array, or captured JPEG bytes); only metadata is pickled. What
  comes back is the frame's ``meta`` and ``segment_id`` and, only when the processor read
  ``frame.image`` (and so may have changed it), the image. The frame in the parent stays the
  same object, lazy when the processor only looked at ``gray``.
* A processor's events (``self.emit``) reach the pipeline in the order emitted, after the call
  that emitted them returns.
* An exception in ``process`` (any of :data:`FRAME_ERRORS`) is that frame's error, as in a
  thread. A worker process that dies (a segfault in native code, the OOM killer, ``kill -9``)
  is restarted with a fresh ``setup()``, and the frame it held is reported as a processor
  error naming the exit code; the stage goes on.
* :meth:`ProcessWorker.kill` (a stop that could not wait for a call that never returns) kills
  the process without its ``teardown()``; the call waiting on it returns an error and the
  process is not restarted.
* A processor that cannot be pickled (a lambda, a local function) or whose ``setup()`` raises
  fails the pipeline at start with a :class:`ConfigError` / :class:`ProcessorError` naming the
  stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import pickle
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from framepipe.errors import ConfigError, ProcessorError, WorkerDiedError
from framepipe.frames import Frame, JpegPicture, YuvPlanes
from framepipe.logs import get_logger
from framepipe.processors.base import Processor

__all__ = ["FRAME_ERRORS", "ProcessWorker"]

FRAME_ERRORS: tuple[type[BaseException], ...] = (Exception, SystemExit, asyncio.CancelledError)
"""What a processor call raises as the failure of the frame it was given, in a thread, a worker
process or on the event loop: any exception, ``sys.exit()``, and a ``CancelledError`` (an
awaited future or a nested event loop of the processor's cancelled). On the event loop a
``CancelledError`` from a cancellation of the task running the call is that task's, not the
frame's (see :mod:`framepipe.stream.hop`)."""

_SPAWN = multiprocessing.get_context("spawn")
_START_TIMEOUT = 120.0  # spawn, imports and the processor's setup (models load here)
_POLL = 0.2


@dataclass
class _Picture:
    kind: str  # "yuv" | "bgr" | "gray" | "jpeg"
    shape: tuple[int, ...]
    full_range: bool = False
    nbytes: int = 0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit code unknown"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit code {code}"


class _Slot:
    """A shared-memory buffer that grows (a new segment) when a picture does not fit."""

    def __init__(self) -> None:
        self.shm: SharedMemory | None = None

    def fit(self, nbytes: int) -> SharedMemory:
        if self.shm is None or self.shm.size < nbytes:
            self.close()
            self.shm = SharedMemory(create=True, size=max(nbytes, 1))
        return self.shm

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            with contextlib.suppress(FileNotFoundError):
                self.shm.unlink()
            self.shm = None


def _buffer(shm: SharedMemory) -> memoryview:
    buf = shm.buf
    assert buf is not None
    return buf


def _write(shm: SharedMemory, data: np.ndarray[Any, Any] | bytes) -> None:
    if isinstance(data, bytes):
        _buffer(shm)[: len(data)] = data
        return
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    np.frombuffer(_buffer(shm), np.uint8, raw.size)[:] = raw


def _frame_picture(frame: Frame) -> tuple[_Picture, np.ndarray[Any, Any] | bytes]:
    planes, jpeg = frame.planes, frame.captured_jpeg
    if planes is not None:
        return _Picture(
            "yuv", planes.data.shape, planes.full_range, planes.data.nbytes
        ), planes.data
    if jpeg is not None:
        return _Picture("jpeg", (len(jpeg),), nbytes=len(jpeg)), jpeg
    image = frame.image
    return _Picture("bgr", image.shape, nbytes=image.nbytes), image


def _read(shm: SharedMemory, picture: _Picture) -> np.ndarray[Any, Any]:
    count = int(np.prod(picture.shape))
    return np.frombuffer(_buffer(shm), np.uint8, count).reshape(picture.shape).copy()


class ProcessWorker:
    """The parent's handle on one worker process of a stage. Not thread-safe: one caller at a
    time (the stage gives each of its workers one handle)."""

    def __init__(self, processor: Processor, stage: str, index: int) -> None:
        self.stage = stage
        self.index = index
        self.processor = processor
        self.log = get_logger(f"{stage}.process{index}")
        self._payload = self._pickle(processor)
        self._slot = _Slot()
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self.restarts = 0
        self._killed = False

    def _pickle(self, processor: Processor) -> bytes:
        sink = processor.__dict__.pop("event_sink", None)
        try:
            return pickle.dumps(processor)
        except Exception as exc:
            raise ConfigError(
                f"stage {self.stage!r}: processes=N runs the processor in worker processes, "
                f"which needs it picklable (a module-level function, or an instance of a "
                f"module-level class): {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if sink is not None:
                processor.event_sink = sink

    @property
    def pid(self) -> int | None:
        """The worker process's pid (None before start)."""
        return None if self._process is None else int(self._process.pid)

    def start(self) -> None:
        """Spawn the process and wait until its ``setup()`` returned; raise what it raised."""
        parent, child = _SPAWN.Pipe()
        process = _SPAWN.Process(
            target=_serve,
            args=(child, self._payload),
            name=f"framepipe-{self.stage}-{self.index}",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn = process, parent
        try:
            reply = self._receive(_START_TIMEOUT, during="setup")
        except WorkerDiedError as exc:
            self.stop()
            raise ProcessorError(
                f"{exc}. Worker processes are spawned and import the main script again: "
                "is the code that starts the pipeline under if __name__ == '__main__':?",
                stage=self.stage,
            ) from exc
        if reply[0] == "setup_failed":
            self.stop()
            raise ProcessorError(
                f"setup() failed in worker process {self.index}: {reply[1]}", stage=self.stage
            )
        self._replay(reply[1])

    def call(self, frame: Frame) -> tuple[Any, BaseException | None, float]:
        """Run the processor on ``frame`` in the process: ``(result, error, seconds)`` like a
        threaded call. A dead process is restarted and the frame reported as its error."""
        started = time.perf_counter()
        picture, pixels = _frame_picture(frame)
        shm = self._slot.fit(picture.nbytes)
        _write(shm, pixels)
        header = (frame.source_id, frame.seq, frame.ts_ms, frame.pts, frame.segment_id)
        assert self._conn is not None
        try:
            self._conn.send(("frame", shm.name, picture, header, frame.meta))
            reply = self._receive(None, during=f"frame {frame.seq}")
        except WorkerDiedError as exc:
            if self._killed:
                return None, exc, time.perf_counter() - started
            self._restart()
            restarted = WorkerDiedError(f"{exc}; it was restarted")
            restarted.__cause__ = exc.__cause__
            return None, restarted, time.perf_counter() - started
        kind, events = reply[0], reply[-1]
        self._replay(events)
        if kind == "error":
            return None, _unpickle_error(reply[1]), reply[2]
        if kind == "none":
            return None, None, reply[1]
        if kind == "other":
            return pickle.loads(reply[1]), None, reply[2]
        _kind, image_picture, segment_id, meta, seconds, _events = reply
        frame.meta = meta
        frame.segment_id = segment_id
        if image_picture is not None:
            frame.image = _read(shm, image_picture)
        return frame, None, seconds

    def _receive(self, timeout: float | None, *, during: str) -> tuple[Any, ...]:
        conn, process = self._conn, self._process
        assert conn is not None
        assert process is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not conn.poll(_POLL):
            if not process.is_alive():
                process.join(1)
                raise WorkerDiedError(
                    f"worker process {self.index} (pid {process.pid}) died during {during} "
                    f"({_describe_exit(process.exitcode)})"
                )
            if deadline is not None and time.monotonic() > deadline:
                process.kill()
                raise ProcessorError(
                    f"worker process {self.index} did not finish {during} within {timeout:g}s",
                    stage=self.stage,
                )
        try:
            reply: tuple[Any, ...] = conn.recv()
        except (EOFError, OSError) as exc:
            process.join(1)
            raise WorkerDiedError(
                f"worker process {self.index} (pid {process.pid}) died during {during} "
                f"({_describe_exit(process.exitcode)})"
            ) from exc
        return reply

    def _replay(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        for event, data in events:
            self.processor.emit(event, **data)

    def _restart(self) -> None:
        self.restarts += 1
        self.log.warning(
            "worker process %d of stage %r died: restarting it", self.index, self.stage
        )
        self._close_process(kill=True)
        self.start()

    def kill(self) -> None:
        """Kill the process now, without its ``teardown()``, and restart it no more; callable
        from any thread while another one waits in :meth:`call` (which then returns the
        frame's error). :meth:`stop` still releases the pipe and the shared memory."""
        self._killed = True
        process = self._process
        if process is not None:
            with contextlib.suppress(ValueError):  # already closed by stop()
                process.kill()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the process to run ``teardown()`` and exit; kill it after ``timeout``."""
        conn, process = self._conn, self._process
        if conn is not None and process is not None and process.is_alive():
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                conn.send(("stop",))
                if conn.poll(timeout):
                    conn.recv()
            process.join(timeout)
        self._close_process(kill=True)
        self._slot.close()

    def _close_process(self, *, kill: bool) -> None:
        process, conn = self._process, self._conn
        if process is not None:
            if kill and process.is_alive():
                process.kill()
            process.join(5)
        if conn is not None:
            conn.close()
        self._process, self._conn = None, None


def _unpickle_error(data: bytes) -> BaseException:
    try:
        error = pickle.loads(data)
    except Exception as exc:  # an exception type the parent cannot rebuild
        return ProcessorError(f"an error that could not be read back: {exc}")
    return error if isinstance(error, BaseException) else ProcessorError(str(error))


def _pickle_error(exc: BaseException) -> bytes:
    try:
        return pickle.dumps(exc)
    except Exception:
        return pickle.dumps(RuntimeError(f"{type(exc).__name__}: {exc}"))


# -- the worker process ---------------------------------------------------------------------


class _Attached:
    def __init__(self) -> None:
        self.shm: SharedMemory | None = None

    def get(self, name: str) -> SharedMemory:
        if self.shm is None or self.shm.name != name:
            if self.shm is not None:
                self.shm.close()
            self.shm = SharedMemory(name=name)
        return self.shm


def _child_frame(shm: SharedMemory, picture: _Picture, header: tuple[Any, ...], meta: Any) -> Frame:
    source_id, seq, ts_ms, pts, segment_id = header
    if picture.kind == "jpeg":
        data = bytes(_buffer(shm)[: picture.nbytes])
        return Frame(None, source_id, seq, ts_ms, pts, segment_id, meta, picture=JpegPicture(data))
    array = _read(shm, picture)
    if picture.kind == "yuv":
        planes = YuvPlanes(array, full_range=picture.full_range)
        return Frame(None, source_id, seq, ts_ms, pts, segment_id, meta, picture=planes)
    return Frame(array, source_id, seq, ts_ms, pts, segment_id, meta)


def _serve(conn: multiprocessing.connection.Connection, payload: bytes) -> None:
    """The worker process: set up, then handle frames until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    events: list[tuple[str, dict[str, Any]]] = []
    try:
        processor: Processor = pickle.loads(payload)
        processor.event_sink = lambda event, data: events.append((event, dict(data)))
        processor.setup()
    except BaseException as exc:
        conn.send(("setup_failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        return
    conn.send(("ready", list(events)))
    attached = _Attached()
    try:
        while True:
            message = conn.recv()
            if message[0] == "stop":
                break
            events.clear()
            _kind, name, picture, header, meta = message
            shm = attached.get(name)
            frame = _child_frame(shm, picture, header, meta)
            conn.send(_handle(processor, frame, shm, events))
    finally:
        try:
            processor.teardown()
        finally:
            with contextlib.suppress(OSError):
                conn.send(("stopped",))
            if attached.shm is not None:
                attached.shm.close()


def _handle(
    processor: Processor, frame: Frame, shm: SharedMemory, events: list[Any]
) -> tuple[Any, ...]:
    started = time.perf_counter()
    try:
        result = processor.process(frame)
    except FRAME_ERRORS as exc:
        return ("error", _pickle_error(exc), time.perf_counter() - started, list(events))
    seconds = time.perf_counter() - started
    if result is None:
        return ("none", seconds, list(events))
    if not isinstance(result, Frame):
        return ("other", pickle.dumps(result), seconds, list(events))
    image_picture: _Picture | None = None
    if result.planes is None and result.captured_jpeg is None:  # image read: maybe changed
        image = np.ascontiguousarray(result.image)
        kind = "gray" if image.ndim == 2 else "bgr"
        if image.nbytes <= shm.size and image.dtype == np.uint8:
            _write(shm, image)
            image_picture = _Picture(kind, image.shape, nbytes=image.nbytes)
        else:
            return ("other", pickle.dumps(result), seconds, list(events))
    return ("frame", image_picture, result.segment_id, result.meta, seconds, list(events))
