"""Settle markers: how a successful call is closed without a commit of its own.

A reservation opens a hold in the ledger's commit; a success must close it so that
``recover()`` never refunds it. Closing it with its own commit doubles the cost of the
success path, so instead the success is appended to this process's journal (one
``write``, which survives the process being killed as a commit does under
``synchronous=NORMAL``), and the hold is closed in the ledger by the next write
transaction, whatever it is for: markers are *folded* into it.

The journal is a file next to the ledger, one per backend instance
(``<ledger>-settled-<token>``): its first line names the owner process (see
:mod:`agent_meter.owner`), each further line is the key of a hold whose call succeeded.
``recover()`` closes, without a refund, every hold named in the journal of a process that
ended, then removes that journal. A marker outliving its hold is harmless: a call that
succeeded is never reserved again (a replay deducts nothing and opens no hold).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
from collections.abc import Iterable
from pathlib import Path

from agent_meter.owner import current_owner, owner_is_alive

__all__ = ["SettleJournal"]

_SUFFIX = "-settled-"
_COMPACT_AT = 1 << 20
"""Bytes of markers, all folded, after which the journal is emptied (stale markers are
harmless, so this only bounds the file)."""


class SettleJournal:
    """This process's settle markers for one ledger, and what the ended processes left.

    Thread-safe. :meth:`record` appends a marker; :meth:`take` hands the unfolded ones to
    the next transaction, which reports back with :meth:`folded`.

    Args:
        ledger: The ledger file the journal sits next to.
    """

    def __init__(self, ledger: Path) -> None:
        self._ledger = ledger
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = self._header = 0
        self._pending: list[str] = []
        self._in_flight = 0
        self._broken = False

    def __repr__(self) -> str:
        return f"SettleJournal({self._path or self._ledger})"

    # -- this process ------------------------------------------------------------------

    def record(self, key: str) -> bool:
        """Append a marker for ``key``; False when it could not be written (disk full).

        Then the caller closes the hold with a commit of its own, as before journals.
        """
        line = f"{key}\n".encode()
        with self._lock:
            if self._broken:
                return False
            try:
                fd = self._fd if self._fd is not None else self._open()
                written = os.write(fd, line)
            except OSError:
                return False
            if written != len(line):  # a short write (disk full): this marker is not whole
                self._broken = True  # a torn line must stay the last one
                return False
            self._size += written
            self._pending.append(key)
        return True

    def _open(self) -> int:
        path = Path(f"{self._ledger}{_SUFFIX}{secrets.token_hex(8)}")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            header = f"{current_owner()}\n".encode()
            if os.write(fd, header) != len(header):
                raise OSError("short write")
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        self._fd, self._path = fd, path
        self._size = self._header = len(header)
        return fd

    def take(self) -> list[str]:
        """The markers not yet folded, for the transaction about to commit (may be empty)."""
        if not self._pending:  # read without the lock: a marker added meanwhile waits
            return []
        with self._lock:
            taken, self._pending = self._pending, []
            self._in_flight += 1
        return taken

    def folded(self, keys: list[str], *, committed: bool) -> None:
        """Report on the transaction that took ``keys``: committed, or rolled back."""
        if not keys:
            return
        with self._lock:
            self._in_flight -= 1
            if not committed:
                self._pending[:0] = keys
            elif not self._pending and not self._in_flight and self._size > _COMPACT_AT:
                self._compact()

    def _compact(self) -> None:
        """Empty the journal down to its header: every marker in it is folded."""
        assert self._fd is not None  # noqa: S101 - markers were written through it
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._header)
            self._size = self._header

    def pending(self) -> set[str]:
        """Keys recorded but not yet folded into the ledger."""
        with self._lock:
            return set(self._pending)

    def close(self, *, folded: bool) -> None:
        """Close the journal; remove it when every marker in it is folded."""
        with self._lock:
            fd, path, self._fd, self._path = self._fd, self._path, None, None
            keep = bool(self._pending) or not folded
        if fd is None:
            return
        os.close(fd)
        if path is not None and not keep:
            path.unlink(missing_ok=True)

    def after_fork(self) -> None:
        """In a forked child: the parent's journal and markers stay the parent's."""
        with contextlib.suppress(OSError):
            if self._fd is not None:
                os.close(self._fd)
        self._lock = threading.Lock()
        self._fd, self._path, self._size, self._header = None, None, 0, 0
        self._pending, self._in_flight, self._broken = [], 0, False

    # -- every process's -------------------------------------------------------------------

    def settled_keys(self) -> set[str]:
        """Every key any journal of this ledger records (this process's included)."""
        keys = self.pending()
        for _, _, recorded in self._journals():
            keys.update(recorded)
        return keys

    def ended(self) -> list[tuple[Path, list[str]]]:
        """The journals of processes that ended, with their keys (for ``recover()``)."""
        return [
            (path, recorded)
            for path, owner, recorded in self._journals()
            if path != self._path and not owner_is_alive(owner)
        ]

    def _journals(self) -> Iterable[tuple[Path, str, list[str]]]:
        parent, prefix = self._ledger.parent, f"{self._ledger.name}{_SUFFIX}"
        try:
            names = [name for name in os.listdir(parent) if name.startswith(prefix)]
        except OSError:
            return
        for name in names:
            path = parent / name
            try:
                text = path.read_bytes().decode("utf-8", "replace")
            except OSError:
                continue  # removed by a racing recovery
            lines = text.split("\n")
            if len(lines) < 2 or not lines[0]:
                continue  # a journal whose owner line is not whole yet: being created
            # the last piece is empty after a whole line, or a torn marker: never a key
            yield path, lines[0], [line for line in lines[1:-1] if line]
