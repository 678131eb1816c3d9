"""Property tests: any value or id either works or raises InvalidUsage, writing nothing."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent_meter import InvalidUsage, Meter, Pricing, UsageLimitExceeded
from agent_meter.testing import MemoryBackend
from tests.conftest import PRICING_TOML

PRICING = Pricing.from_toml(PRICING_TOML)

values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
)
ids = st.one_of(st.text(max_size=300), st.none(), st.integers())


def _valid_id(value: object) -> bool:
    return (
        isinstance(value, str) and bool(value.strip()) and len(value) <= 256 and value.isprintable()
    )


@settings(max_examples=300, deadline=None)
@given(customer=ids, value=values)
def test_track_accepts_exactly_the_valid_inputs(customer: object, value: object) -> None:
    backend = MemoryBackend(pricing=PRICING)
    meter = Meter(backend)
    valid_value = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) * 0.001 * 10**9 < 2**62  # what a ledger can hold
    )
    try:
        meter.track(customer, "llm_tokens", value, idempotency_key="k")  # type: ignore[arg-type]
    except InvalidUsage:
        assert not (valid_value and _valid_id(customer))
        assert backend.events() == []
        assert backend.customers() == []
    else:
        assert valid_value
        assert _valid_id(customer)
        assert len(backend.events()) == 1


@settings(max_examples=200, deadline=None)
@given(units=values)
def test_guard_refuses_bad_units_before_any_call(units: object) -> None:
    backend = MemoryBackend(pricing=PRICING)
    meter = Meter(backend)
    try:
        with meter.guard("cus_1", "web_search", units=units):  # type: ignore[arg-type]
            pass
    except InvalidUsage:
        assert backend.events() == []
        malformed = (
            not isinstance(units, (int, float))
            or isinstance(units, bool)
            or not math.isfinite(units)
            or units < 0
        )
        if malformed:
            assert backend.calls == []  # refused by the meter, before any backend call
        else:
            assert isinstance(units, (int, float))
            assert units * 10**9 >= 2**62  # refused by the ledger: too large to hold
    except UsageLimitExceeded:  # a denial is fine for batches larger than the balance
        assert units > 100  # type: ignore[operator]
        assert backend.balances("cus_1")["credits"] == 100
    else:
        expected = 100 - float(units)  # type: ignore[arg-type]
        assert backend.balances("cus_1")["credits"] == pytest.approx(expected, abs=1e-9)
