"""The embedded backend: Autumn's semantics in one SQLite file.

Safe under many threads (one connection per thread) and several processes on one file
(WAL, ``BEGIN IMMEDIATE`` around every read-modify-write, a busy timeout). A check with
``send_event=True`` checks and deducts in one transaction, so concurrent callers can never
overspend. Commits use ``synchronous=NORMAL`` in WAL mode: a committed reservation or track
survives the process being killed.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from agent_meter import ledger
from agent_meter.backends.locks_on_holds import LocksOnHolds
from agent_meter.backends.settle_journal import SettleJournal
from agent_meter.engine import CheckRequest, Hold, TrackRequest
from agent_meter.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CustomerNotFound,
)
from agent_meter.ledger import Balance
from agent_meter.pricing import Pricing
from agent_meter.results import CheckResult, TrackResult, UsageEvent
from agent_meter.validation import check_customer_id

__all__ = ["SQLiteBackend"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS customers (
    customer_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS balances (
    customer_id TEXT NOT NULL,
    balance_id TEXT NOT NULL,
    kind TEXT NOT NULL,            -- amount | boolean | unlimited
    included INTEGER NOT NULL,     -- billionths of a unit
    balance INTEGER NOT NULL,      -- billionths of a unit
    reset_interval TEXT NOT NULL,
    next_reset_at REAL,
    PRIMARY KEY (customer_id, balance_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    customer_id TEXT NOT NULL,
    entity_id TEXT,
    feature_id TEXT NOT NULL,
    balance_id TEXT NOT NULL,
    kind TEXT NOT NULL,            -- reserve | track | denied
    value REAL NOT NULL,
    credits INTEGER NOT NULL,      -- cost in billionths of a balance unit
    applied INTEGER NOT NULL,      -- what it changed on the balance (capped at 0)
    idempotency_key TEXT UNIQUE,
    properties TEXT,
    owner TEXT,                    -- a reservation's holder (see agent_meter.owner) until settled
    refund_key TEXT,               -- the key its refund is tracked under
    period REAL                    -- a reservation's balance period (its next_reset_at then)
);
CREATE INDEX IF NOT EXISTS events_by_customer ON events (customer_id, at);
CREATE INDEX IF NOT EXISTS events_held ON events (owner) WHERE owner IS NOT NULL;
"""

_SELECT_BALANCE = (
    "SELECT kind, included, balance, reset_interval, next_reset_at FROM balances "
    "WHERE customer_id = ? AND balance_id = ?"
)
_UPSERT_BALANCE = (
    "INSERT INTO balances (customer_id, balance_id, kind, included, balance, reset_interval,"
    " next_reset_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (customer_id, balance_id) DO UPDATE"
    " SET kind = excluded.kind, included = excluded.included, balance = excluded.balance,"
    " reset_interval = excluded.reset_interval, next_reset_at = excluded.next_reset_at"
)
_UPDATE_BALANCE = (
    "UPDATE balances SET balance = ?, next_reset_at = ? WHERE customer_id = ? AND balance_id = ?"
)
_INSERT_EVENT = (
    "INSERT INTO events (at, customer_id, entity_id, feature_id, balance_id, kind, value,"
    " credits, applied, idempotency_key, properties, owner, refund_key)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_RESERVATION = (
    "INSERT INTO events (at, customer_id, entity_id, feature_id, balance_id, kind, value,"
    " credits, applied, idempotency_key, properties, owner, refund_key, period)"
    " VALUES (?, ?, ?, ?, ?, 'reserve', ?, ?, ?, ?, NULL, ?, ?, ?)"
)
_RELEASE = "UPDATE events SET owner = NULL WHERE idempotency_key = ? AND owner IS NOT NULL"
# A refunded hold gives its call's key up (see ledger.retired_hold_key), in the same commit.
# Only the refund of the whole reservation (the hold's own refund key) retires it; the
# refund of an unused part of it (a success that used less) keeps the call reserved.
_RETIRE = (
    "UPDATE events SET owner = NULL,"
    " idempotency_key = CASE WHEN refund_key = ?3 THEN ?1 ELSE idempotency_key END"
    " WHERE idempotency_key = ?2 AND owner IS NOT NULL"
)
_HELD = "SELECT 1 FROM events WHERE idempotency_key = ?"
_RETIRE_RETURNING = f"{_RETIRE} RETURNING credits, balance_id, period, value"
# ``period`` of a reservation whose balance never resets (NULL means "written before the
# column existed", so it cannot stand for "never")
_NEVER = 0.0


_open_backends: weakref.WeakSet[SQLiteBackend] = weakref.WeakSet()


def _reopen_in_child() -> None:
    """After ``os.fork()``, no backend may use a connection its parent opened."""
    for backend in list(_open_backends):
        backend._forget_parent_connections()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_reopen_in_child)


@atexit.register
def _fold_at_exit() -> None:
    """At a normal exit, close the holds of this process's successes.

    One commit per ledger, so that no journal is left for a recovery to fold.
    """
    for backend in list(_open_backends):
        if backend._fold_settled():
            backend._journal.close(folded=True)


LEDGER_APPLICATION_ID = 0x616D6C67
"""``PRAGMA application_id`` of an agent_meter ledger ("amlg"): marks the file as ours."""


def _holds_tables(path: Path) -> bool:
    """Whether the SQLite file at ``path`` has any table (read without changing it)."""
    try:
        if not path.exists() or path.stat().st_size == 0:
            return False
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            return bool(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] > 0)
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        return True  # cannot tell: keep the file


def _create_schema(conn: sqlite3.Connection) -> None:
    """Create what is missing, statement by statement inside the caller's transaction."""
    for statement in _SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
    if "period" not in columns:  # a ledger written before reservations kept their period
        conn.execute("ALTER TABLE events ADD COLUMN period REAL")


def _difference(stored: Pricing, given: Pricing) -> str:
    """Say briefly how two pricings differ, for the refusal message."""
    parts = []
    for name in ("features", "credit_systems", "plans"):
        before, after = getattr(stored, name), getattr(given, name)
        if before != after:
            changed = sorted(
                key for key in before.keys() | after.keys() if before.get(key) != after.get(key)
            )
            parts.append(f"{name}: {', '.join(changed)}")
    return "; ".join(parts) or "the same catalogue, stored differently"


class SQLiteBackend(LocksOnHolds):
    """Autumn's semantics in a local SQLite file: the default, offline backend.

    Args:
        path: The ledger file, created when missing (then ``pricing`` is required).
            ``":memory:"`` is refused: use :class:`agent_meter.testing.MemoryBackend` for a
            ledger in memory. An SQLite file that is not an agent_meter ledger is refused,
            never written to.
        pricing: Features, credit systems and plans. When omitted, the pricing stored in
            the ledger is used. A ledger bills by one pricing: a different one is refused
            unless ``replace_pricing`` is set.
        clock: Returns the current Unix time; tests pass a fake one to cross resets.
        busy_timeout: Seconds to wait for another writer before giving up with
            :class:`~agent_meter.errors.BackendUnavailable`.
        read_only: Open an existing ledger for reading only (reports, balances, events):
            nothing is ever written, and a ledger in a read-only directory can be read.
        replace_pricing: Store ``pricing`` in place of a different one the ledger holds;
            balances already granted stay as they are.

    Raises:
        ConfigError: The file is not an agent_meter ledger, stores a different pricing,
            or is missing and no pricing was given. Nothing is created or changed.

    Example:
        >>> backend = SQLiteBackend("usage.db", pricing=Pricing.from_file("pricing.toml"))
        >>> backend.check(CheckRequest("cus_1", "web_search")).balance
        100.0
    """

    is_local = True
    """The ledger is in this process's reach: the meter settles calls inline."""

    def __init__(
        self,
        path: str | Path,
        *,
        pricing: Pricing | None = None,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 30.0,
        read_only: bool = False,
        replace_pricing: bool = False,
    ) -> None:
        if str(path) == ":memory:":
            msg = "SQLiteBackend needs a file shared by threads; use testing.MemoryBackend"
            raise ConfigError(msg)
        self.path = Path(path)
        self.read_only = read_only
        self._clock = clock
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        # each thread's connection, with the thread, so that a finished thread's is closed
        self._connections: list[tuple[weakref.ref[threading.Thread], sqlite3.Connection]] = []
        self._connections_lock = threading.Lock()
        self._inherited: list[sqlite3.Connection] = []
        self._known_customers: set[str] = set()
        # A success's hold is closed by the next commit (see settle_journal): the holds
        # this instance opened and has not closed yet, and its journal of settled ones.
        self._journal = SettleJournal(self.path)
        self._open_holds: set[str] = set()
        self._closed = False
        _open_backends.add(self)
        self._uri = f"{self.path.absolute().as_uri()}?mode=ro" if read_only else None
        self._wal = False
        existed = self.path.exists()
        if not existed and (read_only or pricing is None):
            msg = (
                f"{self.path}: no such ledger file"
                if read_only
                else f"{self.path}: no ledger there and no pricing given to create one"
            )
            raise ConfigError(msg)
        try:
            self._pricing = self._open(pricing, replace_pricing=replace_pricing)
        except BaseException:
            self.close()
            if not existed and not _holds_tables(self.path):
                # A failed open leaves nothing behind; but a ledger another opener created
                # meanwhile (this one was refused its pricing) is theirs, never removed.
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            raise

    def __repr__(self) -> str:
        return f"SQLiteBackend({str(self.path)!r})"

    @property
    def pricing(self) -> Pricing:
        """The pricing this ledger bills by."""
        return self._pricing

    # -- connections -------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            msg = f"{self!r} is closed"
            raise BackendError(msg)
        if self._uri is not None:
            return self._read_only_conn()
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
        )
        if self._wal:  # never on a file not yet known to be a ledger: it would change it
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # Checkpoint less often than every 1,000 pages: a settled call writes a few pages,
        # and each checkpoint syncs the database file on the caller's path. The WAL stays
        # bounded (about 40 MB) and a commit is as durable as before.
        conn.execute("PRAGMA wal_autocheckpoint = 10000")
        conn.execute("PRAGMA journal_size_limit = 67108864")
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
        self._local.conn = conn
        with self._connections_lock:
            # Threads come and go (a thread per request, asyncio.to_thread's pool): close
            # the connections of those that ended, or every short-lived thread would keep
            # two file descriptors until the process runs out of them.
            finished = [c for ref, c in self._connections if not _alive(ref)]
            self._connections = [(ref, c) for ref, c in self._connections if _alive(ref)]
            self._connections.append((weakref.ref(threading.current_thread()), conn))
        for old in finished:
            with contextlib.suppress(sqlite3.Error):
                old.close()
        return conn

    def _forget_parent_connections(self) -> None:
        """In a forked child: open new connections, never touch the parent's.

        A SQLite connection must not cross a fork: the child would share its file locks
        and WAL index with the parent. The inherited ones are kept (closing them could
        checkpoint the parent's WAL from here) and never used.
        """
        self._inherited.extend(c for _, c in self._connections)
        self._connections = []
        self._connections_lock = threading.Lock()
        self._local = threading.local()
        self._journal.after_fork()  # the parent's successes are the parent's to close
        self._open_holds = set()

    def _read_only_conn(self) -> sqlite3.Connection:
        assert self._uri is not None  # noqa: S101 - only called for read-only backends
        conn = sqlite3.connect(
            self._uri,
            uri=True,
            timeout=self._busy_timeout,
            isolation_level=None,
            check_same_thread=False,
        )
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            # A WAL ledger needs its -shm file even to be read; in a read-only directory it
            # cannot be created. Then, and only when no write-ahead log is waiting to be
            # folded in (the ledger was closed cleanly), read the file as it is.
            conn.close()
            wal = Path(f"{self.path}-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise
            self._uri = f"{self.path.absolute().as_uri()}?mode=ro&immutable=1"
            conn = sqlite3.connect(
                self._uri, uri=True, isolation_level=None, check_same_thread=False
            )
        self._local.conn = conn
        with self._connections_lock:
            self._connections.append((weakref.ref(threading.current_thread()), conn))
        return conn

    def _write(self) -> _Transaction:
        """A write transaction, which also closes the holds of recent successes.

        Their settle markers are folded into it (see settle_journal).
        """
        return _Transaction(self, self._conn())

    def _errors(self, action: str, *args: object) -> _Errors:
        """Turn SQLite's errors into ours; ``action % args`` (formatted then) says what."""
        return _Errors(self, action, args)

    def _open(self, pricing: Pricing | None, *, replace_pricing: bool) -> Pricing:
        """Open the file as a ledger: create it, or check it is one and bills by ``pricing``.

        Writers decide inside one write transaction, so two processes creating the same
        ledger with different pricings cannot both win; a refusal writes nothing.
        """
        try:
            with self._errors("open"):
                if self.read_only:
                    return self._decide(self._conn(), pricing, replace_pricing)
                with self._write() as conn:
                    chosen = self._decide(conn, pricing, replace_pricing)
                self._wal = True
                self._enable_wal()  # only once it is ours
                return chosen
        except BackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, sqlite3.DatabaseError) and not isinstance(
                cause, sqlite3.OperationalError
            ):  # "file is not a database"
                msg = f"{self.path}: not an agent_meter ledger ({cause})"
                raise ConfigError(msg) from cause
            raise

    def _enable_wal(self) -> None:
        """Switch the ledger to WAL, waiting for openers that race to create it.

        SQLite answers "database is locked" at once, without waiting on the busy timeout,
        when the journal mode cannot change because another connection has the file open
        mid-switch; so this waits here, up to the same timeout.
        """
        deadline = time.monotonic() + self._busy_timeout
        while True:
            try:
                self._conn().execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.005)
            else:
                return

    def _decide(
        self, conn: sqlite3.Connection, pricing: Pricing | None, replace_pricing: bool
    ) -> Pricing:
        tables = {
            row[0]
            for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            if not row[0].startswith("sqlite_")
        }
        application_id = conn.execute("PRAGMA application_id").fetchone()[0]
        stored = None
        if application_id in (0, LEDGER_APPLICATION_ID) and "meta" in tables:
            stored = self._stored_pricing(conn)
        if stored is None and (tables or application_id not in (0, LEDGER_APPLICATION_ID)):
            msg = (
                f"{self.path}: not an agent_meter ledger (it holds other tables: "
                f"{', '.join(sorted(tables)) or 'none'}); nothing was written to it"
            )
            raise ConfigError(msg)
        if stored is None and (self.read_only or pricing is None):
            msg = (
                f"{self.path}: not an agent_meter ledger (empty)"
                if self.read_only
                else f"{self.path}: an empty file and no pricing given to create a ledger"
            )
            raise ConfigError(msg)
        if stored is not None and (pricing is None or pricing == stored):
            if not self.read_only:
                _create_schema(conn)  # tables and indexes added since the ledger was made
            return stored
        assert pricing is not None  # noqa: S101 - both None cases returned or raised above
        if stored is not None and not replace_pricing:
            msg = (
                f"{self.path} bills by a different pricing than the one given "
                f"({_difference(stored, pricing)}); open it without pricing= to use the "
                "stored one, or pass replace_pricing=True to bill by the new one from now on"
            )
            raise ConfigError(msg)
        if self.read_only:
            msg = f"{self.path}: a read-only ledger cannot store a new pricing"
            raise ConfigError(msg)
        _create_schema(conn)
        conn.execute(f"PRAGMA application_id = {LEDGER_APPLICATION_ID}")
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('pricing', ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (pricing.model_dump_json(),),
        )
        return pricing

    def _stored_pricing(self, conn: sqlite3.Connection) -> Pricing | None:
        """The pricing an agent_meter ledger stores; None when there is none."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'pricing'").fetchone()
        if row is None:
            return None
        try:
            return Pricing.model_validate_json(row[0])
        except ValueError as exc:
            msg = f"{self.path}: the pricing stored in the ledger is not valid: {exc}"
            raise ConfigError(msg) from None

    # -- balances ------------------------------------------------------------------------

    def _balance(
        self, conn: sqlite3.Connection, customer_id: str, balance_id: str, now: float
    ) -> Balance | None:
        """Read one balance, creating the customer first if it was never seen."""
        row = conn.execute(_SELECT_BALANCE, (customer_id, balance_id)).fetchone()
        if row is None and customer_id not in self._known_customers:
            self._create_customer(conn, customer_id, now)
            row = conn.execute(_SELECT_BALANCE, (customer_id, balance_id)).fetchone()
        if row is None:
            return None
        return Balance(balance_id, *row)

    def _create_customer(self, conn: sqlite3.Connection, customer_id: str, now: float) -> None:
        created = conn.execute(
            "INSERT INTO customers (customer_id, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (customer_id, now),
        ).rowcount
        if created:
            conn.executemany(
                "INSERT INTO balances (customer_id, balance_id, kind, included, balance,"
                " reset_interval, next_reset_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        customer_id,
                        b.balance_id,
                        b.kind,
                        b.included,
                        b.balance,
                        b.interval,
                        b.next_reset_at,
                    )
                    for b in ledger.initial_balances(self._pricing, now)
                ],
            )
        self._known_customers.add(customer_id)

    @staticmethod
    def _store(conn: sqlite3.Connection, customer_id: str, balance: Balance) -> None:
        conn.execute(
            _UPDATE_BALANCE,
            (balance.balance, balance.next_reset_at, customer_id, balance.balance_id),
        )

    # -- the protocol ----------------------------------------------------------------------

    def check(self, request: CheckRequest) -> CheckResult:
        """Answer a check; with ``send_event=True``, deduct atomically when allowed.

        Raises:
            InvalidUsage: An id or ``required_balance`` is malformed.
            ConfigError: ``feature_id`` is not in the pricing.
        """
        feature_id, send_event = request.feature_id, request.send_event
        customer_id, entity_id, charge = ledger.price_request(
            self._pricing,
            request.customer_id,
            feature_id,
            request.required_balance,
            entity_id=request.entity_id,
        )
        now = ledger.checked_now(self._clock())
        with self._errors("check %r for %r", feature_id, customer_id):
            if not send_event:
                fast = self._read_only_check(customer_id, charge, entity_id, now)
                if fast is not None:
                    return fast
            with self._write() as conn:
                return self._check_in(conn, customer_id, charge, entity_id, now, send_event, None)

    def _check_in(  # noqa: PLR0917 - private; one call site per public method
        self,
        conn: sqlite3.Connection,
        customer_id: str,
        charge: ledger.Charge,
        entity_id: str | None,
        now: float,
        send_event: bool,
        hold: Hold | None,
    ) -> CheckResult:
        """A check inside a write transaction; records the reservation (and hold) it makes."""
        known = (
            self._deduct_known(conn, customer_id, charge, entity_id, now) if send_event else None
        )
        if known is not None:
            result, period = known
        else:
            stored = self._balance(conn, customer_id, charge.balance_id, now)
            result, after = ledger.plan_check(
                customer_id, charge, stored, now, send_event=send_event, entity_id=entity_id
            )
            if after is not None:
                self._store(conn, customer_id, after)
            current = after if after is not None else stored
            period = None if current is None else current.next_reset_at
        if result.deducted and (charge.amount or hold is not None):
            # the reservation's event is its hold too: one row, in the deduction's commit;
            # it keeps what was deducted and in which period, which is what a refund gives
            held = (None, None, None) if hold is None else (hold.key, hold.owner, hold.refund_key)
            conn.execute(
                _INSERT_RESERVATION,
                (
                    now,
                    customer_id,
                    entity_id,
                    charge.feature_id,
                    charge.balance_id,
                    charge.value,
                    charge.amount,
                    -charge.amount,
                    held[0],
                    held[1],
                    held[2],
                    _NEVER if period is None else period,
                ),
            )
        return result

    def _deduct_known(
        self,
        conn: sqlite3.Connection,
        customer_id: str,
        charge: ledger.Charge,
        entity_id: str | None,
        now: float,
    ) -> tuple[CheckResult, float | None] | None:
        """The hot path of a reservation: one UPDATE that deducts when the balance suffices.

        Returns:
            The answer and the balance's period (its ``next_reset_at``); None (take the
            general path) for anything unusual: a new customer, a reset due, a boolean or
            unlimited balance, or not enough balance.
        """
        if charge.boolean or customer_id not in self._known_customers:
            return None
        row = conn.execute(
            "UPDATE balances SET balance = balance - ?1 WHERE customer_id = ?2"
            " AND balance_id = ?3 AND kind = 'amount' AND balance >= ?1"
            " AND (next_reset_at IS NULL OR next_reset_at > ?4)"
            " RETURNING included, balance, next_reset_at",
            (charge.amount, customer_id, charge.balance_id, now),
        ).fetchone()
        if row is None:
            return None
        return ledger.deducted_result(customer_id, charge, row[0], row[1], entity_id), row[2]

    def _read_only_check(
        self, customer_id: str, charge: ledger.Charge, entity_id: str | None, now: float
    ) -> CheckResult | None:
        """A check that needs no write: a known customer whose balance is not due a reset."""
        if customer_id not in self._known_customers:
            return None
        row = self._conn().execute(_SELECT_BALANCE, (customer_id, charge.balance_id)).fetchone()
        balance = None if row is None else Balance(charge.balance_id, *row)
        if balance is not None and ledger.roll_forward(balance, now) is not balance:
            return None
        result, _ = ledger.decide_check(
            customer_id, charge, balance, send_event=False, entity_id=entity_id
        )
        return result

    def track(self, request: TrackRequest) -> TrackResult:
        """Record usage: capped at 0, refunded when negative, once per idempotency key.

        Raises:
            InvalidUsage: An id, the key or ``value`` is malformed, or the feature is
                boolean.
            ConfigError: ``feature_id`` is not in the pricing.
        """
        feature_id, idempotency_key = request.feature_id, request.idempotency_key
        properties = request.properties
        customer_id, entity_id, charge = ledger.price_request(
            self._pricing,
            request.customer_id,
            feature_id,
            request.value,
            entity_id=request.entity_id,
            track=True,
            idempotency_key=idempotency_key,
        )
        now = ledger.checked_now(self._clock())
        with self._errors("track %r for %r", feature_id, customer_id), self._write() as conn:
            unpaid = self._track_in(
                conn, customer_id, charge, entity_id, idempotency_key, properties, now
            )
        if unpaid is None:
            return ledger.duplicate_track(
                customer_id,
                feature_id,
                charge.value,
                self._tracked_value(idempotency_key, charge.value),
                idempotency_key,
            )
        return TrackResult(customer_id, feature_id, charge.value, idempotency_key, uncharged=unpaid)

    def _tracked_value(self, idempotency_key: str, default: float) -> float:
        """The value recorded under a key (read again only for a duplicate)."""
        row = (
            self._conn()
            .execute("SELECT value FROM events WHERE idempotency_key = ?", (idempotency_key,))
            .fetchone()
        )
        return default if row is None else float(row[0])

    def _track_in(  # noqa: PLR0917 - private; mirrors track()
        self,
        conn: sqlite3.Connection,
        customer_id: str,
        charge: ledger.Charge,
        entity_id: str | None,
        idempotency_key: str,
        properties: Mapping[str, Any] | None,
        now: float,
    ) -> float | None:
        """A track inside a write transaction.

        Returns:
            None when the key was seen before (nothing done), else the units the balance
            could not pay (see :func:`agent_meter.ledger.uncharged`).
        """
        seen = conn.execute(
            "SELECT 1 FROM events WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone()
        if seen is not None:
            return None
        stored = self._balance(conn, customer_id, charge.balance_id, now)
        after, applied = ledger.plan_track(charge, stored, now)
        if after is not None:
            self._store(conn, customer_id, after)
        props = json.dumps(dict(properties), default=str) if properties else None
        conn.execute(
            _INSERT_EVENT,
            (
                now,
                customer_id,
                entity_id,
                charge.feature_id,
                charge.balance_id,
                "track",
                charge.value,
                charge.amount,
                applied,
                idempotency_key,
                props,
                None,
                None,
            ),
        )
        return ledger.uncharged(charge, stored, applied)

    def record_denial(
        self, customer_id: str, feature_id: str, units: float, entity_id: str | None = None
    ) -> None:
        """Keep a refused call in the ledger (kind ``denied``, nothing applied), for reports."""
        charge = ledger.charge_for(self._pricing, customer_id, feature_id, units)
        now = ledger.checked_now(self._clock())
        with self._errors("record a denial of %r", feature_id), self._write() as conn:
            conn.execute(
                _INSERT_EVENT,
                (
                    now,
                    customer_id,
                    entity_id,
                    feature_id,
                    charge.balance_id,
                    "denied",
                    charge.value,
                    charge.amount,
                    0,
                    None,
                    None,
                    None,
                    None,
                ),
            )

    # -- reservations held by a process (see agent_meter.owner) --------------------------

    def reserve(self, hold: Hold) -> CheckResult:
        """Check and deduct ``hold.units`` atomically, recording the hold in the same commit.

        The hold names its owner process, so that ``meter.recover()`` can refund it if that
        process dies before :meth:`release`. A call is reserved once: a second reserve of
        the same hold key (a replayed tool call) deducts nothing and answers ``replayed``.
        """
        # A hold is built by the meter from a validated call: only the price is new here.
        customer_id, entity_id = hold.customer_id, hold.entity_id
        charge = ledger.charge_for(self._pricing, customer_id, hold.feature_id, hold.units)
        now = ledger.checked_now(self._clock())
        with self._errors("reserve %r for %r", hold.feature_id, customer_id):
            try:
                with self._write() as conn:
                    result = self._check_in(conn, customer_id, charge, entity_id, now, True, hold)
                    replayed = not result.allowed and conn.execute(_HELD, (hold.key,)).fetchone()
                if not replayed:
                    if result.deducted:
                        self._open_holds.add(hold.key)
                    return result
                # refused for want of balance, but reserved before: a replay (below)
            except sqlite3.IntegrityError:
                pass  # the hold key exists: this call was reserved before
            return self._replay(customer_id, charge, entity_id, now)

    def _replay(
        self, customer_id: str, charge: ledger.Charge, entity_id: str | None, now: float
    ) -> CheckResult:
        row = self._conn().execute(_SELECT_BALANCE, (customer_id, charge.balance_id)).fetchone()
        stored = None if row is None else Balance(charge.balance_id, *row)
        return ledger.replay_answer(customer_id, charge, stored, now, entity_id=entity_id)

    def release(self, key: str, refund: TrackRequest | None = None) -> bool:
        """Close a hold; with ``refund``, give the reservation back in the same commit.

        Returns:
            False when the hold was already closed (then nothing is refunded twice).
        """
        if refund is None and self._settle_later(key):
            return True
        self._open_holds.discard(key)
        with self._errors("release hold %r", key):
            if refund is None:  # not recorded (the disk is full): closed now, on its own
                return self._conn().execute(_RELEASE, (key,)).rowcount > 0
            customer_id, entity_id, charge = ledger.price_request(
                self._pricing,
                refund.customer_id,
                refund.feature_id,
                refund.value,
                entity_id=refund.entity_id,
                track=True,
                idempotency_key=refund.idempotency_key,
            )
            now = ledger.checked_now(self._clock())
            with self._write() as conn:
                retired = ledger.retired_hold_key(refund.idempotency_key)
                row = conn.execute(
                    _RETIRE_RETURNING, (retired, key, refund.idempotency_key)
                ).fetchone()
                if row is None:
                    return False
                self._refund_in(
                    conn, customer_id, entity_id, charge, refund.idempotency_key, now, row
                )
                return True

    def _refund_in(  # noqa: PLR0917 - private; one call site
        self,
        conn: sqlite3.Connection,
        customer_id: str,
        entity_id: str | None,
        charge: ledger.Charge,
        idempotency_key: str,
        now: float,
        reservation: tuple[int, str, float | None, float],
    ) -> None:
        """Refund (all or part of) a reservation inside a write transaction, at its price."""
        if charge.value > 0:  # a lock confirmed above its hold: charged on top
            self._track_in(conn, customer_id, charge, entity_id, idempotency_key, None, now)
            return
        if conn.execute(
            "SELECT 1 FROM events WHERE idempotency_key = ?", (idempotency_key,)
        ).fetchone():
            return  # refunded before (a recovery racing a settle): once only
        deducted, balance_id, period, reserved_units = reservation
        credits = ledger.refund_share(deducted, reserved_units, -charge.value)
        stored = self._balance(conn, customer_id, balance_id, now)
        after, applied = ledger.plan_refund(
            credits,
            None if period == _NEVER else period,
            stored,
            now,
            period_unknown=period is None,
        )
        if after is not None:
            self._store(conn, customer_id, after)
        conn.execute(
            _INSERT_EVENT,
            (
                now,
                customer_id,
                entity_id,
                charge.feature_id,
                balance_id,
                "track",
                charge.value,
                -credits,
                applied,
                idempotency_key,
                None,
                None,
                None,
            ),
        )

    def holds(self) -> list[Hold]:
        """Every open hold, oldest first (holds of calls recorded as settled left out)."""
        with self._errors("list holds"):
            rows = (
                self._conn()
                .execute(
                    "SELECT idempotency_key, customer_id, feature_id, value, entity_id,"
                    " refund_key, owner, at FROM events WHERE owner IS NOT NULL ORDER BY id"
                )
                .fetchall()
            )
        settled = self._journal.settled_keys() if rows else set()
        return [Hold(*row) for row in rows if row[0] not in settled]

    def _fold_settled(self) -> bool:
        """Close the holds this process recorded as settled, in one commit; False if not."""
        if not self._journal.pending():
            return True
        if self._closed:
            return False
        try:
            with self._write():  # folds the markers in
                pass
        except (sqlite3.Error, BackendError):
            return False  # the journal stays; recover() closes them once we are gone
        return True

    def has_settled_to_close(self) -> bool:
        """Whether processes that ended left successes whose holds are still open."""
        return bool(self._journal.ended())

    def close_settled(self) -> int:
        """Close the holds of calls recorded as settled; never refunds.

        This process's, and those in the journals of processes that ended (which are then
        removed).

        Returns:
            How many journals of ended processes were folded in.
        """
        ended = self._journal.ended()
        with self._errors("close settled holds"):
            with self._write() as conn:  # folds this process's markers too
                for _, keys in ended:
                    conn.executemany(_RELEASE, [(key,) for key in keys])
            for path, _ in ended:  # only once closed in the ledger
                path.unlink(missing_ok=True)
        return len(ended)

    async def areserve(self, hold: Hold) -> CheckResult:
        """Async :meth:`reserve`, in a worker thread."""
        return await asyncio.to_thread(self.reserve, hold)

    async def arelease(self, key: str, refund: TrackRequest | None = None) -> bool:
        """Async :meth:`release`: in a worker thread, unless it only records a success."""
        if refund is None and self._settle_later(key):
            return True  # an append to the journal: it never waits on a lock
        return await asyncio.to_thread(self.release, key, refund)

    def _settle_later(self, key: str) -> bool:
        """The hot path of a success: record it, to close its hold with the next commit.

        Only for a hold this instance opened (it knows it is open) and while the journal
        can be written; otherwise the caller closes the hold now, with a commit.
        """
        if key in self._open_holds and self._journal.record(key):
            self._open_holds.discard(key)
            return True
        return False

    def close(self) -> None:
        """Close the holds of settled calls, then every thread's connection."""
        self._journal.close(folded=self._fold_settled())
        self._closed = True
        with self._connections_lock:
            connections, self._connections = self._connections, []
        for _, conn in connections:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()
        _open_backends.discard(self)

    async def acheck(self, request: CheckRequest) -> CheckResult:
        """Async :meth:`check`, run in a worker thread so the event loop never blocks."""
        return await asyncio.to_thread(self.check, request)

    async def atrack(self, request: TrackRequest) -> TrackResult:
        """Async :meth:`track`, run in a worker thread so the event loop never blocks."""
        return await asyncio.to_thread(self.track, request)

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        self.close()

    # -- administration and reports ------------------------------------------------------

    def set_balance(self, customer_id: str, balance_id: str, value: float | bool) -> None:
        """Set a customer's balance of a credit system or a feature (admin).

        Args:
            customer_id: The customer (created with its auto-enabled plans if new).
            balance_id: A credit system (``"credits"``), a metered feature that draws from
                no pool, or a boolean feature.
            value: A non-negative amount, or True/False for a boolean feature.

        Raises:
            ConfigError: ``balance_id`` is unknown, or is a feature that draws from a pool.
            InvalidUsage: ``value`` does not fit the balance.
        """
        customer_id = check_customer_id(customer_id)
        kind, nano = ledger.admin_balance(self._pricing, customer_id, balance_id, value)
        now = ledger.checked_now(self._clock())
        with self._errors("set_balance %r for %r", balance_id, customer_id), self._write() as c:
            current = self._balance(c, customer_id, balance_id, now)
            if current is None:
                current = Balance(balance_id, kind, 0, 0, "never", None)
            else:
                current = ledger.roll_forward(current, now)
            new = replace(current, kind=kind, balance=nano)
            c.execute(
                _UPSERT_BALANCE,
                (
                    customer_id,
                    balance_id,
                    new.kind,
                    new.included,
                    new.balance,
                    new.interval,
                    new.next_reset_at,
                ),
            )

    def balances(self, customer_id: str) -> dict[str, float | bool]:
        """A customer's balances by pool or feature id (booleans as True/False).

        Raises:
            InvalidUsage: The customer id is malformed.
            CustomerNotFound: The customer was never seen (nothing is created).
        """
        customer_id = check_customer_id(customer_id)
        now = ledger.checked_now(self._clock())
        with self._errors("balances of %r", customer_id):
            conn = self._conn()
            known = conn.execute(
                "SELECT 1 FROM customers WHERE customer_id = ?", (customer_id,)
            ).fetchone()
            if known is None:
                raise CustomerNotFound(customer_id, str(self.path))
            rows = conn.execute(
                "SELECT balance_id, kind, included, balance, reset_interval, next_reset_at"
                " FROM balances WHERE customer_id = ? ORDER BY balance_id",
                (customer_id,),
            ).fetchall()
        return {row[0]: ledger.readable(ledger.roll_forward(Balance(*row), now)) for row in rows}

    def customers(self) -> list[str]:
        """Every customer the ledger has seen, sorted."""
        with self._errors("list customers"):
            rows = (
                self._conn()
                .execute("SELECT customer_id FROM customers ORDER BY customer_id")
                .fetchall()
            )
        return [row[0] for row in rows]

    def events(
        self,
        customer_id: str | None = None,
        *,
        since: float | None = None,
        feature_id: str | None = None,
    ) -> list[UsageEvent]:
        """The ledger's events in order, optionally for one customer, feature or period."""
        clauses: list[str] = []
        params: list[object] = []
        if customer_id is not None:
            clauses.append("customer_id = ?")
            params.append(check_customer_id(customer_id))
        if feature_id is not None:
            clauses.append("feature_id = ?")
            params.append(feature_id)
        if since is not None:
            clauses.append("at >= ?")
            params.append(since)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        with self._errors("read events"):
            rows = (
                self._conn()
                .execute(
                    "SELECT at, customer_id, entity_id, feature_id, balance_id, kind, value,"
                    f" credits, applied, idempotency_key FROM events{where} ORDER BY id",
                    params,
                )
                .fetchall()
            )
        return [
            UsageEvent(
                at,
                cus,
                ent,
                feat,
                bal,
                kind,
                value,
                ledger.from_nano(credits),
                ledger.from_nano(applied),
                key,
            )
            for at, cus, ent, feat, bal, kind, value, credits, applied, key in rows
        ]


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (or ``ROLLBACK``), folding in settle markers.

    A class rather than a generator: it runs on every reservation.
    """

    __slots__ = ("_backend", "_conn", "_settled")

    def __init__(self, backend: SQLiteBackend, conn: sqlite3.Connection) -> None:
        self._backend, self._conn = backend, conn
        self._settled: list[str] = []

    def __enter__(self) -> sqlite3.Connection:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        journal = self._backend._journal
        self._settled = settled = journal.take()
        if settled:
            try:
                conn.executemany(_RELEASE, [(key,) for key in settled])
            except BaseException:
                self._undo()
                raise
        return conn

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None:
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                self._undo()
                raise
            self._backend._journal.folded(self._settled, committed=True)
            return
        self._undo()

    def _undo(self) -> None:
        conn = self._conn
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        backend = self._backend
        backend._known_customers.clear()  # a customer created in this transaction is gone
        backend._journal.folded(self._settled, committed=False)


class _Errors:
    """The context manager of :meth:`SQLiteBackend._errors` (a class: it runs per call)."""

    __slots__ = ("_action", "_args", "_backend")

    def __init__(self, backend: SQLiteBackend, action: str, args: tuple[object, ...]) -> None:
        self._backend, self._action, self._args = backend, action, args

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc is None or not isinstance(exc, sqlite3.Error):
            return
        action = self._action % self._args
        if isinstance(exc, sqlite3.OperationalError) and (
            "locked" in str(exc) or "busy" in str(exc)
        ):
            msg = f"{self._backend!r}: {action} timed out waiting for another writer"
            raise BackendUnavailable(msg) from exc
        msg = f"{self._backend!r}: {action} failed: {exc}"
        raise BackendError(msg) from exc


def _alive(ref: weakref.ref[threading.Thread]) -> bool:
    thread = ref()
    return thread is not None and thread.is_alive()
