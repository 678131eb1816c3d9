"""Strictness under load: no concurrent overspend, across threads, tasks and processes."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from pathlib import Path

import pytest

from agent_meter import Meter, Pricing, SQLiteBackend, UsageLimitExceeded
from agent_meter.testing import MemoryBackend
from tests.conftest import PRICING_TOML


def make_backend(kind: str, pricing: Pricing, tmp_path: Path) -> MemoryBackend | SQLiteBackend:
    if kind == "memory":
        return MemoryBackend(pricing=pricing)
    return SQLiteBackend(tmp_path / "usage.db", pricing=pricing)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_200_threads_against_50_credits_run_exactly_50(
    kind: str, pricing: Pricing, tmp_path: Path
) -> None:
    backend = make_backend(kind, pricing, tmp_path)
    backend.set_balance("cus_1", "credits", 50)
    meter = Meter(backend)
    ran: list[int] = []
    denied: list[int] = []
    start = threading.Barrier(200)

    def call(i: int) -> None:
        start.wait()
        try:
            with meter.guard("cus_1", "web_search", call_id=f"t{i}"):
                ran.append(i)
        except UsageLimitExceeded:
            denied.append(i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ran) == 50
    assert len(denied) == 150
    assert backend.balances("cus_1")["credits"] == 0
    reserves = [e for e in backend.events("cus_1") if e.kind == "reserve"]
    assert len(reserves) == 50
    backend.close()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_200_tasks_against_50_credits_run_exactly_25_code_execs(
    kind: str, pricing: Pricing, tmp_path: Path
) -> None:
    backend = make_backend(kind, pricing, tmp_path)
    backend.set_balance("cus_1", "credits", 50)
    meter = Meter(backend)

    async def call(i: int) -> bool:
        try:
            async with meter.aguard("cus_1", "code_exec", call_id=f"a{i}"):
                await asyncio.sleep(0)
        except UsageLimitExceeded:
            return False
        return True

    outcomes = await asyncio.gather(*(call(i) for i in range(200)))
    assert sum(outcomes) == 25
    assert backend.balances("cus_1")["credits"] == 0
    await backend.aclose()


async def test_sqlite_async_calls_do_not_block_the_event_loop(
    pricing: Pricing, tmp_path: Path
) -> None:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
    meter = Meter(backend)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    for i in range(50):
        async with meter.aguard("cus_1", "web_search", call_id=f"n{i}"):
            pass
    stop.set()
    await task
    assert ticks >= 50  # the loop kept turning while the ledger was written
    await backend.aclose()


def _worker(path: str, calls: int, results: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    backend = SQLiteBackend(path, pricing=Pricing.from_toml(PRICING_TOML))
    meter = Meter(backend)
    ran = 0
    for i in range(calls):
        try:
            with meter.guard(
                "cus_1", "web_search", call_id=f"{multiprocessing.current_process().pid}-{i}"
            ):
                ran += 1
        except UsageLimitExceeded:
            pass
    backend.close()
    results.put(ran)


@pytest.mark.slow
def test_4_processes_on_one_file_against_60_credits_run_exactly_60(
    pricing: Pricing, tmp_path: Path
) -> None:
    path = tmp_path / "shared.db"
    backend = SQLiteBackend(path, pricing=pricing)
    backend.set_balance("cus_1", "credits", 60)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_worker, args=(str(path), 40, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    ran = [results.get(timeout=5) for _ in workers]
    assert sum(ran) == 60
    assert backend.balances("cus_1")["credits"] == 0
    assert len([e for e in backend.events("cus_1") if e.kind == "reserve"]) == 60
    backend.close()
