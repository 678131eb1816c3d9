"""LLM reservations on Autumn, against the local Autumn-shaped server.

The reservation is a lock of the estimate (Autumn's default strategy) journaled in the
meter's outbox; its confirm with the real count, or its release, is delivered through the
outbox. The same flow against recorded Autumn HTTP: test_reservation_autumn_locks.py.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Meter, TokenUsage, UsageLimitExceeded
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.context import CustomerRef
from agent_meter.estimate import TokenEstimate
from agent_meter.reservation import reserve_tokens
from agent_meter.tokens import TokenFeatures
from tests.outage_helpers import SECRET, AutumnServer, pricing

CUS = CustomerRef("cus_autumn_llm")


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    with AutumnServer() as running:
        yield running


def make_meter(server: AutumnServer, tmp_path: Path) -> Meter:
    backend = AutumnBackend(SECRET, base_url=server.url, timeout=2.0, max_retries=1)
    return Meter(backend, pricing=pricing(), outbox=tmp_path / "outbox.db")


def test_the_unused_part_is_refunded_and_the_excess_charged(
    server: AutumnServer, tmp_path: Path
) -> None:
    meter = make_meter(server, tmp_path)
    held = reserve_tokens(meter, CUS, TokenFeatures(), TokenEstimate(200, 800), call_id="a")
    assert server.balance(CUS.customer_id) == pytest.approx(99.0)
    held.settle(TokenUsage(200, 100, 300))
    other = reserve_tokens(meter, CUS, TokenFeatures(), TokenEstimate(100, 100), call_id="b")
    other.settle(TokenUsage(100, 400, 500))
    assert meter.flush(timeout=10) == 0
    assert server.balance(CUS.customer_id) == pytest.approx(100 - 0.3 - 0.5)
    meter.close()


def test_20_threads_each_using_1000_tokens_on_a_balance_for_5(
    server: AutumnServer, tmp_path: Path
) -> None:
    server.set_balance(CUS.customer_id, 5)
    meter = make_meter(server, tmp_path)
    outcomes: list[str] = []
    barrier = threading.Barrier(20)

    def call(n: int) -> None:
        barrier.wait()
        try:
            held = reserve_tokens(
                meter, CUS, TokenFeatures(), TokenEstimate(200, 800), call_id=f"t{n}"
            )
        except UsageLimitExceeded:
            outcomes.append("refused")
            return
        outcomes.append("ran")
        held.settle(TokenUsage(200, 800, 1000))

    threads = [threading.Thread(target=call, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert meter.flush(timeout=10) == 0
    assert outcomes.count("ran") == 5
    assert server.balance(CUS.customer_id) == 0
    meter.close()
