"""Bad input (issue 12): each is an AgentMeterError raised before anything is written.

Each test reproduces one untyped error found by the fault campaign and failed before its
fix; the hypothesis test throws hostile values at every public entry point.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.errors import AgentMeterError, ConfigError, InvalidUsage, UsageLimitExceeded
from agent_meter.testing import MemoryBackend
from tests.conftest import PRICING_TOML, FakeClock

PRICING = Pricing.from_toml(PRICING_TOML)


@pytest.fixture(params=["sqlite", "memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return SQLiteBackend(tmp_path / "usage.db", pricing=PRICING)
    return MemoryBackend(pricing=PRICING)


def _untouched(backend: Any) -> None:
    assert backend.events() == []


def test_a_401_digit_number_of_units_is_invalid_usage(backend: Any) -> None:
    meter = Meter(backend, recover_on_start=False)
    with pytest.raises(InvalidUsage, match="units"):
        meter.guard("cus_1", "web_search", 10**400)
    with pytest.raises(InvalidUsage, match="units"):
        meter.track("cus_1", "web_search", -(10**400))
    _untouched(backend)


@pytest.mark.parametrize("where", ["call_id", "idempotency_key"])
def test_a_lone_surrogate_in_a_key_is_invalid_usage(backend: Any, where: str) -> None:
    meter = Meter(backend, recover_on_start=False)
    if where == "call_id":
        with pytest.raises(InvalidUsage, match=where):
            meter.guard("cus_1", "web_search", call_id="call\ud800")
    else:
        with pytest.raises(InvalidUsage, match=where):
            meter.track("cus_1", "web_search", 1, idempotency_key="key\udfff")
    _untouched(backend)


def test_a_lone_surrogate_in_a_customer_id_is_invalid_usage(backend: Any) -> None:
    meter = Meter(backend, recover_on_start=False)
    with pytest.raises(InvalidUsage, match="customer_id"):
        meter.track("cus\ud800", "web_search", 1)
    _untouched(backend)


def _circular() -> dict[str, Any]:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    return loop


@pytest.mark.parametrize(
    "properties",
    [_circular(), {("a", 1): 2}, {"x": math.nan}],
    ids=["circular", "tuple-key", "nan"],
)
def test_properties_that_cannot_be_stored_are_invalid_usage(
    backend: Any, properties: dict[Any, Any]
) -> None:
    meter = Meter(backend, recover_on_start=False)
    with pytest.raises(InvalidUsage, match="properties"):
        meter.track("cus_1", "web_search", 1, properties=properties)
    _untouched(backend)


@pytest.mark.parametrize("value", [1e30, 5e9])
def test_set_balance_beyond_the_ledger_is_invalid_usage(backend: Any, value: float) -> None:
    with pytest.raises(InvalidUsage, match=r"more than a ledger holds|at most"):
        backend.set_balance("cus_1", "credits", value)
    assert "cus_1" not in backend.customers()


def test_a_pricing_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "pricing.toml"
    path.write_bytes(PRICING_TOML.encode() + b"\n# \xff\xfe caf\xe9\n")
    with pytest.raises(ConfigError, match=r"pricing\.toml"):
        Pricing.from_file(path)


@pytest.mark.parametrize("now", [1e13, math.inf, -5.0])
def test_a_clock_a_ledger_cannot_date_is_a_config_error(tmp_path: Path, now: float) -> None:
    for backend in (
        SQLiteBackend(tmp_path / f"usage{now}.db", pricing=PRICING, clock=FakeClock(now)),
        MemoryBackend(pricing=PRICING, clock=FakeClock(now)),
    ):
        meter = Meter(backend, recover_on_start=False)
        with pytest.raises(ConfigError, match="clock"):
            meter.guard("cus_1", "web_search").__enter__()
        assert backend.customers() == []


def test_a_clock_at_the_end_of_the_calendar_still_bills(tmp_path: Path) -> None:
    backend = SQLiteBackend(
        tmp_path / "usage.db", pricing=PRICING, clock=FakeClock(253_402_000_000)
    )
    with Meter(backend, recover_on_start=False).guard("cus_1", "web_search"):
        pass
    assert backend.balances("cus_1")["credits"] == 99


def test_billing_an_impossible_count_fails_the_call_not_its_settlement(backend: Any) -> None:
    meter = Meter(backend, recover_on_start=False)
    with (
        pytest.raises(InvalidUsage, match="units"),
        meter.guard("cus_1", "web_search", 2, call_id="c1") as call,
    ):
        call.bill(1e300)
    assert backend.balances("cus_1")["credits"] == 100  # the estimate was given back
    assert backend.holds() == []


hostile = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**500), max_value=10**500),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=8),
    st.just("ok\ud800"),
    st.binary(max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(customer=hostile, units=hostile, key=hostile, properties=hostile)
def test_hostile_input_is_an_agent_meter_error_and_writes_nothing(
    customer: Any, units: Any, key: Any, properties: Any
) -> None:
    backend = MemoryBackend(pricing=PRICING)
    meter = Meter(backend, recover_on_start=False)
    for action in (
        lambda: meter.track(
            customer, "web_search", units, idempotency_key=key, properties=properties
        ),
        lambda: meter.guard(customer, "web_search", units, call_id=key).__enter__(),
        lambda: backend.set_balance(customer, "credits", units),
    ):
        before = (len(backend.events()), backend.customers())
        try:
            action()
        except UsageLimitExceeded:
            # valid input the balance cannot pay (an earlier action spent it): not bad
            # input; the refusal is kept for reports, and that is all that is written
            after = backend.events()
            assert len(after) == before[0] + 1
            assert after[-1].kind == "denied"
            assert backend.customers() == before[1]
        except AgentMeterError:
            assert (len(backend.events()), backend.customers()) == before


def test_billing_a_count_too_large_in_credits_fails_at_bill(backend: Any) -> None:
    """2**61 units is a valid count, but at 2 credits each more than a ledger holds."""
    meter = Meter(backend, recover_on_start=False)
    guard = meter.guard("cus_1", "code_exec", 2, call_id="c1")
    call = guard.__enter__()
    events = len(backend.events())
    with pytest.raises(InvalidUsage, match="more than a ledger can hold"):
        call.bill(2.0**61)
    assert len(backend.events()) == events  # nothing written by bill()
    guard.__exit__(None, None, None)  # the estimate stands: the block never billed more
    assert backend.balances("cus_1")["credits"] == 96
    assert backend.holds() == []
