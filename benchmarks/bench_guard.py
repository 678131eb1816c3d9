"""Guarded calls per second, and the median cost of one guard, on SQLite and in memory.

Baselines, measured in the same run on the same kind of file: the smallest honest ledger
write by hand (one ``BEGIN IMMEDIATE``, an UPDATE and an INSERT, ``COMMIT``), and the
smallest durable guarded call by hand (that transaction, then a second commit that closes
the reservation once the work succeeded: what a crash-safe settle needs), so the ratios
show what the meter adds over the commits it cannot avoid.

Run: ``make bench`` or ``python benchmarks/bench_guard.py``. Target: >= 5,000 guarded
calls/s on SQLite in one process.
"""

from __future__ import annotations

import itertools
import sqlite3
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_meter import Meter, Pricing, SQLiteBackend
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


def main() -> None:
    print(f"bench_guard: {machine()}, {CALLS} calls per batch, median of 7 batches")
    with tempfile.TemporaryDirectory() as tmp:
        raw = bench_raw_sqlite(Path(tmp) / "raw.db")
        raw_settled = bench_raw_sqlite(Path(tmp) / "raw2.db", settle=True)
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
        ("guard on SQLiteBackend", sqlite_guard),
        ("guard on MemoryBackend", memory_guard),
    ]
    for name, seconds in rows:
        print(f"  {name:36s} {seconds * 1e6:8.1f} us/call {1 / seconds:10,.0f} calls/s")
    print(f"  SQLite guard / raw transaction: {sqlite_guard / raw:.2f}x")
    print(f"  SQLite guard / raw reserve + settle: {sqlite_guard / raw_settled:.2f}x")
    verdict = "meets" if 1 / sqlite_guard >= 5000 else "MISSES"
    print(f"  target >= 5,000 guarded calls/s on SQLite: {verdict} ({1 / sqlite_guard:,.0f})")


class _Discard(list):  # type: ignore[type-arg]
    def append(self, _item: object) -> None:
        pass


if __name__ == "__main__":
    main()
