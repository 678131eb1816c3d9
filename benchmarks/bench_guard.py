"""Guarded calls per second, and the median cost of one guard, on SQLite and in memory.

Baselines, measured in the same run on the same kind of file:

- the smallest honest ledger write by hand (one ``BEGIN IMMEDIATE``, an UPDATE and an
  INSERT, ``COMMIT``) on two bare tables;
- the same transaction on the ledger's own schema (its indexes included): the floor of a
  reservation, since the success path of a guarded call costs exactly one such commit
  (its hold is closed by the next commit, see ``agent_meter.backends.settle_journal``);
- the old success path by hand: that transaction, then a second commit to close the hold.

The ratios show what the meter adds over the commit it cannot avoid.

Run: ``make bench`` or ``python benchmarks/bench_guard.py``. Target: >= 15,000 guarded
calls/s on SQLite in one process (a target below the floor of one commit on a slow disk
is reported as missed, with the floor beside it).
"""

from __future__ import annotations

import itertools
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.backends import sqlite as sqlite_backend
from agent_meter.testing import MemoryBackend
from benchmarks._timing import machine, median_per_call

PRICING = Pricing.from_file(Path(__file__).resolve().parent.parent / "examples" / "pricing.toml")
CALLS = 2000


def bench_meter(meter: Meter, customer: str) -> float:
    counter = itertools.count()

    def one() -> None:
        with meter.guard(customer, "web_search", call_id=f"b{next(counter)}"):
            pass

    return median_per_call(one, calls=CALLS)


def bench_raw_sqlite(path: Path, *, settle: bool = False) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE b (k TEXT PRIMARY KEY, v INTEGER)")
    conn.execute("CREATE TABLE e (id INTEGER PRIMARY KEY, k TEXT, v INTEGER)")
    conn.execute("INSERT INTO b VALUES ('c', 1000000000000)")

    def one() -> None:
        conn.execute("BEGIN IMMEDIATE")
        (value,) = conn.execute("SELECT v FROM b WHERE k = 'c'").fetchone()
        conn.execute("UPDATE b SET v = ? WHERE k = 'c'", (value - 1,))
        row = conn.execute("INSERT INTO e (k, v) VALUES ('c', 1)").lastrowid
        conn.execute("COMMIT")
        if settle:
            conn.execute("UPDATE e SET v = 0 WHERE id = ?", (row,))

    return median_per_call(one, calls=CALLS)


def bench_raw_ledger(path: Path) -> float:
    """One reservation by hand on the ledger's own schema: one transaction, one commit."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA wal_autocheckpoint = 10000")
    conn.executescript(sqlite_backend._SCHEMA)
    conn.execute("INSERT INTO balances VALUES ('c', 'credits', 'amount', 0, 10, 'never', NULL)")
    conn.execute("UPDATE balances SET balance = 1000000000000000000")
    counter = itertools.count()

    def one() -> None:
        key = f"am1:c::web_search:b{next(counter)}:hold"
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE balances SET balance = balance - ? WHERE customer_id = 'c'"
            " AND balance >= ? RETURNING included, balance, next_reset_at",
            (10**9, 10**9),
        ).fetchone()
        conn.execute(
            sqlite_backend._INSERT_RESERVATION,
            (0.0, "c", None, "web_search", "credits", 1.0, 10**9, -(10**9), key, "o", "r", 0.0),
        )
        conn.execute("COMMIT")

    return median_per_call(one, calls=CALLS)


def main() -> None:
    print(f"bench_guard: {machine()}, {CALLS} calls per batch, median of 7 batches")
    with tempfile.TemporaryDirectory() as tmp:
        raw = bench_raw_sqlite(Path(tmp) / "raw.db")
        raw_settled = bench_raw_sqlite(Path(tmp) / "raw2.db", settle=True)
        raw_ledger = bench_raw_ledger(Path(tmp) / "raw3.db")
        backend = SQLiteBackend(Path(tmp) / "usage.db", pricing=PRICING)
        backend.set_balance("cus_bench", "credits", 10**9)
        sqlite_guard = bench_meter(Meter(backend), "cus_bench")
        backend.close()
    memory = MemoryBackend(pricing=PRICING)
    memory.set_balance("cus_bench", "credits", 10**9)
    memory.calls = _Discard()  # keep the recorder from growing for the whole run
    memory_guard = bench_meter(Meter(memory), "cus_bench")
    rows = [
        ("raw SQLite transaction (baseline)", raw),
        ("raw reserve + settle, 2 commits", raw_settled),
        ("raw reservation, ledger schema", raw_ledger),
        ("guard on SQLiteBackend", sqlite_guard),
        ("guard on MemoryBackend", memory_guard),
    ]
    for name, seconds in rows:
        print(f"  {name:36s} {seconds * 1e6:8.1f} us/call {1 / seconds:10,.0f} calls/s")
    print(f"  SQLite guard / raw transaction: {sqlite_guard / raw:.2f}x")
    print(f"  SQLite guard / raw reserve + settle: {sqlite_guard / raw_settled:.2f}x")
    print(
        f"  SQLite guard / raw reservation on the ledger schema: {sqlite_guard / raw_ledger:.2f}x"
    )
    print(f"  SQLite guard - that reservation: {(sqlite_guard - raw_ledger) * 1e6:.1f} us/call")
    verdict = "meets" if 1 / sqlite_guard >= 15000 else "MISSES"
    print(
        f"  target >= 15,000 guarded calls/s on SQLite: {verdict} ({1 / sqlite_guard:,.0f}; "
        f"the floor of one commit here: {1 / raw_ledger:,.0f})"
    )


class _Discard(list):  # type: ignore[type-arg]
    def append(self, _item: object) -> None:
        pass


if __name__ == "__main__":
    main()
