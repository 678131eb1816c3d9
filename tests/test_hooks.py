"""Every billing decision is an event passed to the meter's hooks; logging is the default."""

from __future__ import annotations

import logging

import pytest

from agent_meter import BackendUnavailable, Meter, UsageLimitExceeded
from agent_meter.hooks import (
    Admitted,
    Billed,
    Denied,
    Event,
    LoggingHook,
    Refunded,
    Unverified,
)
from agent_meter.testing import MemoryBackend


def recorded(meter: Meter) -> list[Event]:
    events: list[Event] = []
    meter.add_hook(events.append)
    return events


def test_the_default_hook_is_logging(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    assert [type(hook) for hook in meter.hooks] == [LoggingHook]


async def test_each_decision_is_one_event(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    events = recorded(meter)
    with meter.guard("cus_1", "web_search", 2, call_id="ok"):
        pass
    with pytest.raises(RuntimeError):
        async with meter.aguard("cus_1", "code_exec", call_id="fails"):
            raise RuntimeError
    memory_backend.deny(feature_id="web_search")
    with pytest.raises(UsageLimitExceeded), meter.guard("cus_1", "web_search", call_id="no"):
        pass
    kinds = [type(event) for event in events]
    assert kinds == [Admitted, Billed, Admitted, Refunded, Denied]
    admitted, billed, _, refunded, denied = events
    assert isinstance(admitted, Admitted)
    assert admitted.reserved == 2
    assert isinstance(billed, Billed)
    assert billed.units == 2
    assert billed.call.call_id == "ok"
    assert billed.started_at <= billed.at
    assert isinstance(refunded, Refunded)
    assert refunded.units == 1
    assert isinstance(denied, Denied)
    assert denied.reason == "limit"


def test_a_replay_and_a_real_count_are_billed_as_the_ledger_bills_them(
    memory_backend: MemoryBackend,
) -> None:
    meter = Meter(memory_backend)
    events = recorded(meter)
    with meter.guard("cus_1", "web_search", 3, call_id="same") as call:
        call.bill(5)
    with meter.guard("cus_1", "web_search", 3, call_id="same"):
        pass  # a replayed tool call: not billed again
    billed = [event.units for event in events if isinstance(event, Billed)]
    assert billed == [5, 0]
    assert memory_backend.balances("cus_1")["credits"] == 100 - 5


def test_unverified_and_refused_when_billing_is_down(
    memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    meter = Meter(memory_backend, on_backend_error="allow", unverified_limit=1)
    events = recorded(meter)
    memory_backend.fail(error=lambda: BackendUnavailable("down"))
    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        with meter.guard("cus_1", "web_search", call_id="u1"):
            pass
        with pytest.raises(BackendUnavailable), meter.guard("cus_1", "web_search", call_id="u2"):
            pass
    unverified = [event for event in events if isinstance(event, Unverified)]
    denied = [event for event in events if isinstance(event, Denied)]
    assert [(event.count, event.limit) for event in unverified] == [(1, 1)]
    assert [event.reason for event in denied] == ["backend_error"]
    assert any("runs unverified (1 of 1)" in record.getMessage() for record in caplog.records)


def test_a_failing_hook_never_changes_a_bill(
    memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    meter = Meter(memory_backend)

    def broken(event: Event) -> None:
        raise ValueError("instrumentation bug")

    meter.add_hook(broken)
    with caplog.at_level(logging.ERROR, logger="agent_meter"), meter.guard("cus_1", "web_search"):
        pass
    assert memory_backend.balances("cus_1")["credits"] == 99
    assert any("hook" in record.getMessage() for record in caplog.records)
    meter.remove_hook(broken)
    with pytest.raises(ValueError, match="not in list"):
        meter.remove_hook(broken)
