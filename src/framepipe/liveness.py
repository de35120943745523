"""Whether the process that owns something (an execution, a live app) is still alive.

An owner is ``host:pid:tag``, its host written ``hostname#namespace`` (:func:`this_host`: the
pid namespace's number). Only an owner of this very host and pid namespace has a pid that
means something here: that process is asked directly (gone or a zombie: dead). Any other owner,
another machine or another container that shares this host name (containers each count their
pids from 1), is alive while its heartbeat is fresh.
"""

from __future__ import annotations

import os
import socket
import time

__all__ = ["owner_is_dead", "pid_gone", "pid_namespace", "this_host", "this_owner"]


def pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]`` on Linux); "" where it cannot be
    read (another system, ``/proc`` not mounted). Two processes whose pids can be compared
    share it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def this_host() -> str:
    """This host as owners name it: ``hostname#namespace`` (the number of the pid namespace),
    or the bare host name where the namespace cannot be read (then no owner is judged by its
    pid: see the module)."""
    number = pid_namespace().removeprefix("pid:[").removesuffix("]")
    return f"{socket.gethostname()}#{number}" if number.isdigit() else socket.gethostname()


def this_owner(tag: str) -> str:
    """The owner string of an engine in this process: ``host:pid:tag``."""
    return f"{this_host()}:{os.getpid()}:{tag}"


def owner_is_dead(owner: str | None, heartbeat_at: float | None, stale_after: float) -> bool:
    """True when the engine that owns an execution is gone: its process is not alive on this
    host and in this pid namespace, or (anywhere else) its heartbeat is older than
    ``stale_after`` seconds."""
    if not owner:
        return True
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if "#" in host and host == this_host() and pid_text.isdigit():
        pid = int(pid_text)
        return pid != os.getpid() and pid_gone(pid)
    return heartbeat_at is None or time.time() - heartbeat_at > stale_after


def pid_gone(pid: int) -> bool:
    """Whether no live process ``pid`` runs in this pid namespace (a zombie counts as gone;
    another user's process, which may not be signalled, as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
