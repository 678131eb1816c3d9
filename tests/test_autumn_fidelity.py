"""Fidelity: the embedded SQLite ledger must answer like the recorded Autumn server.

Each scenario drives a :class:`Meter` through the calls of one cassette, in the order of
its README table. It runs twice: over AutumnBackend replaying the cassette, and over
SQLiteBackend with the same pricing (100 credits, web_search 1, code_exec 2, llm_tokens
0.001, premium_tools boolean and not granted). Every step records what the caller sees
(allowed, balance, what was required, or the error raised); both runs must agree at
every step. Where they differ, the embedded backend is wrong: Autumn is the reference.

A few recorded numbers are also asserted outright, so a mistake common to both runs
(in the meter, say) cannot pass unnoticed.

One recorded behaviour is deliberately not copied: Autumn's v1 refund (a negative track)
never lifts a balance above the plan's grant (``refund_capped_at_grant``: 150, track 1,
refund 1, still 149; fact 16). The embedded ledgers refund exactly what a reservation
deducted, as Autumn's lock release does above the grant too (``lock_release_above_grant``,
covered below), so the ``reserve`` strategy on a balance above its grant is where SQLite
and Autumn part: SQLite gives the refund back, v1 Autumn drops it (and the backend logs it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import requests

from agent_meter import (
    AgentMeterError,
    CheckResult,
    Meter,
    SQLiteBackend,
    UsageLimitExceeded,
)
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import CheckRequest, FinalizeRequest, Hold, TrackRequest
from agent_meter.testing import MemoryBackend
from tests.autumn_helpers import PRICING, REPLAY_KEY, replay

Step = tuple[Any, ...]


@dataclass
class Run:
    """What a scenario gets: the meter, and the admin actions each backend does its way."""

    meter: Meter
    grant: Callable[[str, str], None]
    balances: Callable[[str], dict[str, float | bool]]
    steps: list[Step]

    def saw(self, label: str, result: CheckResult | None) -> None:
        if result is None:
            self.steps.append((label, "unverified"))
            return
        self.steps.append((label, result.allowed, _num(result.balance), _num(result.required)))

    def denied(self, label: str, error: UsageLimitExceeded) -> None:
        self.steps.append((label, "denied", _num(error.balance), _num(error.required)))

    def failed(self, label: str, error: AgentMeterError) -> None:
        self.steps.append((label, type(error).__name__))


def _num(value: float | None) -> float | None:
    return None if value is None else round(value, 9)


# -- scenarios: one per cassette, calls in the order of its README table ----------------


def check_allowed(run: Run) -> None:
    run.saw("check", run.meter.check("cus_check_allowed", "web_search"))


def track_success(run: Run) -> None:
    cus, m = "cus_track_success", run.meter
    run.saw("before", m.check(cus, "web_search"))
    track = m.track(cus, "web_search", 1, idempotency_key="call_1")
    run.steps.append(("track", track.duplicate))
    run.saw("after", m.check(cus, "web_search"))


def track_duplicate_idempotency(run: Run) -> None:
    cus, m = "cus_track_duplicate_idempotency", run.meter
    for label in ("first", "again"):
        track = m.track(cus, "web_search", 1, idempotency_key="dup_call_1")
        run.steps.append((label, track.duplicate))
    run.saw("after", m.check(cus, "web_search"))


def credit_conversion(run: Run) -> None:
    cus, m = "cus_credit_conversion", run.meter
    run.saw("5000 tokens", m.check(cus, "llm_tokens", 5000))
    run.saw("200000 tokens", m.check(cus, "llm_tokens", 200000))
    m.track(cus, "llm_tokens", 1234, idempotency_key="tokens_run_1")
    run.saw("after 1234 tokens", m.check(cus, "web_search"))


def check_denied_exhausted(run: Run) -> None:
    cus, m = "cus_check_denied_exhausted", run.meter
    m.track(cus, "code_exec", 50, idempotency_key="exhaust_1")
    try:
        with m.guard(cus, "web_search", strategy="check_then_track"):
            pytest.fail("an exhausted customer must be refused")
    except UsageLimitExceeded as exc:
        run.denied("guard", exc)


def reserve_then_refund(run: Run) -> None:
    cus, m = "cus_reserve_then_refund", run.meter
    failed = False
    try:
        with m.guard(cus, "code_exec", call_id="call_7") as call:
            run.saw("reserved", call.check)
            run.saw("during", m.check(cus, "web_search"))
            raise RuntimeError("the tool failed")
    except RuntimeError:
        failed = True  # re-raised by the guard after the refund
    assert failed
    run.saw("refunded", m.check(cus, "web_search"))


def reserve_until_denied(run: Run) -> None:
    cus, m = "cus_reserve_until_denied", run.meter
    for n in range(1, 52):
        try:
            with m.guard(cus, "code_exec", call_id=f"call_{n}") as call:
                run.saw(f"reserve {n}", call.check)
        except UsageLimitExceeded as exc:
            run.denied(f"reserve {n}", exc)


def track_over_balance(run: Run) -> None:
    cus, m = "cus_track_over_balance", run.meter
    run.saw("before", m.check(cus, "web_search"))
    m.track(cus, "web_search", 150, idempotency_key="over_1")
    run.saw("after", m.check(cus, "web_search"))


def feature_not_found(run: Run) -> None:
    cus, m = "cus_feature_not_found", run.meter
    try:
        m.check(cus, "no_such_feature")
    except AgentMeterError as exc:
        run.failed("check", exc)
    try:
        m.track(cus, "no_such_feature", 1, idempotency_key="nf_1")
    except AgentMeterError as exc:
        run.failed("track", exc)


def agent_run_session(run: Run) -> None:
    cus, m = "cus_agent_run_session", run.meter
    for step, feature in enumerate(("web_search", "code_exec"), start=1):
        with m.guard(cus, feature, call_id=f"run_1:{step}", strategy="check_then_track") as c:
            run.saw(feature, c.check)
    with m.guard(cus, "llm_tokens", 2000, call_id="run_1:3", strategy="check_then_track") as c:
        run.saw("llm_tokens", c.check)
        c.bill(1830)
    run.saw("end of run", m.check(cus, "web_search"))


def unknown_customer_autocreate(run: Run) -> None:
    cus = "cus_unknown_customer_autocreate"
    run.saw("first check", run.meter.check(cus, "web_search"))
    run.steps.append(("balances", run.balances(cus)))


def negative_and_fractional_values(run: Run) -> None:
    cus, m = "cus_negative_and_fractional_values", run.meter
    run.saw("start", m.check(cus, "web_search"))
    for feature, value in (("llm_tokens", 0), ("web_search", 2), ("llm_tokens", 2.5)):
        m.track(cus, feature, value, idempotency_key=f"nf_{value}")
        run.saw(f"after {value} {feature}", m.check(cus, "web_search"))
    m.track(cus, "web_search", -1, idempotency_key="nf_neg")
    run.saw("after refund", m.check(cus, "web_search"))
    run.saw("half a unit", m.check(cus, "web_search", 0.5))


def boolean_feature_gate(run: Run) -> None:
    cus, m = "cus_boolean_feature_gate", run.meter
    run.saw("not granted", m.check(cus, "premium_tools"))
    run.grant(cus, "premium_tools")
    run.saw("granted", m.check(cus, "premium_tools"))


def idempotency_key_scope(run: Run) -> None:
    # Backend level on purpose: the meter scopes keys per customer, so only a raw key can
    # show how the backend treats the same key for two customers.
    backend = run.meter.backend
    for cus in ("cus_idem_scope_a", "cus_idem_scope_b"):
        track = backend.track(TrackRequest(cus, "web_search", 1, idempotency_key="shared_key_1"))
        run.steps.append((cus, track.duplicate))
    for cus in ("cus_idem_scope_a", "cus_idem_scope_b"):
        run.saw(cus, backend.check(CheckRequest(cus, "web_search")))


SCENARIOS: dict[str, Callable[[Run], None]] = {
    f.__name__: f
    for f in (
        check_allowed,
        track_success,
        track_duplicate_idempotency,
        credit_conversion,
        check_denied_exhausted,
        reserve_then_refund,
        reserve_until_denied,
        track_over_balance,
        feature_not_found,
        agent_run_session,
        unknown_customer_autocreate,
        negative_and_fractional_values,
        boolean_feature_gate,
        idempotency_key_scope,
    )
}


def _autumn_grant(customer_id: str, feature_id: str) -> None:
    # autumn-py has no grant call; the cassette holds the raw v2 request the recording made.
    requests.post(
        "https://api.useautumn.com/v1/balances.create",
        json={"customer_id": customer_id, "feature_id": feature_id},
        timeout=5,
    ).raise_for_status()


def run_on_autumn(name: str) -> list[Step]:
    with replay().use_cassette(f"{name}.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        # the v1 cassettes record autumn-py's reserving check: strategy "reserve"
        run = Run(Meter(backend, strategy="reserve"), _autumn_grant, backend.balances, [])
        SCENARIOS[name](run)
        backend.close()
    assert cassette.all_played, f"{name}: the scenario did not make every recorded call"
    return run.steps


def run_on_sqlite(name: str, tmp_path: Path) -> list[Step]:
    backend = SQLiteBackend(tmp_path / f"{name}.db", pricing=PRICING)
    run = Run(
        Meter(backend),
        lambda cus, feature: backend.set_balance(cus, feature, True),
        backend.balances,
        [],
    )
    SCENARIOS[name](run)
    backend.close()
    return run.steps


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_sqlite_answers_like_autumn(name, tmp_path):
    autumn_steps = run_on_autumn(name)
    sqlite_steps = run_on_sqlite(name, tmp_path)
    assert autumn_steps, "the scenario recorded no step"
    assert sqlite_steps == autumn_steps


# -- the recorded numbers, asserted outright ---------------------------------------------


def test_recorded_numbers_come_through_the_meter():
    steps = dict((s[0], s[1:]) for s in run_on_autumn("credit_conversion"))
    assert steps["5000 tokens"] == (True, 100.0, 5.0)
    assert steps["200000 tokens"] == (False, 100.0, 200.0)
    assert steps["after 1234 tokens"] == (True, 98.766, 1.0)
    run = dict((s[0], s[1:]) for s in run_on_autumn("agent_run_session"))
    assert run["end of run"] == (True, 95.17, 1.0)
    refund = dict((s[0], s[1:]) for s in run_on_autumn("reserve_then_refund"))
    assert refund["reserved"] == (True, 98.0, 2.0)
    assert refund["refunded"] == (True, 100.0, 1.0)
    until = run_on_autumn("reserve_until_denied")
    assert until[49] == ("reserve 50", True, 0.0, 2.0)
    assert until[50] == ("reserve 51", "denied", 0.0, 2.0)


def test_fields_beyond_allowed_and_balance_agree(tmp_path):
    """usage and included_usage, where Autumn gives them, for the pool scenarios."""
    seen: dict[str, list[tuple[float | None, float | None, bool]]] = {}
    for label, backend in (
        ("autumn", AutumnBackend(REPLAY_KEY)),
        ("sqlite", SQLiteBackend(tmp_path / "fields.db", pricing=PRICING)),
    ):
        with replay().use_cassette("track_over_balance.yaml"):
            results = [backend.check(CheckRequest("cus_track_over_balance", "web_search"))]
            backend.track(
                TrackRequest("cus_track_over_balance", "web_search", 150, idempotency_key="over_1")
            )
            results.append(backend.check(CheckRequest("cus_track_over_balance", "web_search")))
        backend.close()
        seen[label] = [(r.usage, r.included_usage, r.unlimited) for r in results]
    assert seen["autumn"] == [(0.0, 100.0, False), (100.0, 100.0, False)]
    assert seen["sqlite"] == seen["autumn"]


# -- the async session, on both backends ---------------------------------------------------


async def _async_session(meter: Meter, steps: list[Step]) -> None:
    cus = "cus_async_check_track"
    before = await meter.acheck(cus, "web_search")
    track = await meter.atrack(cus, "web_search", 1, idempotency_key="async_call_1")
    after = await meter.acheck(cus, "web_search")
    steps += [
        ("before", before.allowed, before.balance),
        ("track", track.duplicate),
        ("after", after.allowed, after.balance),
    ]


async def _async_duplicate(meter: Meter, steps: list[Step]) -> None:
    cus = "cus_async_duplicate_idempotency"
    for label in ("first", "again"):
        track = await meter.atrack(cus, "code_exec", 1, idempotency_key="async_dup_1")
        steps.append((label, track.duplicate))
    check = await meter.acheck(cus, "code_exec")
    steps.append(("after", check.allowed, check.balance, check.required))


@pytest.mark.parametrize(
    ("cassette", "scenario"),
    [("async_check_track", _async_session), ("async_duplicate_idempotency", _async_duplicate)],
)
async def test_async_sessions_agree(
    cassette: str,
    scenario: Callable[[Meter, list[Step]], Awaitable[None]],
    tmp_path: Path,
) -> None:
    autumn_steps: list[Step] = []
    with replay().use_cassette(f"{cassette}.yaml") as recorded:
        meter = Meter(AutumnBackend(REPLAY_KEY), strategy="reserve")
        await scenario(meter, autumn_steps)
        await meter.aclose()
    assert recorded.all_played
    sqlite_steps: list[Step] = []
    meter = Meter(SQLiteBackend(tmp_path / "async.db", pricing=PRICING))
    await scenario(meter, sqlite_steps)
    await meter.aclose()
    assert autumn_steps[-1][1:3] == (True, 99.0 if cassette == "async_check_track" else 98.0)
    assert sqlite_steps == autumn_steps


# -- locks: the embedded ledgers lock and finalize as Autumn does ----------------------------
#
# Driven through the LockingBackend protocol (lock(hold), finalize(request)) that the meter's
# ``lock`` strategy uses, on AutumnBackend replaying a v2 cassette, SQLiteBackend and
# MemoryBackend. Every step records what the caller sees; all three must agree.


class _Locks:
    """One backend's lock, finalize, plain check and admin balance, as a scenario sees them."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        if kind == "autumn":
            self.backend: Any = AutumnBackend(REPLAY_KEY, max_retries=0, lock_expiry=None)
        elif kind == "sqlite":
            self.backend = SQLiteBackend(tmp_path / "locks.db", pricing=PRICING)
        else:
            self.backend = MemoryBackend(pricing=PRICING)
        self.steps: list[Step] = []

    def lock(self, label: str, lock_id: str, cus: str, feature: str, units: float) -> None:
        # units as the meter validates them: floats
        hold = Hold(lock_id, cus, feature, float(units), None, f"{lock_id}:r", "owner", 0.0, True)
        result = self.backend.lock(hold)
        self.steps.append((label, result.allowed, _num(result.balance), _num(result.required)))

    def finalize(self, label: str, request: FinalizeRequest) -> None:
        self.steps.append((label, self.backend.finalize(request)))

    def check(self, label: str, cus: str) -> None:
        if self.kind == "autumn":
            result = self.backend.locks.check(cus, "web_search")
        else:
            result = self.backend.check(CheckRequest(cus, "web_search"))
        self.steps.append((label, result.allowed, _num(result.balance), _num(result.required)))

    def set_credits(self, cus: str, credits: float) -> None:
        if self.kind == "autumn":
            self.backend.locks.ensure_customer(cus)
            httpx.post(  # Autumn's admin call, replayed from the cassette
                "https://api.useautumn.com/v1/balances.update",
                json={"customer_id": cus, "feature_id": "credits", "remaining": credits},
                timeout=5,
            ).raise_for_status()
        else:
            self.backend.set_balance(cus, "credits", credits)


def _finalize(
    lock_id: str,
    cus: str,
    feature: str,
    held: float,
    action: Literal["confirm", "release"],
    override: float | None = None,
) -> FinalizeRequest:
    value = None if override is None else float(override)
    return FinalizeRequest(lock_id, cus, feature, float(held), action, value)


def lock_until_denied(run: _Locks) -> None:
    cus = "cus_lock_until_denied"
    for n in range(1, 9):
        run.lock(f"lock {n}", f"lock_until_denied:{n}", cus, "code_exec", 7)
    for n in range(1, 9):
        request = _finalize(f"lock_until_denied:{n}", cus, "code_exec", 7, "release")
        run.finalize(f"release {n}", request)
    run.check("after", cus)


def lock_override_value(run: _Locks) -> None:
    cus = "cus_lock_override_value"
    run.lock("lock 5000 tokens", "lock_override_value:1", cus, "llm_tokens", 5000)
    request = _finalize("lock_override_value:1", cus, "llm_tokens", 5000, "confirm", 1234)
    run.finalize("confirm 1234", request)
    run.check("after", cus)


def lock_release_above_grant(run: _Locks) -> None:
    cus = "cus_lock_release_above_grant"
    run.set_credits(cus, 150)
    run.lock("lock a", "lock_release_above_grant:a", cus, "web_search", 5)
    run.finalize(
        "release a", _finalize("lock_release_above_grant:a", cus, "web_search", 5, "release")
    )
    run.check("after release", cus)
    run.lock("lock b", "lock_release_above_grant:b", cus, "code_exec", 5)
    request = _finalize("lock_release_above_grant:b", cus, "code_exec", 5, "confirm", 2)
    run.finalize("confirm 2 of 5", request)
    run.check("after confirm", cus)


LOCK_SCENARIOS: dict[str, Callable[[_Locks], None]] = {
    f.__name__: f for f in (lock_until_denied, lock_override_value, lock_release_above_grant)
}


def _lock_steps(kind: str, name: str, tmp_path: Path) -> list[Step]:
    run = _Locks(kind, tmp_path)
    if kind == "autumn":
        with replay(body=True).use_cassette(f"{name}.yaml") as cassette:
            LOCK_SCENARIOS[name](run)
        assert cassette.all_played, f"{name}: the scenario did not make every recorded call"
    else:
        LOCK_SCENARIOS[name](run)
    run.backend.close()
    return run.steps


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
@pytest.mark.parametrize("name", list(LOCK_SCENARIOS))
def test_embedded_locks_answer_like_autumn(name: str, kind: str, tmp_path: Path) -> None:
    autumn_steps = _lock_steps("autumn", name, tmp_path)
    assert _lock_steps(kind, name, tmp_path) == autumn_steps


def test_recorded_lock_numbers_come_through():
    until = dict((s[0], s[1:]) for s in _lock_steps("autumn", "lock_until_denied", Path()))
    assert until["lock 7"] == (True, 2.0, 14.0)
    assert until["lock 8"] == (False, 2.0, 14.0)
    assert until["release 8"] == (False,)  # a denied lock holds nothing
    assert until["after"] == (True, 100.0, 1.0)
    override = dict((s[0], s[1:]) for s in _lock_steps("autumn", "lock_override_value", Path()))
    assert override["after"] == (True, 98.766, 1.0)
    above = dict((s[0], s[1:]) for s in _lock_steps("autumn", "lock_release_above_grant", Path()))
    assert above["after release"] == (True, 150.0, 1.0)
    assert above["after confirm"] == (True, 146.0, 1.0)
