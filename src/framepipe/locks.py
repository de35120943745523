"""Advisory file locks that mark a file as held by a live process: the kernel releases a
``flock`` however its process ends (SIGKILL, the OOM killer), so a lock that can be taken
is the sign that its holder is gone. Used for a writer's temp files
(:mod:`framepipe.media.atomic`) and a step's folders (:mod:`framepipe.jobs.scratch`).
"""

from __future__ import annotations

import errno
import fcntl

__all__ = ["try_lock"]


def try_lock(fd: int) -> bool | None:
    """Take ``fd``'s exclusive lock without waiting: True, False if a live process holds it,
    None if the file system has no locks."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True
