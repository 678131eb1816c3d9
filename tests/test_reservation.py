"""LLM calls reserve their estimate before they run, and settle to real usage after.

Every test runs on both embedded ledgers (the ``backend`` fixture); llm_tokens cost
0.001 credits each, so 1 credit pays 1,000 tokens.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

import pytest

from agent_meter import Meter, Plan, Pricing, SQLiteBackend, TokenUsage, UsageLimitExceeded
from agent_meter.context import CustomerRef
from agent_meter.engine import TrackRequest
from agent_meter.estimate import TokenEstimate
from agent_meter.reservation import areserve_tokens, reserve_tokens
from agent_meter.testing import MemoryBackend
from agent_meter.tokens import TokenFeatures

CUS = CustomerRef("cus_llm")
TOKENS = TokenFeatures()


def usage(input_tokens: int, output_tokens: int) -> TokenUsage:
    return TokenUsage(input_tokens, output_tokens, input_tokens + output_tokens, model="m")


def credits(backend: MemoryBackend | SQLiteBackend) -> float:
    return backend.balances(CUS.customer_id)["credits"]


def test_the_estimate_is_held_while_the_call_runs_and_the_unused_part_given_back(
    backend: MemoryBackend | SQLiteBackend,
) -> None:
    backend.set_balance(CUS.customer_id, "credits", 10)
    meter = Meter(backend)
    held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(200, 800), call_id="run1")
    assert credits(backend) == pytest.approx(9.0)  # 1,000 tokens held before the call
    settled = held.settle(usage(200, 100))
    assert settled is not None
    assert (settled.reserved, settled.used, settled.uncharged) == (1000, 300, 0.0)
    assert credits(backend) == pytest.approx(9.7)
    assert backend.holds() == []
    # the unused part goes back with the closing of the hold, keyed by the call
    tracks = [e for e in backend.events(CUS.customer_id) if e.kind == "track"]
    assert [(e.value, (e.idempotency_key or "").endswith(":run1:adjust")) for e in tracks] == [
        (-700.0, True)
    ]


def test_usage_above_the_estimate_is_charged_when_the_balance_pays(
    backend: MemoryBackend | SQLiteBackend,
) -> None:
    backend.set_balance(CUS.customer_id, "credits", 10)
    meter = Meter(backend)
    held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(100, 400), call_id="run1")
    settled = held.settle(usage(100, 1400))
    assert settled is not None
    assert settled.uncharged == 0.0
    assert credits(backend) == pytest.approx(8.5)


def test_usage_past_reservation_and_balance_charges_what_is_left_and_reports_the_rest(
    backend: MemoryBackend | SQLiteBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.set_balance(CUS.customer_id, "credits", 1)
    meter = Meter(backend)
    held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(100, 500), call_id="run1")
    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        settled = held.settle(usage(100, 1400))
    assert settled is not None
    assert settled.uncharged == pytest.approx(500)  # 1,500 used, 1,000 could be paid
    assert credits(backend) == 0
    assert "could not pay 500 of them" in caplog.text
    assert "cus_llm" in caplog.text


def test_a_failed_call_releases_everything(backend: MemoryBackend | SQLiteBackend) -> None:
    backend.set_balance(CUS.customer_id, "credits", 10)
    meter = Meter(backend)
    held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(200, 800), call_id="run1")
    released = held.release("provider error")
    assert released is not None
    assert released.used is None
    assert credits(backend) == 10
    assert backend.holds() == []


def test_a_call_without_usage_is_released_and_logged(
    backend: MemoryBackend | SQLiteBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.set_balance(CUS.customer_id, "credits", 10)
    meter = Meter(backend)
    held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(200, 800), call_id="run1")
    with caplog.at_level(logging.INFO, logger="agent_meter"):
        held.settle(None)
    assert credits(backend) == 10
    assert "reported no token usage" in caplog.text


def test_settling_twice_or_racing_bills_once(backend: MemoryBackend | SQLiteBackend) -> None:
    backend.set_balance(CUS.customer_id, "credits", 10)
    meter = Meter(backend)
    held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(100, 100), call_id="run1")
    barrier = threading.Barrier(8)
    results = []

    def close(n: int) -> None:
        barrier.wait()
        results.append(held.settle(usage(100, 1900)) if n % 2 else held.release())

    threads = [threading.Thread(target=close, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    closed = [r for r in results if r is not None]
    assert len(closed) == 1
    expected = 10 - (2.0 if closed[0].used else 0.0)
    assert credits(backend) == pytest.approx(expected)
    assert held.settle(usage(1, 1)) is None
    assert credits(backend) == pytest.approx(expected)


def test_a_refusal_holds_nothing(backend: MemoryBackend | SQLiteBackend) -> None:
    backend.set_balance(CUS.customer_id, "credits", 0.5)
    meter = Meter(backend)
    with pytest.raises(UsageLimitExceeded):
        reserve_tokens(meter, CUS, TOKENS, TokenEstimate(100, 500), call_id="run1")
    assert credits(backend) == 0.5
    assert backend.holds() == []


SPLIT = Pricing(
    features={"llm_input": "metered", "llm_output": "metered"},
    credit_systems={"credits": {"llm_input": 0.001, "llm_output": 0.004}},
    plans={"free": Plan(auto_enable=True, grants={"credits": 10})},
)
SPLIT_TOKENS = TokenFeatures(total=None, input="llm_input", output="llm_output")


@pytest.fixture(params=["memory", "sqlite"])
def split_backend(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryBackend | SQLiteBackend:
    if request.param == "memory":
        return MemoryBackend(pricing=SPLIT)
    return SQLiteBackend(tmp_path / "split.db", pricing=SPLIT)


def test_split_pricing_reserves_and_settles_each_side_at_its_rate(
    split_backend: MemoryBackend | SQLiteBackend,
) -> None:
    meter = Meter(split_backend)
    held = reserve_tokens(meter, CUS, SPLIT_TOKENS, TokenEstimate(1000, 1000), call_id="r")
    assert credits(split_backend) == pytest.approx(10 - 1.0 - 4.0)
    held.settle(usage(800, 250))
    assert credits(split_backend) == pytest.approx(10 - 0.8 - 1.0)
    assert split_backend.holds() == []


def test_split_pricing_refused_on_the_output_side_gives_the_input_side_back(
    split_backend: MemoryBackend | SQLiteBackend,
) -> None:
    split_backend.set_balance(CUS.customer_id, "credits", 3)
    meter = Meter(split_backend)
    with pytest.raises(UsageLimitExceeded):  # 1 credit of input fits, 4 of output do not
        reserve_tokens(meter, CUS, SPLIT_TOKENS, TokenEstimate(1000, 1000), call_id="r")
    assert credits(split_backend) == 3
    assert split_backend.holds() == []


def test_async_reserve_and_settle(backend: MemoryBackend | SQLiteBackend) -> None:
    backend.set_balance(CUS.customer_id, "credits", 10)
    meter = Meter(backend)

    async def run() -> None:
        held = await areserve_tokens(meter, CUS, TOKENS, TokenEstimate(200, 800), call_id="a")
        assert credits(backend) == pytest.approx(9.0)
        await held.asettle(usage(200, 300))
        assert await held.arelease() is None
        other = await areserve_tokens(meter, CUS, TOKENS, TokenEstimate(200, 800), call_id="b")
        await other.arelease()

    asyncio.run(run())
    assert credits(backend) == pytest.approx(9.5)
    assert backend.holds() == []


# -- 20 concurrent calls, each limited to and using 1,000 tokens, balance for 5 ------------


class Sampler:
    """Reads the balance in a loop while the calls run: it must never be seen below 0."""

    def __init__(self, backend: MemoryBackend | SQLiteBackend) -> None:
        self.backend = backend
        self.lowest = float("inf")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.lowest = min(self.lowest, credits(self.backend))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _assert_five_ran(
    backend: MemoryBackend | SQLiteBackend, ran: list[int], denied: list[int], lowest: float
) -> None:
    assert len(ran) == 5  # at most 5 start; the balance pays for exactly 5
    assert len(denied) == 15
    assert lowest >= 0
    assert credits(backend) == 0
    # billed = the tokens the calls that ran used: nothing free, nothing extra
    tokens = sum(
        e.value
        for e in backend.events(CUS.customer_id)
        if e.feature_id == "llm_tokens" and e.kind in ("reserve", "track")
    )
    assert tokens == 5 * 1000
    assert backend.holds() == []


def test_20_threads_each_using_1000_tokens_on_a_balance_for_5(
    backend: MemoryBackend | SQLiteBackend,
) -> None:
    backend.set_balance(CUS.customer_id, "credits", 5)
    meter = Meter(backend)
    ran: list[int] = []
    denied: list[int] = []
    barrier = threading.Barrier(20)

    def call(n: int) -> None:
        barrier.wait()
        try:
            held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(200, 800), call_id=f"t{n}")
        except UsageLimitExceeded:
            denied.append(n)
            return
        ran.append(n)  # the provider serves the call: 200 prompt + 800 completion tokens
        held.settle(usage(200, 800))

    with Sampler(backend) as sampler:
        threads = [threading.Thread(target=call, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    _assert_five_ran(backend, ran, denied, sampler.lowest)


def test_20_tasks_each_using_1000_tokens_on_a_balance_for_5(
    backend: MemoryBackend | SQLiteBackend,
) -> None:
    backend.set_balance(CUS.customer_id, "credits", 5)
    meter = Meter(backend)
    ran: list[int] = []
    denied: list[int] = []

    async def call(n: int) -> None:
        try:
            held = await areserve_tokens(
                meter, CUS, TOKENS, TokenEstimate(200, 800), call_id=f"a{n}"
            )
        except UsageLimitExceeded:
            denied.append(n)
            return
        ran.append(n)
        await asyncio.sleep(0.01)  # the calls overlap
        await held.asettle(usage(200, 800))

    async def main() -> None:
        await asyncio.gather(*(call(n) for n in range(20)))

    with Sampler(backend) as sampler:
        asyncio.run(main())
    _assert_five_ran(backend, ran, denied, sampler.lowest)


def test_a_track_says_what_the_balance_could_not_pay(
    backend: MemoryBackend | SQLiteBackend,
) -> None:
    backend.set_balance(CUS.customer_id, "credits", 0.25)
    first = backend.track(TrackRequest(CUS.customer_id, "llm_tokens", 100, idempotency_key="k1"))
    assert first.uncharged == 0.0
    capped = backend.track(TrackRequest(CUS.customer_id, "llm_tokens", 400, idempotency_key="k2"))
    assert capped.uncharged == pytest.approx(250)  # 0.15 credits paid 150 of 400 tokens
    assert credits(backend) == 0
    again = backend.track(TrackRequest(CUS.customer_id, "llm_tokens", 400, idempotency_key="k2"))
    assert (again.duplicate, again.uncharged) == (True, 0.0)


def test_under_the_lock_strategy_a_shortfall_is_reported_unknown_not_zero(
    backend: MemoryBackend | SQLiteBackend, caplog: pytest.LogCaptureFixture
) -> None:
    # A lock is confirmed with the real count; the finalize does not say what was paid.
    backend.set_balance(CUS.customer_id, "credits", 1)
    meter = Meter(backend, strategy="lock")
    held = reserve_tokens(meter, CUS, TOKENS, TokenEstimate(100, 500), call_id="run1")
    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        settled = held.settle(usage(100, 1400))
    assert settled is not None
    assert settled.uncharged is None  # unknown, never reported as fully paid
    assert "does not say whether the balance could pay it" in caplog.text
    assert credits(backend) >= 0
