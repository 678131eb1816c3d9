"""Autumn as it really behaves on v1: fail-open 202s, keyed reserves, refunds capped at the grant.

Facts 13, 15 and 16 of the cassettes' README, replayed offline (``check_failopen_202``,
``reserve_key_after_failopen``, ``reserve_idempotency_header``, ``refund_capped_at_grant``),
and the same behaviours against local fault servers where a cassette cannot show them
(retries, headers, the async transport).
"""

from __future__ import annotations

import logging

import pytest
import requests

from agent_meter import BackendUnavailable, ConfigError
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import CheckRequest, TrackRequest
from tests.autumn_helpers import (
    REPLAY_KEY,
    SECRET,
    FaultServer,
    Reply,
    check_ok,
    error_body,
    replay,
)

FAILOPEN = {
    "allowed": True,
    "code": "feature_found",
    "customer_id": "cus_fault",
    "feature_id": "code_exec",
    "required_balance": 1,
}
DUPLICATE = error_body(
    "duplicate_idempotency_key", "Another request with idempotency key k has already been received"
)


def _customer(backend: AutumnBackend, customer_id: str) -> float:
    return float(backend.balances(customer_id)["credits"])


# -- fact 13: a 202 is the backend not answering ------------------------------------------


def test_a_failopen_202_reserve_is_no_reservation_and_deducts_nothing():
    with replay(body=True).use_cassette("check_failopen_202.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY, max_retries=0)
        cus = "cus_check_failopen_202"
        first = backend.check(CheckRequest(cus, "code_exec"))
        with pytest.raises(BackendUnavailable, match="202") as info:
            backend.check(CheckRequest(cus, "code_exec", send_event=True))
        after = backend.check(CheckRequest(cus, "code_exec"))
        credits = _customer(backend, cus)
        real = backend.check(CheckRequest(cus, "code_exec", send_event=True))
        backend.close()
    assert cassette.all_played
    assert first.balance == 100.0
    assert info.value.maybe_applied is False  # nothing was deducted: never refunded
    assert (after.balance, credits) == (100.0, 100.0)
    assert (real.allowed, real.deducted, real.balance) == (True, True, 98.0)


def test_a_failopen_answer_is_recognised_by_its_shape_when_the_status_is_hidden():
    from agent_meter.backends.autumn import _check_call, _failed_open  # noqa: PLC0415

    reserve = _check_call("cus_1", "code_exec", 1, True, None)
    assert _failed_open(reserve, None, FAILOPEN)
    assert not _failed_open(reserve, 200, check_ok(98))
    granted_flag = {"allowed": True, "feature_id": "premium_tools", "balance": 0}
    assert not _failed_open(reserve, 200, granted_flag)
    denied_flag = {"allowed": False, "feature_id": "premium_tools", "required_balance": 1}
    assert not _failed_open(reserve, 200, denied_flag)


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_plain_check_answered_202_is_unavailable_not_allowed(asynchronous):
    with FaultServer([Reply(202, FAILOPEN)]) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, max_retries=1, backoff=0)
        if asynchronous:
            with pytest.raises(BackendUnavailable, match="failed open"):
                await backend.acheck(CheckRequest("cus_fault", "code_exec"))
        else:
            with pytest.raises(BackendUnavailable, match="failed open"):
                backend.check(CheckRequest("cus_fault", "code_exec"))
        await backend.aclose()
    assert len(server.requests) == 2  # retried once: a 202 deducted nothing


# -- fact 15: keyed reserves ---------------------------------------------------------------


def test_a_keyed_reserve_sent_twice_deducts_once():
    key = "reserve_idempotency_header:call_1"
    with replay(body=True).use_cassette("reserve_idempotency_header.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY, max_retries=0)
        cus = "cus_reserve_idempotency_header"
        backend.check(CheckRequest(cus, "code_exec"))
        first = backend.check(CheckRequest(cus, "code_exec", send_event=True, idempotency_key=key))
        with pytest.raises(BackendUnavailable, match="already received") as info:
            backend.check(CheckRequest(cus, "code_exec", send_event=True, idempotency_key=key))
        credits = _customer(backend, cus)
        backend.close()
    assert cassette.all_played
    sent = [r.headers.get("Idempotency-Key") for r in cassette.requests]
    assert sent[1:3] == [key, key]
    assert (first.allowed, first.deducted, first.balance) == (True, True, 98.0)
    assert info.value.maybe_applied is True  # 409 says "received", not "deducted"
    assert credits == 98.0


def test_a_202_keeps_its_key_so_a_409_after_it_is_not_a_deduction():
    key = "reserve_key_after_failopen:call_1"
    with replay(body=True).use_cassette("reserve_key_after_failopen.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY, max_retries=0)
        cus = "cus_reserve_key_after_failopen"
        backend.check(CheckRequest(cus, "web_search"))
        with pytest.raises(BackendUnavailable, match="202") as failed_open:
            backend.check(CheckRequest(cus, "web_search", send_event=True, idempotency_key=key))
        with pytest.raises(BackendUnavailable) as duplicate:
            backend.check(CheckRequest(cus, "web_search", send_event=True, idempotency_key=key))
        credits = _customer(backend, cus)
        backend.close()
    assert cassette.all_played
    assert failed_open.value.maybe_applied is False
    assert duplicate.value.maybe_applied is True
    assert credits == 100.0  # nothing was ever deducted


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_keyed_reserve_carries_the_header_and_retries_a_202_with_a_fresh_key(
    asynchronous,
):
    replies = [Reply(202, FAILOPEN), Reply(200, check_ok(98, required=2))]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, backoff=0)
        request = CheckRequest(
            "cus_fault",
            "code_exec",
            send_event=True,
            idempotency_key="am1:cus_fault::code_exec:c1:hold",
        )
        if asynchronous:
            result = await backend.acheck(request)
        else:
            result = backend.check(request)
        await backend.aclose()
    keys = [seen.headers.get("Idempotency-Key") for seen in server.requests]
    assert keys[0] == "am1:cus_fault::code_exec:c1:hold"
    assert keys[1] is not None
    assert keys[1] != keys[0]  # the 202 used the first key up
    assert (result.allowed, result.deducted, result.balance) == (True, True, 98.0)


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_a_keyed_reserve_whose_answer_was_lost_is_retried_with_the_same_key(asynchronous):
    replies = [Reply(502, error_body("bad_gateway", "x")), Reply(200, check_ok(98, required=2))]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, backoff=0)
        request = CheckRequest("cus_fault", "code_exec", send_event=True, idempotency_key="k-lost")
        if asynchronous:
            result = await backend.acheck(request)
        else:
            result = backend.check(request)
        await backend.aclose()
    assert [seen.headers.get("Idempotency-Key") for seen in server.requests] == ["k-lost"] * 2
    assert result.deducted


def test_an_unkeyed_reserve_is_still_not_retried_after_a_502():
    replies = [Reply(502, error_body("bad_gateway", "x")), Reply(200, check_ok(98))]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, backoff=0)
        with pytest.raises(BackendUnavailable) as info:
            backend.check(CheckRequest("cus_fault", "code_exec", send_event=True))
        backend.close()
    assert len(server.requests) == 1
    assert info.value.maybe_applied is True
    assert "Idempotency-Key" not in server.requests[0].headers


def test_a_409_on_the_retry_of_a_keyed_reserve_leaves_it_in_doubt():
    replies = [Reply(504, error_body("timeout", "x")), Reply(409, DUPLICATE)]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, backoff=0)
        with pytest.raises(BackendUnavailable, match="whether it deducted is unknown") as info:
            backend.check(
                CheckRequest("cus_fault", "code_exec", send_event=True, idempotency_key="k")
            )
        backend.close()
    assert info.value.maybe_applied is True


def test_a_reserve_lost_after_a_fail_open_answer_names_the_fresh_key_in_doubt():
    """The 202 was an answer (nothing deducted): only the retry under a fresh key is in
    doubt, so that is the key to void, not the reserve's first one (which 409s for ever)."""
    replies = [Reply(202, FAILOPEN), Reply(200, check_ok(98), hang=2)]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=0.3, backoff=0)
        with pytest.raises(BackendUnavailable) as info:
            backend.check(
                CheckRequest("cus_fault", "code_exec", send_event=True, idempotency_key="k")
            )
        backend.close()
    sent = [seen.headers.get("Idempotency-Key") for seen in server.requests]
    assert sent[:2] == ["k", "k:fo1"]
    assert info.value.maybe_applied is True
    assert info.value.reserve_key == sent[-1]


# -- fact 16: refunds stop at the grant ------------------------------------------------------


def test_a_refund_above_the_grant_is_answered_200_but_dropped_and_logged(caplog):
    cus = "cus_refund_capped_at_grant"
    v2 = {"x-api-version": "2.3.0", "authorization": f"Bearer {REPLAY_KEY}"}
    with replay().use_cassette("refund_capped_at_grant.yaml") as cassette:
        base = "https://api.useautumn.com/v1"
        requests.post(
            f"{base}/customers.get_or_create", json={"customer_id": cus}, headers=v2, timeout=5
        )
        requests.post(
            f"{base}/balances.update",
            json={"customer_id": cus, "feature_id": "credits", "remaining": 150},
            headers=v2,
            timeout=5,
        )
        backend = AutumnBackend(REPLAY_KEY, max_retries=0)
        start = _customer(backend, cus)
        backend.track(TrackRequest(cus, "web_search", 1, "refund_capped_at_grant:use_1"))
        used = _customer(backend, cus)
        backend._above_grant[cus] = used > 100  # what a check answer would have shown
        with caplog.at_level(logging.WARNING, logger="agent_meter.autumn"):
            refund = backend.track(
                TrackRequest(cus, "web_search", -1, "refund_capped_at_grant:refund_1")
            )
        after = _customer(backend, cus)
        backend.close()
    assert cassette.all_played
    assert (start, used, after) == (150.0, 149.0, 149.0)  # the refund was dropped
    assert refund.duplicate is False  # Autumn said 200 all the same
    assert "caps refunds at the grant" in caplog.text


def test_the_above_grant_flag_comes_from_check_answers():
    above = check_ok(150) | {"included_usage": 100}
    with FaultServer([Reply(200, above)]) as server:
        backend = AutumnBackend(SECRET, base_url=server.url)
        backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()
    assert backend._above_grant == {"cus_fault": True}


# -- environment -------------------------------------------------------------------------------


def test_key_and_base_url_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUTUMN_SECRET_KEY", SECRET)
    monkeypatch.setenv("AUTUMN_BASE_URL", "http://127.0.0.1:9/")
    backend = AutumnBackend()
    assert backend.base_url == "http://127.0.0.1:9"
    assert backend.locks.base_url == "http://127.0.0.1:9"
    assert SECRET not in repr(backend)
    explicit = AutumnBackend(base_url="http://127.0.0.1:8")
    assert explicit.base_url == "http://127.0.0.1:8"


def test_without_the_environment_the_default_server_is_autumns(monkeypatch):
    monkeypatch.delenv("AUTUMN_BASE_URL", raising=False)
    assert AutumnBackend(SECRET).base_url == "https://api.useautumn.com"


@pytest.mark.parametrize("expiry", [0, -1, 86_400, 90_000])
def test_lock_expiry_is_bounded_by_autumns_one_day(expiry):
    with pytest.raises(ConfigError, match="one day"):
        AutumnBackend(SECRET, lock_expiry=expiry)
