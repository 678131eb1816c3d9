"""The durable outbox: usage the backend has not acknowledged yet, and open reservations.

Every track or refund that cannot be delivered at once (the backend is down, or it is
remote and delivery happens off the caller's path) waits here, in a SQLite file, with its
original idempotency key, until the backend acknowledges it (200, or 409 duplicate). A
track the backend rejects for good is set aside with its reason instead of being retried
forever. Entries survive the process: the next meter opened on the same file delivers them.

For backends that cannot record a reservation in the same commit as the deduction
(Autumn), the outbox is also the journal of open holds, so that ``meter.recover()`` can
refund the reservations of processes that died.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_meter.engine import FinalizeRequest, Hold, TrackRequest, VoidReserve
from agent_meter.errors import AgentMeterError, BackendError, BackendUnavailable

__all__ = ["Outbox", "OutboxEntry", "Queued"]

Queued = TrackRequest | FinalizeRequest | VoidReserve
"""What waits in the outbox: a track (usage, refund, adjustment), a lock's finalize, or the
void of a keyed reserve whose answer was lost."""

logger = logging.getLogger("agent_meter")

_open_outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()


def _reopen_in_child() -> None:
    """After ``os.fork()``, each outbox opens its own connection in the child."""
    for outbox in list(_open_outboxes):
        outbox._reopen_after_fork()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reopen_in_child)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tracks (
    key TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    feature_id TEXT NOT NULL,
    value REAL NOT NULL,
    entity_id TEXT,
    properties TEXT,
    created_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | set_aside
    error TEXT,
    action TEXT,                              -- NULL: a track; confirm | release: a lock;
                                              -- void: a reserve in doubt
    held REAL                                 -- a lock's held units
);
CREATE INDEX IF NOT EXISTS tracks_due ON tracks (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS tracks_by_customer ON tracks (customer_id, state);
CREATE TABLE IF NOT EXISTS holds (
    key TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL,
    feature_id TEXT NOT NULL,
    units REAL NOT NULL,
    entity_id TEXT,
    refund_key TEXT NOT NULL,
    owner TEXT NOT NULL,
    created_at REAL NOT NULL,
    state TEXT NOT NULL,                      -- asking (answer unknown) | held
    lock INTEGER NOT NULL DEFAULT 0           -- 1: a lock, settled by finalize
);
CREATE TABLE IF NOT EXISTS unverified (       -- calls run unverified in the current outage,
    customer_id TEXT PRIMARY KEY,             -- per customer, by every process sharing
    calls INTEGER NOT NULL,                   -- this outbox (the allow policy's cap)
    since REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settled (          -- ledger holds of calls that succeeded but
    key TEXT PRIMARY KEY,                     -- could not be closed: never to be refunded
    at REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A track waiting in the outbox.

    Attributes:
        request: The track, with its original idempotency key.
        attempts: Delivery attempts so far.
        error: Why the last attempt failed (or why it was set aside).
    """

    request: Queued
    attempts: int
    error: str | None


class Outbox:
    """A durable queue of tracks and a journal of holds, in one SQLite file.

    Args:
        path: The file (created if missing); None keeps the outbox in memory, for
            backends whose ledger is in memory too.
        busy_timeout: Seconds to wait for another process holding the file.
    """

    def __init__(self, path: str | Path | None, *, busy_timeout: float = 30.0) -> None:
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._unreadable: list[AgentMeterError] = []
        self._inherited: list[sqlite3.Connection] = []
        self._conn = self._connect()
        _open_outboxes.add(self)

    def _connect(self) -> sqlite3.Connection:
        target = ":memory:" if self.path is None else str(self.path)
        try:
            conn = sqlite3.connect(
                target, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)
            for table, column, kind in (
                ("tracks", "action", "TEXT"),
                ("tracks", "held", "REAL"),
                ("holds", "lock", "INTEGER NOT NULL DEFAULT 0"),
            ):
                columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if column not in columns:  # an outbox written by an older version
                    conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.Error as exc:
            msg = f"cannot open the outbox {target}: {exc}"
            raise BackendError(msg) from exc
        return conn

    def _reopen_after_fork(self) -> None:
        """In a forked child: a connection of its own; the parent's is kept, never used.

        An in-memory outbox is the parent's copy: the child keeps it (nothing is shared).
        """
        self._lock = threading.Lock()
        if self.path is None:
            return
        self._inherited.append(self._conn)
        try:
            self._conn = self._connect()
        except BackendError:
            logger.exception("agent_meter: the outbox could not be reopened after fork")

    def __repr__(self) -> str:
        return f"Outbox({str(self.path) if self.path else ':memory:'!r})"

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                msg = f"{self!r}: {exc}"
                raise BackendUnavailable(msg) from exc

    @contextmanager
    def _statement(self) -> Iterator[sqlite3.Connection]:
        """The connection, for one statement under the lock; sqlite3's errors mapped."""
        with self._lock:
            try:
                yield self._conn
            except sqlite3.OperationalError as exc:
                msg = f"{self!r}: {exc}"
                raise BackendUnavailable(msg) from exc
            except sqlite3.Error as exc:
                msg = f"{self!r}: {exc}"
                raise BackendError(msg) from exc

    def _run(self, sql: str, params: Iterable[object] = ()) -> int:
        """Run one statement, committed on its own; returns how many rows it changed."""
        with self._statement() as conn:
            return conn.execute(sql, tuple(params)).rowcount

    def _query(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        with self._statement() as conn:
            return conn.execute(sql, tuple(params)).fetchall()

    # -- tracks ----------------------------------------------------------------------------

    def put(self, requests: Iterable[Queued], *, now: float, close_hold: str | None = None) -> bool:
        """Queue tracks durably (a key already queued is kept once), closing a hold with them.

        Args:
            requests: The tracks.
            now: Unix time, the tracks' first due time.
            close_hold: A hold the tracks settle. It is closed in the same commit, and the
                tracks are queued only if it was still open: of several processes racing
                to settle one hold (two recoveries), exactly one queues its refund.

        Returns:
            False when ``close_hold`` was already closed (nothing was queued).
        """
        rows = [_row(r, now) for r in requests]
        with self._transaction() as conn:
            if (
                close_hold is not None
                and conn.execute("DELETE FROM holds WHERE key = ?", (close_hold,)).rowcount == 0
            ):
                return False
            conn.executemany(
                "INSERT INTO tracks (key, customer_id, feature_id, value, entity_id, properties,"
                " created_at, next_attempt_at, action, held) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (key) DO NOTHING",
                rows,
            )
        return True

    def due(
        self, now: float, *, customer_id: str | None = None, limit: int = 100
    ) -> list[OutboxEntry]:
        """Pending tracks due now (or all of one customer's), oldest first.

        A customer's tracks are delivered in the order they were queued (a track capped at
        0 and a refund give another balance in the other order): while one of them waits
        for its back-off, the customer's later ones wait too.
        """
        if customer_id is None:
            rows = self._query(
                "SELECT key, customer_id, feature_id, value, entity_id, properties, attempts,"
                " error, action, held FROM tracks WHERE state = 'pending' AND next_attempt_at <= ?1"
                " AND customer_id NOT IN (SELECT customer_id FROM tracks"
                " WHERE state = 'pending' AND next_attempt_at > ?1)"
                " ORDER BY created_at, rowid LIMIT ?2",
                (now, limit),
            )
        else:
            rows = self._query(
                "SELECT key, customer_id, feature_id, value, entity_id, properties, attempts,"
                " error, action, held FROM tracks WHERE state = 'pending' AND customer_id = ?"
                " ORDER BY created_at, rowid LIMIT ?",
                (customer_id, limit),
            )
        return self._decoded(rows)

    def _decoded(self, rows: list[tuple[Any, ...]]) -> list[OutboxEntry]:
        """The rows as entries; a row that cannot be read is set aside, never in the way.

        One undecodable row (a damaged file, a foreign writer) must not stop the delivery
        of every other track: it is kept with its reason, like a track the backend
        rejected for good, and reported by the next ``flush()``.
        """
        entries = []
        for row in rows:
            try:
                entries.append(_entry(row))
            except (ValueError, TypeError) as exc:
                reason = f"unreadable outbox row ({type(exc).__name__}: {exc})"
                self._run(
                    "UPDATE tracks SET state = 'set_aside', error = ? WHERE key = ?",
                    (reason, row[0]),
                )
                logger.error("agent_meter: track %r set aside: %s", row[0], reason)
                self._unreadable.append(
                    BackendError(f"{self!r}: track {row[0]!r} set aside: {reason}")
                )
        return entries

    def take_unreadable(self) -> list[AgentMeterError]:
        """The rows set aside as unreadable since the last call, as errors to report."""
        with self._lock:
            taken, self._unreadable = self._unreadable, []
        return taken

    def delivered(self, key: str) -> None:
        """The backend acknowledged ``key``: forget it."""
        self._run("DELETE FROM tracks WHERE key = ?", (key,))

    def retry_later(self, key: str, error: str, at: float) -> None:
        """Delivery of ``key`` failed for now: try again at ``at``."""
        self._run(
            "UPDATE tracks SET attempts = attempts + 1, next_attempt_at = ?, error = ?"
            " WHERE key = ?",
            (at, error, key),
        )

    def set_aside(self, key: str, reason: str) -> None:
        """The backend rejected ``key`` for good: keep it, with the reason, undelivered."""
        self._run(
            "UPDATE tracks SET attempts = attempts + 1, state = 'set_aside', error = ?"
            " WHERE key = ?",
            (reason, key),
        )

    def mark_void_absent(self, key: str) -> None:
        """The backend had not received the reserve of void ``key``: nothing to refund."""
        self._run("UPDATE tracks SET value = 0 WHERE key = ? AND action = 'void'", (key,))

    def pending(self, customer_id: str | None = None) -> int:
        """How many tracks wait for delivery (for one customer when named)."""
        if customer_id is None:
            rows = self._query("SELECT count(*) FROM tracks WHERE state = 'pending'")
        else:
            rows = self._query(
                "SELECT count(*) FROM tracks WHERE state = 'pending' AND customer_id = ?",
                (customer_id,),
            )
        return int(rows[0][0])

    def pending_customers(self) -> set[str]:
        """The customers with tracks or finalizes waiting for delivery."""
        rows = self._query("SELECT DISTINCT customer_id FROM tracks WHERE state = 'pending'")
        return {str(row[0]) for row in rows}

    def keys(self) -> set[str]:
        """The keys of every track and finalize kept here, pending or set aside."""
        return {str(row[0]) for row in self._query("SELECT key FROM tracks")}

    def next_due(self) -> float | None:
        """When the earliest pending track is due, or None when nothing is pending."""
        rows = self._query("SELECT min(next_attempt_at) FROM tracks WHERE state = 'pending'")
        value = rows[0][0]
        return None if value is None else float(value)

    def set_aside_entries(self) -> list[OutboxEntry]:
        """Tracks the backend rejected for good, with their reasons."""
        rows = self._query(
            "SELECT key, customer_id, feature_id, value, entity_id, properties, attempts, error,"
            " action, held FROM tracks WHERE state = 'set_aside' ORDER BY created_at"
        )
        return [_entry(row, lenient=True) for row in rows]

    # -- the hold journal (for backends that cannot hold in the ledger) ----------------------

    def open_hold(self, hold: Hold) -> None:
        """Record a hold before its check is sent: its answer is unknown until marked."""
        self._run(
            "INSERT INTO holds (key, customer_id, feature_id, units, entity_id, refund_key,"
            " owner, created_at, state, lock) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'asking', ?)"
            " ON CONFLICT (key) DO NOTHING",
            (
                hold.key,
                hold.customer_id,
                hold.feature_id,
                hold.units,
                hold.entity_id,
                hold.refund_key,
                hold.owner,
                hold.created_at,
                int(hold.lock),
            ),
        )

    def mark_held(self, key: str) -> None:
        """The check deducted: the hold now stands for a reservation to settle."""
        self._run("UPDATE holds SET state = 'held' WHERE key = ?", (key,))

    def close_hold(self, key: str) -> bool:
        """Forget a hold (settled, or never deducted); False if it was already gone."""
        return self._run("DELETE FROM holds WHERE key = ?", (key,)) > 0

    def holds(self) -> list[tuple[Hold, str]]:
        """Every hold in the journal with its state (``asking`` or ``held``)."""
        rows = self._query(
            "SELECT key, customer_id, feature_id, units, entity_id, refund_key, owner, created_at,"
            " lock, state FROM holds ORDER BY created_at"
        )
        return [(_hold(row), str(row[9])) for row in rows]

    # -- the unverified calls of an outage (the allow policy's cap) --------------------------

    def count_unverified(self, customer_id: str, limit: int, now: float) -> tuple[int, bool]:
        """Count one more unverified call of ``customer_id`` if fewer than ``limit`` ran.

        Returns:
            How many had run in this outage, and whether this one may run.
        """
        with self._transaction() as conn:
            row = conn.execute(
                "SELECT calls FROM unverified WHERE customer_id = ?", (customer_id,)
            ).fetchone()
            calls = 0 if row is None else int(row[0])
            if calls >= limit:
                return calls, False
            conn.execute(
                "INSERT INTO unverified (customer_id, calls, since) VALUES (?, 1, ?)"
                " ON CONFLICT (customer_id) DO UPDATE SET calls = calls + 1",
                (customer_id, now),
            )
            return calls, True

    def end_unverified(self, customer_id: str) -> bool:
        """End the customer's outage if its queue is delivered; True when it is over."""
        with self._transaction() as conn:
            conn.execute(
                "DELETE FROM unverified WHERE customer_id = ?1 AND NOT EXISTS"
                " (SELECT 1 FROM tracks WHERE customer_id = ?1 AND state = 'pending')",
                (customer_id,),
            )
            return (
                conn.execute(
                    "SELECT 1 FROM unverified WHERE customer_id = ?", (customer_id,)
                ).fetchone()
                is None
            )

    def unverified_customers(self) -> set[str]:
        """The customers whose calls ran unverified in an outage not over yet."""
        return {str(row[0]) for row in self._query("SELECT customer_id FROM unverified")}

    # -- successes whose ledger hold could not be closed ------------------------------------

    def mark_settled(self, key: str, now: float) -> None:
        """Remember that the call of ledger hold ``key`` succeeded: it stays billed."""
        self._run(
            "INSERT INTO settled (key, at) VALUES (?, ?) ON CONFLICT (key) DO NOTHING",
            (key, now),
        )

    def settled_keys(self) -> set[str]:
        """The ledger holds marked settled and not closed yet."""
        return {str(row[0]) for row in self._query("SELECT key FROM settled")}

    def forget_settled(self, key: str) -> None:
        """The ledger hold ``key`` is closed now."""
        self._run("DELETE FROM settled WHERE key = ?", (key,))

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._conn.close()


def _hold(row: tuple[Any, ...]) -> Hold:
    key, customer_id, feature_id, units, entity_id, refund_key, owner, created_at = row[:8]
    return Hold(
        key, customer_id, feature_id, units, entity_id, refund_key, owner, created_at, bool(row[8])
    )


def _row(request: Queued, now: float) -> tuple[object, ...]:
    if isinstance(request, (FinalizeRequest, VoidReserve)):
        action, held = (
            ("void", request.units)
            if isinstance(request, VoidReserve)
            else (request.action, request.held)
        )
        return (
            request.idempotency_key,
            request.customer_id,
            request.feature_id,
            request.value,
            request.entity_id,
            None,
            now,
            now,
            action,
            held,
        )
    properties = request.properties
    return (
        request.idempotency_key,
        request.customer_id,
        request.feature_id,
        request.value,
        request.entity_id,
        json.dumps(dict(properties), default=str) if properties else None,
        now,
        now,
        None,
        None,
    )


def _entry(row: tuple[Any, ...], *, lenient: bool = False) -> OutboxEntry:
    """A row as an entry; ``lenient`` (for reports) reads what it can of a damaged one."""
    key, customer_id, feature_id, value, entity_id, properties, attempts, error = row[:8]
    action, held = row[8:10] if len(row) >= 10 else (None, None)
    if action == "void":
        void = VoidReserve(
            str(key),
            str(customer_id),
            str(feature_id),
            float(held),
            None if entity_id is None else str(entity_id),
            absent=float(value) == 0,
        )
        return OutboxEntry(void, int(attempts), None if error is None else str(error))
    if action is not None:
        finalize = FinalizeRequest(
            str(key),
            str(customer_id),
            str(feature_id),
            float(held),
            "confirm" if action == "confirm" else "release",
            float(value) if action == "confirm" and float(value) != float(held) else None,
            None if entity_id is None else str(entity_id),
        )
        return OutboxEntry(finalize, int(attempts), None if error is None else str(error))
    try:
        details = json.loads(str(properties)) if properties else None
        number = float(value)
    except (ValueError, TypeError):
        if not lenient:
            raise
        details, number = None, float("nan")
    if details is not None and not isinstance(details, dict):
        if not lenient:
            msg = f"properties are not an object: {details!r}"
            raise ValueError(msg)
        details = None
    request = TrackRequest(
        str(customer_id),
        str(feature_id),
        number,
        str(key),
        None if entity_id is None else str(entity_id),
        details,
    )
    return OutboxEntry(request, int(attempts), None if error is None else str(error))
