"""A cancelled async guard gives its reservation back (issue 12, point 4)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from agent_meter import Meter, Pricing, SQLiteBackend
from tests.conftest import PRICING_TOML


async def test_cancelling_aguards_while_they_reserve_releases_the_reservations(
    tmp_path: Path,
) -> None:
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=Pricing.from_toml(PRICING_TOML))
    backend.set_balance("cus_1", "credits", 100)
    meter = Meter(backend, recover_on_start=False)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # reservations wait for this writer

    async def call(n: int) -> None:
        async with meter.aguard("cus_1", "code_exec", 5, call_id=f"c{n}"):
            await asyncio.sleep(10)  # never reached before the cancel

    tasks = [asyncio.create_task(call(n)) for n in range(5)]
    await asyncio.sleep(0.3)  # every call is inside its reservation, waiting for the lock
    for task in tasks:
        task.cancel()
    await asyncio.sleep(0.1)
    blocker.execute("COMMIT")  # now the reservations go through in their threads
    blocker.close()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
    await asyncio.sleep(0.5)  # a reservation left running in a worker thread lands by now
    assert backend.holds() == []
    assert backend.balances("cus_1")["credits"] == 100  # not 50
    await meter.aclose()
