"""Idempotency keys: deterministic, and never shared by two different calls."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent_meter.keys import idempotency_key

part = st.text(min_size=1, max_size=40)


def test_keys_are_readable_and_deterministic() -> None:
    key = idempotency_key("cus_1", "web_search", "call_42", "track")
    assert key == "am1:cus_1::web_search:call_42:track"
    assert key == idempotency_key("cus_1", "web_search", "call_42", "track")


def test_separators_inside_ids_cannot_forge_another_call() -> None:
    assert idempotency_key("a:b", "c", "x", "track") != idempotency_key("a", "b:c", "x", "track")


def test_long_keys_are_hashed_below_the_limit() -> None:
    key = idempotency_key("cus_" + "x" * 300, "web_search", "call", "track")
    assert len(key) <= 200
    assert key != idempotency_key("cus_" + "x" * 299 + "y", "web_search", "call", "track")


@given(a=st.tuples(part, part, part, part), b=st.tuples(part, part, part, part))
def test_different_calls_get_different_keys(
    a: tuple[str, str, str, str], b: tuple[str, str, str, str]
) -> None:
    if a != b:
        assert idempotency_key(*a) != idempotency_key(*b)
