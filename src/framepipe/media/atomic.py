"""Outputs written atomically: every file the toolkit writes goes to a temp file beside its
destination, is flushed to the disk and renamed when complete, so a failed, interrupted or killed
run, or a power cut, never leaves a partial file that looks done."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from framepipe.errors import MediaError
from framepipe.locks import try_lock

__all__ = ["TEMP_SLOTS", "atomic_output", "scratch_outputs"]

TEMP_SLOTS = 8
"""Temp files one output can have at once (writers of the same ``dst`` at the same time)."""

_OPEN_FLAGS = os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)

_DURABLE: contextvars.ContextVar[bool] = contextvars.ContextVar("durable_outputs", default=True)


@contextlib.contextmanager
def scratch_outputs() -> Iterator[None]:
    """Within this block (this thread or task), :func:`atomic_output` does not flush to the
    disk: for outputs written to a scratch folder that is uploaded and then deleted (a job
    step's work folder), where a power cut loses the folder anyway and a flush per file (about
    5 ms on an ext4 disk) would dominate writing many small images. Still atomic."""
    token = _DURABLE.set(False)
    try:
        yield
    finally:
        _DURABLE.reset(token)


def _temp_slot(dst: Path, slot: int) -> Path:
    """The name of ``dst``'s temp file number ``slot``: ``.out.part.mp4``, ``.out.1.part.mp4``
    ... (the suffix kept: writers choose the format by it)."""
    number = f".{slot}" if slot else ""
    return dst.with_name(f".{dst.stem}{number}.part{dst.suffix}")


def _same_file(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd`` (not renamed or replaced)."""
    try:
        here = os.lstat(path)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _claim_temp(dst: Path) -> tuple[int | None, Path]:
    """A locked, empty temp file for ``dst``: (its locked descriptor, its path).

    Takes the first slot no live writer holds, reusing what a killed writer left there
    (truncated), then removes the files of the later slots that no live writer holds. On a
    file system without locks: a new, randomly named file and no descriptor."""
    for slot in range(TEMP_SLOTS):
        tmp = _temp_slot(dst, slot)
        while True:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o666)
            locked = try_lock(fd)
            if locked is None:
                with contextlib.suppress(OSError):
                    if os.fstat(fd).st_size == 0:
                        tmp.unlink()
                os.close(fd)
                return None, dst.with_name(f".{dst.stem}.{secrets.token_hex(4)}.part{dst.suffix}")
            # A writer that finished between our open and our lock renamed the file to dst:
            # holding its lock says nothing about the slot, which must be opened again.
            if locked and not _same_file(fd, tmp):
                os.close(fd)
                continue
            break
        if not locked:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        for later in range(slot + 1, TEMP_SLOTS):
            _remove_abandoned(_temp_slot(dst, later))
        return fd, tmp
    raise MediaError(dst, f"{TEMP_SLOTS} writes of this file are already in progress")


def _remove_abandoned(path: Path) -> None:
    """Delete the temp file ``path`` if no live writer holds its lock (its writer was killed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _OPEN_FLAGS)
    except OSError:
        return  # none there (the usual case), or a link or something else: not ours
    try:
        if try_lock(fd) and _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


def _flush_file(path: Path) -> None:
    """Flush ``path``'s data to the disk (opened anew: the writer may have replaced the file)."""
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _flush_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to the disk, where the file system can."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(dst: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``dst`` (same suffix); rename it to ``dst`` on success.

    On any exception (including ``KeyboardInterrupt``) the temp file is removed and ``dst`` is
    left as it was, so a failed run never leaves a partial file that looks done.

    A writer that is killed (SIGKILL, a SIGTERM without a handler, a power cut) cannot remove
    its temp file, so temp files have fixed names per ``dst`` (``.out.part.mp4``, then
    ``.out.1.part.mp4`` ... for writes of the same ``dst`` at the same time, at most
    :data:`TEMP_SLOTS`), each held under an exclusive lock (``flock``) while its writer lives:
    the next write of ``dst`` reuses the first slot nobody holds and deletes the later ones
    nobody holds, so a killed run's partial file lasts until the next write of the same output,
    and a write in progress is never disturbed. Temp files are opened without following a
    symbolic link.

    Durability: the temp file's data is flushed to the disk (``fsync``) before the rename, and
    the folder (holding the rename) after it, so once this returns ``dst`` survives a power cut
    complete, and a power cut before that leaves ``dst`` as it was or complete (and perhaps a
    temp file), never a ``dst`` with missing data. An I/O error while flushing fails the
    write (flushing the file: ``dst`` is left as it was); a file system that cannot flush a
    folder at all is not an error. Inside :func:`scratch_outputs` nothing is flushed."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _claim_temp(dst)
    try:
        yield tmp
        durable = _DURABLE.get()
        if durable:
            _flush_file(tmp)
        os.replace(tmp, dst)
        if durable:
            _flush_folder(dst.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        if fd is not None:
            os.close(fd)
