"""Whether the process that owns something (an execution, a live app) is still alive.

An owner is ``host:pid:tag``. On this host the process is asked directly (a zombie counts as
dead); another host's owner is alive while its heartbeat is fresh.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["owner_is_dead", "this_owner"]


def this_owner(tag: str) -> str:
    """The owner string of an engine in this process: ``host:pid:tag``."""
    return f"{socket.gethostname()}:{os.getpid()}:{tag}"


def owner_is_dead(owner: str | None, heartbeat_at: float | None, stale_after: float) -> bool:
    """True when the engine that owns an execution is gone: its process is not alive on this
    host, or (another host) its heartbeat is older than ``stale_after`` seconds."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host == socket.gethostname() and pid_text.isdigit():
        pid = int(pid_text)
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return _is_zombie(pid)
    return heartbeat_at is None or time.time() - heartbeat_at > stale_after


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
