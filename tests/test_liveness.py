"""Whether the owner of an execution or the worker behind a lease is alive: judged by its pid
only in this very host and pid namespace, by its heartbeat anywhere else (another machine, or
another container that shares this host name and counts its pids from 1 as well)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from framepipe.liveness import owner_is_dead, this_host, this_owner


def _gone_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no process has it (for a while)


def test_an_owner_of_this_host_and_namespace_is_judged_by_its_pid() -> None:
    assert this_owner("t").startswith(f"{this_host()}:{os.getpid()}:")
    assert not owner_is_dead(this_owner("t"), None, 10)
    gone = _gone_pid()
    assert owner_is_dead(f"{this_host()}:{gone}:t", time.time(), 10)  # a fresh beat: still


def test_an_owner_of_another_pid_namespace_under_this_host_name_is_judged_by_its_heartbeat() -> (
    None
):
    """A container sharing this host name: its pid means nothing here, however it looks."""
    gone = _gone_pid()
    other = f"{socket.gethostname()}#1:{gone}:t"
    assert not owner_is_dead(other, time.time(), 10)
    assert owner_is_dead(other, time.time() - 60, 10)
    bare = f"{socket.gethostname()}:{gone}:t"  # written by a version without namespaces
    assert not owner_is_dead(bare, time.time(), 10)
