"""The guarded call: check → work → track, under both strategies and both fail policies."""

from __future__ import annotations

import re

import pytest

from agent_meter import (
    AgentMeterError,
    BackendError,
    BackendUnavailable,
    ConfigError,
    InvalidUsage,
    Meter,
    UsageLimitExceeded,
)
from agent_meter.testing import MemoryBackend


def credits(backend: MemoryBackend, customer: str = "cus_1") -> float:
    value = backend.balances(customer)["credits"]
    assert isinstance(value, float)
    return value


@pytest.fixture
def meter(memory_backend: MemoryBackend) -> Meter:
    return Meter(memory_backend)


def test_successful_call_stays_billed(meter: Meter, memory_backend: MemoryBackend) -> None:
    with meter.guard("cus_1", "code_exec", call_id="call_42") as call:
        assert call.check is not None
        assert call.check.balance == 98  # reserved up front
    assert call.billed == 1
    assert credits(memory_backend) == 98
    assert [c.method for c in memory_backend.calls] == ["check"]


def test_failed_call_is_refunded_and_its_exception_reraised_unchanged(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    error = RuntimeError("tool crashed")
    with pytest.raises(RuntimeError) as raised, meter.guard("cus_1", "code_exec", call_id="c1"):
        raise error
    assert raised.value is error
    assert credits(memory_backend) == 100
    refund = memory_backend.calls[-1]
    assert refund.method == "track"
    assert refund.kwargs["value"] == -1
    # the refund names the call and this attempt (a retry that fails is refunded again)
    assert re.fullmatch(
        r"am1:cus_1::code_exec:c1\.r[0-9a-f]{12}:refund", refund.kwargs["idempotency_key"]
    )


def test_denied_call_never_runs_the_work(meter: Meter, memory_backend: MemoryBackend) -> None:
    memory_backend.set_balance("cus_1", "credits", 1)
    ran = []
    with pytest.raises(UsageLimitExceeded) as denied, meter.guard("cus_1", "code_exec"):
        ran.append(True)
    assert ran == []
    assert denied.value.feature_id == "code_exec"
    assert denied.value.customer_id == "cus_1"
    assert (denied.value.balance, denied.value.required) == (1, 2)
    assert str(denied.value) == "code_exec is unavailable: 1 credit left, 2 needed"
    assert credits(memory_backend) == 1


def test_check_then_track_tracks_after_success_only(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend, strategy="check_then_track")
    with meter.guard("cus_1", "web_search", call_id="a"):
        assert credits(memory_backend) == 100  # nothing deducted before the work
    assert credits(memory_backend) == 99
    with pytest.raises(ValueError, match="boom"), meter.guard("cus_1", "web_search", call_id="b"):
        raise ValueError("boom")
    assert credits(memory_backend) == 99
    tracks = [c.kwargs["idempotency_key"] for c in memory_backend.calls if c.method == "track"]
    assert tracks == ["am1:cus_1::web_search:a:track"]


def test_batch_units_reserve_the_whole_batch(meter: Meter, memory_backend: MemoryBackend) -> None:
    urls = [f"https://example.com/{i}" for i in range(20)]
    with meter.guard("cus_1", "web_search", units=len(urls)):
        pass
    assert credits(memory_backend) == 80


def test_real_count_known_after_the_work_is_adjusted(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    with meter.guard("cus_1", "llm_tokens", units=5000, call_id="sum") as call:
        assert credits(memory_backend) == 95
        call.bill(1830)
    assert call.billed == 1830
    assert credits(memory_backend) == 98.17
    with meter.guard("cus_1", "llm_tokens", units=1000, call_id="sum2") as call:
        call.bill(3000)
    assert credits(memory_backend) == 95.17


def test_failure_reported_without_exception_is_refunded(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    with meter.guard("cus_1", "code_exec") as call:
        call.fail("the tool returned an error")
    assert call.failed
    assert call.billed == 0
    assert credits(memory_backend) == 100


def test_boolean_feature_is_gated_and_never_tracked(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    with meter.guard("cus_1", "premium"):
        pass
    memory_backend.set_balance("cus_1", "premium", False)
    with pytest.raises(UsageLimitExceeded, match="not included"), meter.guard("cus_1", "premium"):
        pass
    assert [c.method for c in memory_backend.calls] == ["check", "check"]
    assert memory_backend.calls[0].kwargs["send_event"] is False


def test_track_is_idempotent_per_customer_and_feature(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    meter.track("cus_1", "llm_tokens", 1830, idempotency_key="run-7:tokens")
    again = meter.track("cus_1", "llm_tokens", 1830, idempotency_key="run-7:tokens")
    other = meter.track("cus_2", "llm_tokens", 1830, idempotency_key="run-7:tokens")
    assert again.duplicate
    assert not other.duplicate  # the same caller key for another customer is its own usage
    assert credits(memory_backend, "cus_1") == 98.17
    assert credits(memory_backend, "cus_2") == 98.17


def test_unknown_feature_is_refused_before_the_backend(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    with pytest.raises(ConfigError, match="no_such"):
        meter.guard("cus_1", "no_such")
    with pytest.raises(ConfigError, match="no_such"):
        meter.track("cus_1", "no_such", 1)
    assert memory_backend.calls == []


@pytest.mark.parametrize("units", [-1, float("nan"), float("inf"), "3", None, True])
def test_bad_units_raise_and_write_nothing(
    meter: Meter, memory_backend: MemoryBackend, units: object
) -> None:
    with pytest.raises(InvalidUsage, match="web_search"):
        meter.guard("cus_1", "web_search", units=units)  # type: ignore[arg-type]
    assert memory_backend.calls == []


def test_backend_down_with_deny_refuses_with_its_own_reason(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    memory_backend.fail(method="check")
    ran = []
    with pytest.raises(BackendUnavailable) as refused, meter.guard("cus_1", "web_search"):
        ran.append(True)
    assert ran == []
    assert "billing service is unreachable" in str(refused.value)
    assert "credits left" not in str(refused.value)
    assert not isinstance(refused.value, UsageLimitExceeded)


def test_backend_down_with_allow_runs_and_tracks_after(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend, on_backend_error="allow")
    memory_backend.fail(method="check", times=1)
    with meter.guard("cus_1", "code_exec", call_id="open") as call:
        assert call.admission is not None
        assert not call.admission.verified
    assert credits(memory_backend) == 98
    assert memory_backend.calls[-1].kwargs["idempotency_key"] == "am1:cus_1::code_exec:open:track"


def test_allow_does_not_open_the_gate_on_a_refused_request(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend, on_backend_error="allow")
    memory_backend.fail(BackendError("401 invalid secret key"), method="check")
    with pytest.raises(BackendError, match="refused"), meter.guard("cus_1", "web_search"):
        pass


def test_customer_scope_binds_methods(meter: Meter, memory_backend: MemoryBackend) -> None:
    scope = meter.customer("cus_9", entity_id="seat_1")
    with scope.guard("web_search"):
        pass
    scope.track("llm_tokens", 1000)
    assert scope.check("web_search").balance == 98
    assert {e.entity_id for e in memory_backend.events("cus_9")} == {"seat_1"}


def test_meter_rejects_unknown_strategy(memory_backend: MemoryBackend) -> None:
    with pytest.raises(ConfigError, match="strategy"):
        Meter(memory_backend, strategy="yolo")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="on_backend_error"):
        Meter(memory_backend, on_backend_error="maybe")  # type: ignore[arg-type]


def test_undelivered_refund_is_kept_and_flushed(
    meter: Meter, memory_backend: MemoryBackend
) -> None:
    memory_backend.fail(method="track")
    with pytest.raises(KeyError), meter.guard("cus_1", "code_exec", call_id="k"):
        raise KeyError("x")
    assert credits(memory_backend) == 98  # the refund did not reach the backend yet
    assert meter.outbox.pending("cus_1") == 1
    memory_backend.heal()
    assert meter.flush(timeout=5) == 0
    assert credits(memory_backend) == 100


def test_errors_share_one_root() -> None:
    for error in (UsageLimitExceeded, BackendError, BackendUnavailable, ConfigError, InvalidUsage):
        assert issubclass(error, AgentMeterError)


async def test_async_guard_bills_and_refunds(meter: Meter, memory_backend: MemoryBackend) -> None:
    async with meter.aguard("cus_1", "code_exec", call_id="a1") as call:
        assert call.check is not None
    with pytest.raises(LookupError):
        async with meter.aguard("cus_1", "code_exec", call_id="a2"):
            raise LookupError
    assert credits(memory_backend) == 98
    memory_backend.set_balance("cus_1", "credits", 0)
    with pytest.raises(UsageLimitExceeded):
        async with meter.aguard("cus_1", "web_search"):
            pass
    await meter.atrack("cus_1", "web_search", -1, idempotency_key="goodwill")
    assert (await meter.acheck("cus_1", "web_search")).balance == 1


def test_a_replayed_call_id_is_reserved_once(backend: MemoryBackend) -> None:
    meter = Meter(backend)
    ran = []
    for _ in range(3):  # the same tool call, replayed after a crash or a retry
        with meter.guard("cus_1", "code_exec", call_id="call_once") as call:
            ran.append(call.check.replayed if call.check else None)
    assert ran == [False, True, True]
    assert credits(backend) == 98
    assert [e.kind for e in backend.events("cus_1")] == ["reserve"]


def test_a_replay_that_fails_refunds_nothing_more(backend: MemoryBackend) -> None:
    meter = Meter(backend)
    with meter.guard("cus_1", "code_exec", call_id="c"):
        pass
    with pytest.raises(RuntimeError), meter.guard("cus_1", "code_exec", call_id="c"):
        raise RuntimeError
    assert credits(backend) == 98


def test_allow_never_runs_a_call_whose_reservation_may_have_been_made(
    memory_backend: MemoryBackend,
) -> None:
    meter = Meter(memory_backend, on_backend_error="allow")
    lost = BackendUnavailable("the answer was lost", maybe_applied=True)
    memory_backend.fail(lost, method="check", times=1)
    ran = []
    with (
        pytest.raises(BackendUnavailable, match="may have been made"),
        meter.guard("cus_1", "code_exec"),
    ):
        ran.append(True)
    assert ran == []
    with meter.guard("cus_1", "code_exec"):  # a plain outage still fails open
        ran.append(True)
    assert ran == [True]
