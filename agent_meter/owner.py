"""Which process owns a reservation, and whether that process is still alive.

A reservation left open by a process that died is refunded by ``meter.recover()``; one
owned by a live process is never touched, and neither is one whose owner cannot be
*proven* dead: refunding a live call would make its work free.

An owner is ``host:pid:start:pidns``:

- ``pid`` alone is not an identity: containers sharing a volume (and often a hostname)
  each number their processes from 1, and pids are reused. So the owner also names
- ``start``, the process's start time in clock ticks since boot (Linux ``/proc``), so that
  a new process that reuses a dead one's pid is not mistaken for it, and
- ``pidns``, the inode of the process's PID namespace: a pid means something only inside
  its namespace. A process in another namespace cannot be seen from here, so it is
  presumed alive.

Owners written by older versions (``host:pid:start``, no namespace) are judged as they
were then, on the host, pid and start time.
"""

from __future__ import annotations

import os
import socket
from functools import cache

__all__ = ["current_owner", "owner_is_alive"]

_UNKNOWN = "?"


def _start_ticks(pid: int | str) -> str:
    """The start time of ``pid`` ("?" where /proc is missing; "" for a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            # the command name (field 2) may contain spaces: split after its closing ")"
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return _UNKNOWN
    if fields[0] in ("Z", "X"):  # killed but not yet reaped: it runs no more code
        return ""
    return fields[19]  # field 22 of the whole line: starttime


def _pid_namespace(pid: int | str) -> str:
    """The inode of the PID namespace of ``pid`` ("?" where it cannot be read)."""
    try:
        link = os.readlink(f"/proc/{pid}/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return _UNKNOWN
    return link.rsplit("[", 1)[-1].rstrip("]") or _UNKNOWN


@cache
def _host() -> str:
    return socket.gethostname()


_cached_owner: tuple[int, str] | None = None


def current_owner() -> str:
    """The owner string of this process (recomputed after a fork)."""
    global _cached_owner  # noqa: PLW0603 - one value per process, refreshed after fork
    pid = os.getpid()
    if _cached_owner is None or _cached_owner[0] != pid:
        # /proc/self, not /proc/<pid>: inside a PID namespace whose /proc was not
        # remounted, /proc/<pid> names another process of the host
        owner = f"{_host()}:{pid}:{_start_ticks('self')}:{_pid_namespace('self')}"
        _cached_owner = (pid, owner)
    return _cached_owner[1]


def owner_is_alive(owner: str) -> bool:  # noqa: PLR0911 - one answer per kind of evidence
    """Whether the process named by ``owner`` may still be running.

    True unless this process can prove the owner dead: owners on another host or in
    another PID namespace are presumed alive, since this process cannot see them.
    """
    parts = owner.split(":")
    if len(parts) == 4:
        host, pid_text, start, namespace = parts
    elif len(parts) == 3:  # written before owners named their namespace
        host, pid_text, start = parts
        namespace = None
    else:
        return True  # not ours to judge
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    if host != _host():
        return True
    if owner == current_owner():
        return True
    if namespace is not None:
        mine = _pid_namespace("self")
        if _UNKNOWN in (namespace, mine) or namespace != mine:
            return True  # its pid means nothing here
    if pid == os.getpid():
        return False  # this pid is this process, which is not the owner
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    now_start = _start_ticks(pid)
    if now_start == "":
        return False
    return start == _UNKNOWN or now_start in (_UNKNOWN, start)
