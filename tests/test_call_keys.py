"""Key semantics on both embedded ledgers (issue 14, points 1-3).

A replay of a call that succeeded is not billed again; a retry after a failure is billed
when it succeeds; Memory and SQLite give the same answers, a replay at 0 credits included.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Meter, SQLiteBackend
from agent_meter.errors import UsageLimitExceeded
from agent_meter.integration import call_key, langgraph_scope
from agent_meter.testing import MemoryBackend
from tests.langchain_tools_helpers import example_pricing

CUSTOMER = "cus_keys"


@pytest.fixture(params=["memory", "sqlite"])
def ledger(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[MemoryBackend | SQLiteBackend]:
    backend: MemoryBackend | SQLiteBackend
    if request.param == "memory":
        backend = MemoryBackend(pricing=example_pricing())
    else:
        backend = SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())
    backend.set_balance(CUSTOMER, "credits", 10)
    yield backend
    backend.close()


def credits(ledger: MemoryBackend | SQLiteBackend) -> float:
    return float(ledger.balances(CUSTOMER)["credits"])


def fail_once(meter: Meter, call_id: str) -> None:
    with pytest.raises(RuntimeError), meter.guard(CUSTOMER, "web_search", call_id=call_id):
        raise RuntimeError("tool crashed")


def test_a_retry_after_a_failure_is_billed_when_it_succeeds(ledger) -> None:
    meter = Meter(ledger, recover_on_start=False)
    fail_once(meter, "call_1")
    assert credits(ledger) == 10
    with meter.guard(CUSTOMER, "web_search", call_id="call_1") as call:
        pass
    assert call.admission is not None
    assert not call.admission.replay
    assert call.billed == 1
    assert credits(ledger) == 9


def test_every_failed_attempt_is_refunded_and_the_success_billed_once(ledger) -> None:
    meter = Meter(ledger, recover_on_start=False)
    for _ in range(3):
        fail_once(meter, "call_1")
    assert credits(ledger) == 10
    for _ in range(2):  # the success, then a replay of it
        with meter.guard(CUSTOMER, "web_search", call_id="call_1"):
            pass
    assert credits(ledger) == 9
    assert ledger.holds() == []


async def test_an_async_retry_after_a_failed_sync_attempt_is_billed(ledger) -> None:
    meter = Meter(ledger, recover_on_start=False)
    fail_once(meter, "call_1")
    async with meter.aguard(CUSTOMER, "web_search", call_id="call_1"):
        pass
    assert credits(ledger) == 9


def test_a_replay_after_success_is_not_billed_again(ledger) -> None:
    meter = Meter(ledger, recover_on_start=False)
    for _ in range(3):
        with meter.guard(CUSTOMER, "web_search", call_id="call_1"):
            pass
    assert credits(ledger) == 9


def test_a_success_that_used_less_than_its_estimate_stays_reserved(ledger) -> None:
    meter = Meter(ledger, recover_on_start=False)
    for _ in range(2):  # the call, then its replay
        with meter.guard(CUSTOMER, "web_search", 3, call_id="call_1") as call:
            call.bill(1)
    assert credits(ledger) == 9
    assert ledger.holds() == []


def test_a_replay_at_zero_credits_runs_free_on_both_ledgers(ledger) -> None:
    meter = Meter(ledger, recover_on_start=False)
    with meter.guard(CUSTOMER, "code_exec", call_id="call_1"):
        pass
    ledger.set_balance(CUSTOMER, "credits", 0)
    ran = []
    with meter.guard(CUSTOMER, "code_exec", call_id="call_1") as replay:
        ran.append(True)
    assert ran == [True]
    assert replay.admission is not None
    assert replay.admission.replay
    assert credits(ledger) == 0
    # a new call is still refused at 0 credits
    with pytest.raises(UsageLimitExceeded), meter.guard(CUSTOMER, "code_exec", call_id="call_2"):
        pass


def test_a_retry_after_failure_at_zero_credits_is_refused(ledger) -> None:
    """The failed attempt was never paid: its retry is a new reservation, like any call."""
    meter = Meter(ledger, recover_on_start=False)
    ledger.set_balance(CUSTOMER, "credits", 2)
    fail_once(meter, "call_1")
    with meter.guard(CUSTOMER, "code_exec", call_id="other"):
        pass
    assert credits(ledger) == 0
    with pytest.raises(UsageLimitExceeded), meter.guard(CUSTOMER, "web_search", call_id="call_1"):
        pass


def test_call_keys_name_the_call_its_scope_and_arguments() -> None:
    key = call_key("call_0", {"q": "x", "n": 1}, scope="thread-1|tools:abc")
    assert key.startswith("call_0.")
    assert key == call_key("call_0", {"n": 1, "q": "x"}, scope="thread-1|tools:abc")
    assert key != call_key("call_0", {"q": "y", "n": 1}, scope="thread-1|tools:abc")
    assert key != call_key("call_0", {"q": "x", "n": 1}, scope="thread-1|tools:def")
    assert call_key(None, {"q": "x"}) != call_key(None, {"q": "x"})  # no id: never a replay


def test_langgraph_scope_reads_thread_and_task() -> None:
    assert langgraph_scope(None) is None
    assert langgraph_scope({"configurable": {"customer_id": "c"}}) is None
    config = {"configurable": {"thread_id": "t1", "checkpoint_ns": "tools:1"}}
    assert langgraph_scope(config) == "t1|tools:1"
    assert langgraph_scope({"metadata": {"checkpoint_ns": "tools:2"}}) == "|tools:2"
