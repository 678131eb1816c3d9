"""Every send for a customer goes after that customer's queue (issue 12, point 3).

Autumn caps a track at 0: a track that overtakes a queued refund or lock release is
capped, then the refund lifts the balance, and the customer ends with credits after using
them all. Runs against the local Autumn-shaped server, which caps tracks like Autumn.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Meter
from agent_meter.engine import Strategy
from tests.outage_helpers import AutumnServer, autumn_meter

STRATEGIES: list[Strategy] = ["reserve", "lock"]


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    """An Autumn-shaped server whose customers start with the plan's 100 credits."""
    running = AutumnServer()
    with running:
        yield running


def _meter(server: AutumnServer, tmp_path: Path, strategy: Strategy) -> Meter:
    meter = autumn_meter(server, tmp_path / "outbox.db", strategy)
    meter.deliverer._base = 60.0  # a failed delivery waits long: only a drain sends it again
    return meter


def _fail_during_an_outage(meter: Meter, server: AutumnServer) -> None:
    with meter.guard("cus", "web_search", 10, call_id="c1"):
        assert server.balance("cus") == 0
        server.set_mode("503")
        raise RuntimeError("tool failed")


def _queue_a_refund(meter: Meter, server: AutumnServer) -> None:
    """The customer's 10 credits are reserved by a call that fails while Autumn is down:
    its refund (or lock release) waits in the outbox after one failed delivery."""
    server.set_balance("cus", 10)
    with pytest.raises(RuntimeError, match="tool failed"):
        _fail_during_an_outage(meter, server)
    deadline = time.monotonic() + 10
    while not any(entry.attempts for entry in meter.outbox.due(float("inf"), customer_id="cus")):
        assert time.monotonic() < deadline, "the refund was never tried"
        time.sleep(0.01)
    server.set_mode("up")


def _used_up(meter: Meter, server: AutumnServer) -> None:
    """Once everything is delivered the customer has nothing left: refund first, then track."""
    assert meter.flush(timeout=5) == 0
    assert server.balance("cus") == 0  # not 10: the track was not capped before the refund
    assert server.open_locks() == {}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("down", [False, True], ids=["delivered_first", "queued_behind"])
def test_a_direct_track_goes_after_the_customers_queued_refund(
    server: AutumnServer, tmp_path: Path, strategy: Strategy, down: bool
) -> None:
    meter = _meter(server, tmp_path, strategy)
    _queue_a_refund(meter, server)
    if down:  # the refund still cannot be delivered: the track waits behind it
        server.set_mode("503")
    assert meter.track("cus", "web_search", 10, idempotency_key="t1").queued is down
    server.set_mode("up")
    _used_up(meter, server)
    meter.close(timeout=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_a_direct_atrack_goes_after_the_customers_queued_refund(
    server: AutumnServer, tmp_path: Path, strategy: Strategy
) -> None:
    meter = _meter(server, tmp_path, strategy)
    _queue_a_refund(meter, server)
    assert not (await meter.atrack("cus", "web_search", 10, idempotency_key="t1")).queued
    assert await meter.aflush(timeout=5) == 0
    _used_up(meter, server)
    await meter.aclose(timeout=1)


def test_a_guarded_track_goes_after_the_customers_queued_refund(
    server: AutumnServer, tmp_path: Path
) -> None:
    """The settle path queues its track behind the refund (a lock's queued release is not
    waited for by the next check: that check sees less than there is, never more)."""
    meter = _meter(server, tmp_path, "reserve")
    _queue_a_refund(meter, server)
    with meter.guard("cus", "web_search", 10, call_id="c2", strategy="check_then_track"):
        pass
    _used_up(meter, server)
    meter.close(timeout=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_queue_left_by_an_earlier_process_goes_first(
    server: AutumnServer, tmp_path: Path, strategy: Strategy
) -> None:
    first = _meter(server, tmp_path, strategy)
    _queue_a_refund(first, server)
    first.deliverer.stop()  # the process ends with the refund still queued
    later = _meter(server, tmp_path, strategy)
    later.deliverer.stop()
    later.track("cus", "web_search", 10, idempotency_key="t1")
    _used_up(later, server)
    later.close(timeout=1)
