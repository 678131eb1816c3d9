"""One contract, every embedded backend: Autumn's semantics (DESIGN.md §2)."""

from __future__ import annotations

import pytest

from agent_meter import ConfigError, InvalidUsage, SQLiteBackend
from agent_meter.engine import CheckRequest, TrackRequest
from agent_meter.testing import MemoryBackend
from tests.conftest import FakeClock

Backend = MemoryBackend | SQLiteBackend


def credits(backend: Backend, customer: str) -> float:
    value = backend.balances(customer)["credits"]
    assert isinstance(value, float)
    return value


def test_new_customer_is_created_with_the_auto_enabled_plan(backend: Backend) -> None:
    result = backend.check(CheckRequest("cus_new", "web_search"))
    assert result.allowed
    assert result.balance == 100
    assert result.balance_feature_id == "credits"
    assert result.included_usage == 100
    assert backend.balances("cus_new") == {"credits": 100.0, "premium": True}
    assert "cus_new" in backend.customers()


def test_check_answers_about_the_pool_with_required_converted(backend: Backend) -> None:
    assert backend.check(CheckRequest("c", "llm_tokens", required_balance=5000)).required == 5
    assert backend.check(CheckRequest("c", "code_exec")).required == 2
    assert backend.check(CheckRequest("c", "web_search", required_balance=0.5)).required == 0.5
    assert credits(backend, "c") == 100  # a plain check deducts nothing


def test_send_event_checks_and_deducts_in_one_step(backend: Backend) -> None:
    result = backend.check(CheckRequest("c", "code_exec", send_event=True))
    assert result.allowed
    assert result.deducted
    assert result.balance == 98
    assert credits(backend, "c") == 98
    assert [e.kind for e in backend.events("c")] == ["reserve"]


def test_denied_check_deducts_nothing(backend: Backend) -> None:
    backend.set_balance("c", "credits", 1)
    result = backend.check(CheckRequest("c", "code_exec", send_event=True))
    assert not result.allowed
    assert not result.deducted
    assert result.balance == 1
    assert result.required == 2
    assert credits(backend, "c") == 1
    assert backend.events("c") == []


def test_track_lowers_the_pool_by_the_converted_cost(backend: Backend) -> None:
    backend.track(TrackRequest("c", "llm_tokens", 1234, idempotency_key="k1"))
    assert credits(backend, "c") == 98.766
    backend.track(TrackRequest("c", "web_search", 1, idempotency_key="k2"))
    backend.track(TrackRequest("c", "code_exec", 1, idempotency_key="k3"))
    assert credits(backend, "c") == 95.766
    event = backend.events("c", feature_id="llm_tokens")[0]
    assert (event.value, event.credits, event.applied) == (1234, 1.234, -1.234)


def test_track_past_the_balance_is_capped_at_zero(backend: Backend) -> None:
    backend.track(TrackRequest("c", "web_search", 150, idempotency_key="over"))
    assert credits(backend, "c") == 0
    denied = backend.check(CheckRequest("c", "web_search"))
    assert not denied.allowed
    assert denied.balance == 0
    assert backend.events("c")[0].applied == -100


def test_negative_track_refunds_and_zero_is_a_no_op(backend: Backend) -> None:
    backend.track(TrackRequest("c", "web_search", 2, idempotency_key="two"))
    backend.track(TrackRequest("c", "llm_tokens", 0, idempotency_key="zero"))
    backend.track(TrackRequest("c", "llm_tokens", 2.5, idempotency_key="frac"))
    assert credits(backend, "c") == 97.9975
    backend.track(TrackRequest("c", "web_search", -1, idempotency_key="neg"))
    assert credits(backend, "c") == 98.9975


def test_repeated_idempotency_key_is_recorded_once(backend: Backend) -> None:
    first = backend.track(TrackRequest("c", "code_exec", 1, idempotency_key="dup"))
    second = backend.track(TrackRequest("c", "code_exec", 1, idempotency_key="dup"))
    assert not first.duplicate
    assert second.duplicate
    assert credits(backend, "c") == 98
    assert len(backend.events("c")) == 1


def test_idempotency_keys_are_global_not_per_customer(backend: Backend) -> None:
    backend.track(TrackRequest("a", "web_search", 1, idempotency_key="shared"))
    result = backend.track(TrackRequest("b", "web_search", 1, idempotency_key="shared"))
    assert result.duplicate
    assert credits(backend, "a") == 99
    assert backend.check(CheckRequest("b", "web_search")).balance == 100


def test_boolean_feature_is_a_gate(backend: Backend) -> None:
    granted = backend.check(CheckRequest("c", "premium"))
    assert granted.allowed
    assert granted.balance == 0
    backend.set_balance("c", "premium", False)
    refused = backend.check(CheckRequest("c", "premium"))
    assert not refused.allowed
    assert refused.balance is None
    with pytest.raises(InvalidUsage, match="boolean"):
        backend.track(TrackRequest("c", "premium", 1, idempotency_key="never"))


def test_included_balance_resets_at_the_plan_interval(backend: Backend, clock: FakeClock) -> None:
    backend.track(TrackRequest("c", "web_search", 60, idempotency_key="spend"))
    assert credits(backend, "c") == 40
    clock.advance(20 * 86_400)
    assert backend.check(CheckRequest("c", "web_search")).balance == 40
    clock.advance(15 * 86_400)  # past one calendar month
    assert backend.check(CheckRequest("c", "web_search")).balance == 100
    backend.track(TrackRequest("c", "web_search", 1, idempotency_key="after-reset"))
    assert credits(backend, "c") == 99


def test_set_balance_rejects_a_pooled_feature_and_unknown_ids(backend: Backend) -> None:
    with pytest.raises(ConfigError, match="draws from 'credits'"):
        backend.set_balance("c", "web_search", 5)
    with pytest.raises(ConfigError, match="nope"):
        backend.set_balance("c", "nope", 5)
    with pytest.raises(InvalidUsage):
        backend.set_balance("c", "credits", -1)
    with pytest.raises(InvalidUsage):
        backend.set_balance("c", "premium", 3)


@pytest.mark.parametrize(
    ("customer", "feature", "value", "error"),
    [
        ("", "web_search", 1, InvalidUsage),
        ("   ", "web_search", 1, InvalidUsage),
        ("c", "", 1, InvalidUsage),
        ("c", "web_search", float("nan"), InvalidUsage),
        ("c", "web_search", float("inf"), InvalidUsage),
        ("c", "web_search", "1", InvalidUsage),
        ("c", "web_search", True, InvalidUsage),
        ("c", "no_such_feature", 1, ConfigError),
        (None, "web_search", 1, InvalidUsage),
    ],
)
def test_bad_input_raises_a_typed_error_and_writes_nothing(
    backend: Backend, customer: object, feature: object, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        backend.track(TrackRequest(customer, feature, value, idempotency_key="bad"))  # type: ignore[arg-type]
    with pytest.raises(error):
        backend.check(CheckRequest(customer, feature, required_balance=value, send_event=True))  # type: ignore[arg-type]
    assert backend.events() == []
    assert backend.customers() == []


def test_negative_check_is_refused(backend: Backend) -> None:
    with pytest.raises(InvalidUsage, match="negative"):
        backend.check(CheckRequest("c", "web_search", required_balance=-1))
    assert backend.customers() == []


def test_track_needs_an_idempotency_key(backend: Backend) -> None:
    with pytest.raises(InvalidUsage, match="idempotency_key"):
        backend.track(TrackRequest("c", "web_search", 1, idempotency_key=""))
    assert backend.events() == []


async def test_async_twins_share_the_ledger(backend: Backend) -> None:
    reserved = await backend.acheck(CheckRequest("c", "code_exec", send_event=True))
    assert reserved.balance == 98
    await backend.atrack(TrackRequest("c", "code_exec", -1, idempotency_key="refund"))
    assert (await backend.acheck(CheckRequest("c", "web_search"))).balance == 100
    duplicate = await backend.atrack(TrackRequest("c", "code_exec", -1, idempotency_key="refund"))
    assert duplicate.duplicate
    await backend.aclose()


def test_entity_is_recorded_on_events(backend: Backend) -> None:
    backend.track(TrackRequest("c", "web_search", 1, idempotency_key="e1", entity_id="seat_7"))
    assert backend.events("c")[0].entity_id == "seat_7"
