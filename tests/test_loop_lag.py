"""Async calls never block the event loop, even while another process holds a write lock.

Another connection holds the SQLite ledger's (or the outbox's) write lock for a second,
as a worker process sharing the file does under load. Concurrent ``aguard``/``atrack``
calls must wait for it and then succeed, while a ticker task on the same loop measures
how long the loop stalls: never more than 50 ms.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_meter import Meter, SQLiteBackend
from agent_meter.backends.autumn import AutumnBackend
from tests.outage_helpers import SECRET, AutumnServer, pricing

HOLD_SECONDS = 1.0
MAX_STALL = 0.050
TICK = 0.005


def hold_write_lock(path: Path, locked: threading.Event) -> threading.Thread:
    """Another connection takes ``path``'s write lock for HOLD_SECONDS."""

    def hold() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(HOLD_SECONDS)
            conn.execute("COMMIT")
        finally:
            conn.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    return thread


async def worst_stall_while(
    path: Path, calls: Callable[[], list[Coroutine[Any, Any, object]]]
) -> tuple[float, float, list[object]]:
    """Run ``calls`` while ``path`` is write-locked; the loop's worst stall and the results."""
    stop = asyncio.Event()
    worst = 0.0

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            worst = max(worst, now - last - TICK)
            last = now

    locked = threading.Event()
    holder = hold_write_lock(path, locked)
    await asyncio.to_thread(locked.wait, 5)
    ticking = asyncio.create_task(ticker())
    start = time.perf_counter()
    results = await asyncio.gather(*calls())
    elapsed = time.perf_counter() - start
    stop.set()
    await ticking
    await asyncio.to_thread(holder.join, 5)
    return worst, elapsed, results


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    with AutumnServer() as running:
        yield running


async def guarded(meter: Meter, customer: str, call_id: str, **options: Any) -> str:
    async with meter.aguard(customer, "web_search", call_id=call_id, **options):
        return "ran"


async def test_sqlite_ledger_lock_is_waited_for_off_the_loop(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    meter = Meter(SQLiteBackend(path, pricing=pricing()))
    await meter.atrack("cus_a", "web_search", 1, idempotency_key="warm")  # customer exists

    def calls() -> list[Coroutine[Any, Any, object]]:
        guards = [guarded(meter, "cus_a", f"g{n}") for n in range(8)]
        tracks = [meter.atrack("cus_a", "web_search", 1, idempotency_key=f"t{n}") for n in range(4)]
        return [*guards, *tracks]

    worst, elapsed, results = await worst_stall_while(path, calls)
    assert results[:8] == ["ran"] * 8
    assert all(not track.queued for track in results[8:])  # type: ignore[attr-defined]
    assert elapsed >= HOLD_SECONDS * 0.8  # they did wait for the lock
    assert worst < MAX_STALL, f"the event loop stalled {worst * 1000:.0f} ms"
    assert meter.backend.balances("cus_a")["credits"] == pytest.approx(100 - 1 - 8 - 4)  # type: ignore[attr-defined]
    await meter.aclose()


async def test_outbox_lock_of_a_remote_backend_is_waited_for_off_the_loop(
    server: AutumnServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    backend = AutumnBackend(SECRET, base_url=server.url, timeout=5)
    meter = Meter(backend, pricing=pricing(), outbox=outbox)
    async with meter.aguard("cus_r", "web_search", call_id="warm"):  # the journal exists
        pass

    def calls() -> list[Coroutine[Any, Any, object]]:
        reserving = [guarded(meter, "cus_r", f"g{n}") for n in range(6)]
        tracked = [guarded(meter, "cus_r", f"c{n}", strategy="check_then_track") for n in range(3)]
        tracks = [meter.atrack("cus_r", "web_search", 1, idempotency_key=f"t{n}") for n in range(3)]
        return [*reserving, *tracked, *tracks]

    worst, elapsed, results = await worst_stall_while(outbox, calls)
    assert results[:9] == ["ran"] * 9
    assert elapsed >= HOLD_SECONDS * 0.8  # the journal writes waited for the lock
    assert worst < MAX_STALL, f"the event loop stalled {worst * 1000:.0f} ms"
    assert await meter.aflush(timeout=10) == 0
    assert server.balance("cus_r") == pytest.approx(100 - 1 - 6 - 3 - 3)
    await meter.aclose()
