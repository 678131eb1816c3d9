"""A cancelled async guard gives its reservation back (issue 12, point 4): on the embedded
ledger, and on Autumn (v1 reserve and v2 lock) where the request is on the wire."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.engine import Strategy
from tests.conftest import PRICING_TOML
from tests.outage_helpers import AutumnServer, autumn_meter


@pytest.mark.parametrize("strategy", ["reserve", "lock"])
async def test_cancelling_aguards_while_they_reserve_releases_the_reservations(
    tmp_path: Path, strategy: Strategy
) -> None:
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=Pricing.from_toml(PRICING_TOML))
    backend.set_balance("cus_1", "credits", 100)
    meter = Meter(backend, strategy=strategy, recover_on_start=False)
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


@pytest.mark.parametrize("strategy", ["reserve", "lock"])
async def test_cancelling_aguards_while_autumn_reserves_releases_the_reservations(
    tmp_path: Path, strategy: Strategy
) -> None:
    """The reserve (v1) or lock (v2) reaches Autumn, which answers after the cancel."""
    with AutumnServer(latency=0.4) as server:
        meter = autumn_meter(server, tmp_path / "outbox.db", strategy, timeout=5)
        async with meter.aguard("cus", "web_search", call_id="warm"):
            pass  # the customer is known (a lock creates it first): one request per call
        server.set_balance("cus", 50)

        async def call(n: int) -> None:
            async with meter.aguard("cus", "web_search", 10, call_id=f"c{n}"):
                await asyncio.sleep(10)  # never reached before the cancel

        tasks = [asyncio.create_task(call(n)) for n in range(5)]
        await asyncio.sleep(0.2)  # every reservation is on its way to the server
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        await asyncio.sleep(0.6)  # a request left running after its cancel lands by now
        assert await meter.aflush(timeout=10) == 0
        assert server.balance("cus") == 50  # not 0
        assert server.open_locks() == {}
        assert meter.outbox.holds() == []
        await meter.aclose(timeout=2)


async def test_a_reserve_cancelled_while_its_answer_is_lost_is_voided(tmp_path: Path) -> None:
    """The server applies the reserve and never answers: the cancelled call's reserve is
    in doubt, and kept for reconciliation (voided: refunded once the server answers)."""
    with AutumnServer() as server:
        meter = autumn_meter(server, tmp_path / "outbox.db", "reserve", timeout=0.5)
        server.set_balance("cus", 50)
        server.set_mode("hang", after_apply=True)

        async def call() -> None:
            async with meter.aguard("cus", "web_search", 10, call_id="c1"):
                await asyncio.sleep(10)

        task = asyncio.create_task(call())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert server.balance("cus") == 40  # the reserve landed; its answer never came
        server.set_mode("up")
        assert await meter.aflush(timeout=10) == 0
        assert server.balance("cus") == 50
        assert meter.outbox.holds() == []
        await meter.aclose(timeout=2)
