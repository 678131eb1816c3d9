"""Usage reports: the ledger's events folded per customer and feature, on both ledgers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from agent_meter import Meter, SQLiteBackend, TokenUsage, UsageEvent, UsageLimitExceeded
from agent_meter.report import (
    FeatureUsage,
    UsageReport,
    build_report,
    event_role,
    usage_report,
)
from agent_meter.testing import MemoryBackend

CUS = "cus_report"


def row_of(report: UsageReport, customer_id: str, feature_id: str) -> FeatureUsage:
    row = report.row(customer_id, feature_id)
    assert row is not None, (customer_id, feature_id)
    return row


def _spend(meter: Meter) -> None:
    """A mixed session whose every outcome the report must count (sync)."""
    for n in range(3):  # 3 searches billed, reserve strategy
        with meter.guard(CUS, "web_search", call_id=f"s{n}"):
            pass
    with pytest.raises(RuntimeError), meter.guard(CUS, "code_exec", call_id="c1"):
        raise RuntimeError("crash")  # reserved then refunded
    with meter.guard(CUS, "code_exec", call_id="c2", strategy="check_then_track"):
        pass  # one check_then_track track
    with meter.guard(CUS, "web_search", 5, call_id="batch") as call:
        call.bill(3)  # 5 reserved, 3 billed: an adjustment of -2, still one call
    meter.track_tokens(CUS, TokenUsage(1000, 234, 1234, model="m"), call_id="llm1")
    meter.track_tokens(CUS, TokenUsage(1000, 234, 1234, model="m"), call_id="llm1")  # dup
    meter.track("cus_other", "web_search", 2, idempotency_key="o1")


async def _aspend(meter: Meter) -> None:
    """The same session through the async twins."""
    for n in range(3):
        async with meter.aguard(CUS, "web_search", call_id=f"s{n}"):
            pass
    with pytest.raises(RuntimeError):
        async with meter.aguard(CUS, "code_exec", call_id="c1"):
            raise RuntimeError("crash")
    async with meter.aguard(CUS, "code_exec", call_id="c2", strategy="check_then_track"):
        pass
    async with meter.aguard(CUS, "web_search", 5, call_id="batch") as call:
        call.bill(3)
    await meter.atrack_tokens(CUS, TokenUsage(1000, 234, 1234, model="m"), call_id="llm1")
    await meter.atrack_tokens(CUS, TokenUsage(1000, 234, 1234, model="m"), call_id="llm1")
    await meter.atrack("cus_other", "web_search", 2, idempotency_key="o1")


def _assert_session(report: UsageReport, left: float) -> None:
    assert report.customers == ["cus_other", CUS]
    searches = row_of(report, CUS, "web_search")
    assert searches == FeatureUsage(CUS, "web_search", "credits", 6.0, 6.0, 4, 0, 0)
    code = row_of(report, CUS, "code_exec")
    assert code == FeatureUsage(CUS, "code_exec", "credits", 1.0, 2.0, 1, 1, 0)
    tokens = row_of(report, CUS, "llm_tokens")
    assert tokens == FeatureUsage(CUS, "llm_tokens", "credits", 1234.0, 1.234, 1, 0, 0)
    total = report.total(CUS)
    assert (total.credits, total.billed, total.refunded) == (9.234, 6, 1)
    assert total.units is None  # units of different features do not add up
    assert total.credits == round(100 - left, 9)  # the report agrees with the balance
    assert row_of(report, "cus_other", "web_search").billed == 1
    assert report.denials_recorded is True  # the embedded ledgers keep refusals


def test_report_counts_a_mixed_session(backend: MemoryBackend | SQLiteBackend) -> None:
    meter = Meter(backend)
    _spend(meter)
    report = usage_report(backend)
    _assert_session(report, backend.balances(CUS)["credits"])
    meter.close()


async def test_report_counts_a_mixed_async_session(
    backend: MemoryBackend | SQLiteBackend,
) -> None:
    meter = Meter(backend)
    await _aspend(meter)
    report = usage_report(backend)
    _assert_session(report, backend.balances(CUS)["credits"])
    await meter.aclose()


def test_a_denied_call_is_counted_and_costs_nothing(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    memory_backend.set_balance(CUS, "credits", 1)
    with pytest.raises(UsageLimitExceeded), meter.guard(CUS, "code_exec"):
        pass
    row = row_of(usage_report(memory_backend), CUS, "code_exec")
    assert row is not None
    assert (row.billed, row.refunded, row.denied, row.credits) == (0, 0, 1, 0)
    memory_backend.set_balance(CUS, "credits", 2)
    with meter.guard(CUS, "code_exec"):
        pass
    row = row_of(usage_report(memory_backend), CUS, "code_exec")
    assert row is not None
    assert (row.billed, row.denied, row.credits) == (1, 1, 2)


def test_a_ledger_without_denial_events_says_denials_are_unknown() -> None:
    report = build_report([_event("reserve", 1, -1, "am1:cus_report::web_search:a:hold")])
    row = row_of(report, CUS, "web_search")
    assert row is not None
    assert (row.billed, row.denied) == (1, None)  # None, not a misleading 0


def _event(kind: str, value: float, applied: float, key: str | None, feature: str = "web_search"):
    return UsageEvent(1.0, CUS, None, feature, "credits", kind, value, abs(value), applied, key)


def test_denied_events_are_counted_when_the_ledger_records_them() -> None:
    events = [
        _event("reserve", 1, -1, "am1:cus_report::web_search:a:hold"),
        _event("denied", 1, 0, None),
        _event("denied", 1, 0, None),
        _event("reserve", 1, -2, "am1:cus_report::code_exec:b:hold", "code_exec"),
    ]
    report = build_report(events)
    assert report.denials_recorded
    assert row_of(report, CUS, "web_search").denied == 2
    assert row_of(report, CUS, "web_search").units == 1  # a denial charges nothing
    assert row_of(report, CUS, "code_exec").denied == 0  # known to be 0 now
    assert report.total(CUS).denied == 2
    console = Console(record=True, width=120)
    console.print(report.table())
    text = console.export_text()
    assert "this ledger does not record denied calls" not in text


def test_event_roles_follow_kind_key_and_sign() -> None:
    assert event_role(_event("reserve", 1, -1, "k:hold")) == "reserve"
    assert event_role(_event("track", -1, 1, "am1:c::f:x:refund")) == "refund"
    assert event_role(_event("track", -2, 2, "am1:c::f:x:adjust")) == "adjust"
    assert event_role(_event("track", 2, -2, "am1:c::f:x:adjust")) == "adjust"
    assert event_role(_event("track", 3, -3, "am1:c::f:x:track")) == "track"
    assert event_role(_event("track", -3, 3, "by-hand")) == "refund"
    assert event_role(_event("denied", 1, 0, None)) == "denied"


def test_a_refund_by_hand_does_not_unbill_a_call() -> None:
    events = [
        _event("track", 2, -2, "am1:cus_report::web_search:x:track"),
        _event("track", -1, 1, "goodwill"),
    ]
    row = row_of(build_report(events), CUS, "web_search")
    assert (row.units, row.credits, row.billed, row.refunded) == (1, 1, 1, 1)


def test_capped_tracks_report_what_the_balance_lost(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    memory_backend.set_balance(CUS, "credits", 1.5)
    meter.track(CUS, "code_exec", 1, idempotency_key="t1")  # costs 2, capped at 1.5
    row = row_of(usage_report(memory_backend), CUS, "code_exec")
    assert (row.units, row.credits) == (1, 1.5)


def test_to_dict_is_json_and_matches_the_rows(sqlite_backend: SQLiteBackend) -> None:
    meter = Meter(sqlite_backend)
    _spend(meter)
    report = usage_report(sqlite_backend)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["rows"] == [row.to_dict() for row in report.rows]
    assert data["customers"][CUS]["credits"] == 9.234
    assert data["events"] == len(sqlite_backend.events())
    meter.close()


def test_filters_and_progress(sqlite_backend: SQLiteBackend) -> None:
    meter = Meter(sqlite_backend)
    _spend(meter)
    seen: list[str] = []
    only = usage_report(sqlite_backend, [CUS], feature_id="web_search", progress=seen.append)
    assert seen == [CUS]
    assert [(r.customer_id, r.feature_id) for r in only.rows] == [(CUS, "web_search")]
    later = sqlite_backend.events()[-1].at + 1
    assert usage_report(sqlite_backend, since=later).rows == ()
    everyone: list[str] = []
    usage_report(sqlite_backend, progress=everyone.append)
    assert everyone == ["cus_other", CUS]
    meter.close()


def test_the_table_shows_each_customer_with_a_total(tmp_path: Path, pricing) -> None:
    backend = SQLiteBackend(tmp_path / "t.db", pricing=pricing)
    meter = Meter(backend)
    _spend(meter)
    console = Console(record=True, width=120)
    console.print(usage_report(backend).table())
    text = console.export_text()
    assert "9.234 credits" in text
    assert "total" in text
    assert "this ledger does not record denied calls" not in text  # the ledger records them
    meter.close()
