"""Which process owns a reservation, and whether that process is still alive.

A reservation left open by a process that died is refunded by ``meter.recover()``; one
owned by a live process is never touched. An owner is ``host:pid:start``, where ``start``
is the process's start time in clock ticks since boot (Linux ``/proc``), so that a new
process that reuses a dead one's pid is not mistaken for it.
"""

from __future__ import annotations

import os
import socket
from functools import cache

__all__ = ["current_owner", "owner_is_alive"]


def _start_ticks(pid: int) -> str:
    """The start time of ``pid`` ("?" where /proc is missing; "" for a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            # the command name (field 2) may contain spaces: split after its closing ")"
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "?"
    if fields[0] in ("Z", "X"):  # killed but not yet reaped: it runs no more code
        return ""
    return fields[19]  # field 22 of the whole line: starttime


@cache
def _host() -> str:
    return socket.gethostname()


_cached_owner: tuple[int, str] | None = None


def current_owner() -> str:
    """The owner string of this process (recomputed after a fork)."""
    global _cached_owner  # noqa: PLW0603 - one value per process, refreshed after fork
    pid = os.getpid()
    if _cached_owner is None or _cached_owner[0] != pid:
        _cached_owner = (pid, f"{_host()}:{pid}:{_start_ticks(pid)}")
    return _cached_owner[1]


def owner_is_alive(owner: str) -> bool:  # noqa: PLR0911 - one answer per kind of evidence
    """Whether the process named by ``owner`` may still be running.

    Owners on another host are assumed alive: this process cannot see them.
    """
    try:
        host, pid_text, start = owner.rsplit(":", 2)
        pid = int(pid_text)
    except ValueError:
        return True  # not ours to judge
    if host != _host():
        return True
    if pid == os.getpid():
        return owner == current_owner()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now_start = _start_ticks(pid)
    if now_start == "":
        return False
    return start == "?" or now_start in ("?", start)
