"""The ``lock`` strategy through the meter: hold, then confirm the real count or release.

On the embedded ledgers a lock is a reservation settled in one commit; on Autumn (the local
Autumn-shaped server here) it is a v2 lock whose confirm or release waits in the durable
outbox. Both keep Autumn's semantics: a release is exact, above the plan's grant too, and a
confirm charges the real count (``GuardedCall.bill``) above or below the hold.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import ConfigError, Meter, SQLiteBackend, UsageLimitExceeded
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.testing import MemoryBackend
from tests.outage_helpers import SECRET, AutumnServer, pricing

CUS = "cus_lock"


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    with AutumnServer() as running:
        yield running


def embedded(kind: str, tmp_path: Path) -> MemoryBackend | SQLiteBackend:
    if kind == "memory":
        return MemoryBackend(pricing=pricing())
    return SQLiteBackend(tmp_path / "usage.db", pricing=pricing())


def autumn_meter(server: AutumnServer, tmp_path: Path, **options: object) -> Meter:
    backend = AutumnBackend(SECRET, base_url=server.url, timeout=2, max_retries=1, backoff=0.01)
    return Meter(backend, pricing=pricing(), outbox=tmp_path / "outbox.db", **options)  # type: ignore[arg-type]


def credits_of(meter: Meter, server: AutumnServer | None = None) -> float:
    if server is not None:
        assert meter.flush(timeout=10) == 0
        assert server.open_locks() == {}
        return server.balance(CUS)
    return float(meter.backend.balances(CUS)["credits"])  # type: ignore[attr-defined]


def test_lock_is_autumns_default_and_reserve_the_embedded_one(
    server: AutumnServer, tmp_path: Path
) -> None:
    assert autumn_meter(server, tmp_path).strategy == "lock"
    assert Meter(MemoryBackend(pricing=pricing())).strategy == "reserve"
    assert autumn_meter(server, tmp_path, strategy="reserve").strategy == "reserve"


def test_lock_needs_a_backend_with_locks() -> None:
    class NoLocks(MemoryBackend):
        lock = None  # type: ignore[assignment]

    with pytest.raises(ConfigError, match="needs a backend with locks"):
        Meter(NoLocks(pricing=pricing()), strategy="lock")
    meter = Meter(NoLocks(pricing=pricing()))
    with pytest.raises(ConfigError, match="needs a backend with locks"):
        meter.guard(CUS, "web_search", strategy="lock")


# -- the same outcomes on every backend -----------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite", "autumn"])
def test_success_confirms_failure_releases_and_bill_overrides(
    kind: str, server: AutumnServer, tmp_path: Path
) -> None:
    if kind == "autumn":
        meter, watched = autumn_meter(server, tmp_path, strategy="lock"), server
    else:
        meter, watched = Meter(embedded(kind, tmp_path), strategy="lock"), None
    with meter.guard(CUS, "code_exec", call_id="ok") as call:
        assert call.check is not None
        assert (call.check.deducted, call.check.balance) == (True, 98.0)
    assert credits_of(meter, watched) == 98.0
    with pytest.raises(RuntimeError), meter.guard(CUS, "code_exec", call_id="boom"):
        raise RuntimeError("the tool failed")
    assert credits_of(meter, watched) == 98.0  # released exactly
    with meter.guard(CUS, "code_exec", 3, call_id="fewer") as call:
        call.bill(1)  # held 6 credits, used 2
    assert credits_of(meter, watched) == 96.0
    with meter.guard(CUS, "code_exec", 1, call_id="more") as call:
        call.bill(4)  # held 2 credits, used 8
    assert credits_of(meter, watched) == 88.0
    with meter.guard(CUS, "code_exec", call_id="soft") as call:
        call.fail("an error result")
    assert credits_of(meter, watched) == 88.0
    meter.close(timeout=2)


@pytest.mark.parametrize("kind", ["memory", "sqlite", "autumn"])
def test_a_release_gives_back_above_the_grant(
    kind: str, server: AutumnServer, tmp_path: Path
) -> None:
    if kind == "autumn":
        meter, watched = autumn_meter(server, tmp_path, strategy="lock"), server
        meter.check(CUS, "web_search")  # the customer exists
        server.set_balance(CUS, 150)  # a top-up: above the grant of 100
    else:
        backend = embedded(kind, tmp_path)
        backend.set_balance(CUS, "credits", 150)
        meter, watched = Meter(backend, strategy="lock"), None
    with pytest.raises(RuntimeError), meter.guard(CUS, "code_exec", 5, call_id="a"):
        raise RuntimeError("the tool failed")
    assert credits_of(meter, watched) == 150.0
    meter.close(timeout=2)


def test_on_autumn_a_reserve_refund_above_the_grant_is_lost_where_a_lock_is_not(
    server: AutumnServer, tmp_path: Path
) -> None:
    """The contrast of facts 16 and 17: why ``lock`` is the default on Autumn."""
    outcomes = {}
    for strategy in ("reserve", "lock"):
        customer = f"cus_topped_{strategy}"
        meter = autumn_meter(server, tmp_path / strategy, strategy=strategy)
        meter.check(customer, "web_search")
        server.set_balance(customer, 150)
        with pytest.raises(RuntimeError), meter.guard(customer, "code_exec", 5):
            raise RuntimeError("the tool failed")
        assert meter.flush(timeout=10) == 0
        outcomes[strategy] = server.balance(customer)
        meter.close(timeout=2)
    assert outcomes == {"reserve": 140.0, "lock": 150.0}


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_200_threads_against_50_credits_lock_exactly_50(kind: str, tmp_path: Path) -> None:
    backend = embedded(kind, tmp_path)
    backend.set_balance(CUS, "credits", 50)
    meter = Meter(backend, strategy="lock")
    ran: list[int] = []
    denied: list[int] = []
    barrier = threading.Barrier(20)

    def worker(n: int) -> None:
        barrier.wait()
        for m in range(10):
            try:
                with meter.guard(CUS, "web_search", call_id=f"t{n}-{m}"):
                    ran.append(1)
            except UsageLimitExceeded:
                denied.append(1)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(ran), len(denied)) == (50, 150)
    assert credits_of(meter) == 0.0
    meter.close()


async def test_the_async_twins_lock_and_settle_on_autumn(
    server: AutumnServer, tmp_path: Path
) -> None:
    meter = autumn_meter(server, tmp_path)

    async def one(n: int) -> None:
        async with meter.aguard(CUS, "web_search", 2, call_id=f"a{n}") as call:
            call.bill(1)

    await asyncio.gather(*(one(n) for n in range(10)))
    with pytest.raises(RuntimeError):
        async with meter.aguard(CUS, "web_search", call_id="fails"):
            raise RuntimeError("the tool failed")
    assert await meter.aflush(timeout=10) == 0
    assert server.open_locks() == {}
    assert server.balance(CUS) == 90.0
    assert server.stats.finalized == {"confirm": 10, "release": 1}
    await meter.aclose(timeout=2)


def test_a_success_costs_one_round_trip_on_the_callers_path(
    server: AutumnServer, tmp_path: Path
) -> None:
    """The confirm waits in the outbox; the next call does not wait for it either."""
    meter = autumn_meter(server, tmp_path)
    meter.check(CUS, "web_search")
    server.latency = 0.05
    requests_before = server.stats.checks
    for n in range(3):
        with meter.guard(CUS, "web_search", call_id=f"r{n}"):
            pass
    assert server.stats.checks - requests_before == 3  # one lock per call, nothing else
    server.latency = 0.0
    assert credits_of(meter, server) == 97.0
    meter.close(timeout=2)
