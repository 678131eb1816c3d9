"""Autumn's v2 lock → finalize routes (AutumnBackend.locks), replayed from recordings.

Facts 11, 14, 17, 18 and 19 of the cassettes' README: a lock holds the whole amount,
confirm charges it or ``override_value`` in the feature's units, release returns it
exactly (above the grant too), a lock id is unique, a lock finalizes once, a v2 check never
creates a customer, a fail-open lock makes no lock, and what an expired lock leaves.
Bodies are matched where the recording allows, which proves our plain-HTTP requests are
the ones autumn-sdk sent.
"""

from __future__ import annotations

import httpx
import pytest

from agent_meter import BackendError, BackendUnavailable, CustomerNotFound
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.backends.autumn_locks import _lock_call, _lock_result
from agent_meter.engine import FinalizeRequest, Hold
from tests.autumn_helpers import REPLAY_KEY, SECRET, FaultServer, Reply, error_body, replay


def _backend(**options: object) -> AutumnBackend:
    return AutumnBackend(REPLAY_KEY, max_retries=0, lock_expiry=None, **options)  # type: ignore[arg-type]


def _remaining(backend: AutumnBackend, customer_id: str) -> float | None:
    return backend.locks.check(customer_id, "web_search").balance


def _hold(lock_id: str, customer_id: str, feature_id: str, units: float) -> Hold:
    return Hold(lock_id, customer_id, feature_id, units, None, f"{lock_id}:refund", "o", 0.0)


def _finalize(
    lock_id: str, action: str, override: float | None = None, held: float = 1
) -> FinalizeRequest:
    return FinalizeRequest(lock_id, "cus", "f", held, action, override)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("cassette", "action", "override", "after"),
    [
        ("lock_confirm", "confirm", 1234, 98.766),
        ("lock_release", "release", None, 100.0),
    ],
)
def test_a_lock_holds_then_confirm_or_release_settles_it(cassette, action, override, after):
    cus, lock_id = f"cus_{cassette}", f"{cassette}_1"
    with replay(body=True).use_cassette(f"{cassette}.yaml") as played:
        backend = _backend()
        held = backend.lock(_hold(lock_id, cus, "llm_tokens", 5000))
        during = _remaining(backend, cus)
        done = backend.finalize(_finalize(lock_id, action, override, held=5000))
        final = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert (held.allowed, held.deducted, held.balance, held.required) == (True, True, 95.0, 5.0)
    assert (held.balance_feature_id, held.included_usage) == ("credits", 100.0)
    assert (during, done) == (95.0, True)
    assert final == pytest.approx(after)


async def test_the_async_twins_lock_and_confirm():
    cus, lock_id = "cus_lock_override_value", "lock_override_value:1"
    with replay(body=True).use_cassette("lock_override_value.yaml") as played:
        backend = _backend()
        held = await backend.alock(_hold(lock_id, cus, "llm_tokens", 5000))
        done = await backend.afinalize(_finalize(lock_id, "confirm", 1234, held=5000))
        final = _remaining(backend, cus)
        await backend.aclose()
    assert played.all_played
    assert (held.deducted, held.balance, done) == (True, 95.0, True)
    assert final == pytest.approx(98.766)  # override_value is in the feature's units


def test_a_lock_id_is_unique_and_its_reuse_holds_nothing_more():
    cus, lock_id = "cus_lock_id_reuse", "lock_id_reuse:1"
    with replay(body=True).use_cassette("lock_id_reuse.yaml") as played:
        backend = _backend()
        first = backend.lock(_hold(lock_id, cus, "web_search", 1))
        with pytest.raises(BackendError, match="used before"):
            backend.lock(_hold(lock_id, cus, "web_search", 1))
        during = _remaining(backend, cus)
        released = backend.finalize(_finalize(lock_id, "release"))
        final = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert (first.balance, during, released, final) == (99.0, 99.0, True, 100.0)


def test_a_lock_finalizes_once():
    cus, lock_id = "cus_lock_finalize_twice", "lock_finalize_twice:1"
    with replay(body=True).use_cassette("lock_finalize_twice.yaml") as played:
        backend = _backend()
        held = backend.lock(_hold(lock_id, cus, "code_exec", 1))
        first = backend.finalize(_finalize(lock_id, "confirm"))
        second = backend.finalize(_finalize(lock_id, "confirm"))
        final = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert (held.balance, first, second, final) == (98.0, True, False, 98.0)


def test_locks_until_denied_then_every_release_restores_the_balance():
    cus = "cus_lock_until_denied"
    with replay(body=True).use_cassette("lock_until_denied.yaml") as played:
        backend = _backend()
        answers = [
            backend.lock(_hold(f"lock_until_denied:{n}", cus, "code_exec", 7)) for n in range(1, 9)
        ]
        released = [
            backend.finalize(_finalize(f"lock_until_denied:{n}", "release", held=7))
            for n in range(1, 9)
        ]
        final = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert [a.balance for a in answers] == [86.0, 72.0, 58.0, 44.0, 30.0, 16.0, 2.0, 2.0]
    assert [a.allowed for a in answers] == [True] * 7 + [False]
    assert [a.deducted for a in answers] == [True] * 7 + [False]
    assert released == [True] * 7 + [False]  # a denied lock leaves nothing to release
    assert final == 100.0


def test_release_and_override_confirm_give_back_above_the_grant():
    cus = "cus_lock_release_above_grant"
    with replay(body=True).use_cassette("lock_release_above_grant.yaml") as played:
        backend = _backend()
        backend.locks.ensure_customer(cus)
        httpx.post(  # the admin call that sets 150 over a grant of 100
            "https://api.useautumn.com/v1/balances.update",
            json={"customer_id": cus, "feature_id": "credits", "remaining": 150},
            headers={"authorization": f"Bearer {REPLAY_KEY}", "x-api-version": "2.3.0"},
        )
        a = backend.lock(_hold("lock_release_above_grant:a", cus, "web_search", 5))
        backend.finalize(_finalize("lock_release_above_grant:a", "release", held=5))
        after_release = _remaining(backend, cus)
        b = backend.lock(_hold("lock_release_above_grant:b", cus, "code_exec", 5))
        backend.finalize(_finalize("lock_release_above_grant:b", "confirm", 2, held=5))
        after_confirm = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert (a.balance, after_release) == (145.0, 150.0)  # a refund would have stopped at 100
    assert (b.balance, after_confirm) == (140.0, 146.0)


def test_a_failopen_lock_makes_no_lock_and_a_failopen_finalize_is_queued_by_autumn():
    cus, lock_id = "cus_lock_failopen_202", "lock_failopen_202:1"
    with replay(body=True).use_cassette("lock_failopen_202.yaml") as played:
        backend = _backend()
        with pytest.raises(BackendUnavailable, match="failed open") as info:
            backend.lock(_hold(lock_id, cus, "code_exec", 1))
        queued = backend.finalize(_finalize(lock_id, "confirm"))
        later = backend.finalize(_finalize(lock_id, "confirm"))
        final = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert info.value.maybe_applied is False  # no lock: nothing to release, never refunded
    assert (queued, later, final) == (True, False, 100.0)


def test_a_lock_without_expiry_whose_receipt_expired_stays_charged():
    cus, lock_id = "cus_lock_receipt_expired", "lock_receipt_expired:1"
    with replay(body=True).use_cassette("lock_receipt_expired.yaml") as played:
        backend = _backend()
        held = backend.lock(_hold(lock_id, cus, "code_exec", 2))
        released = backend.finalize(_finalize(lock_id, "release", held=2))
        final = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert (held.balance, released, final) == (96.0, False, 96.0)


def test_an_expired_lock_was_released_and_a_late_confirm_finds_nothing():
    cus, lock_id = "cus_lock_expired_released", "lock_expired_released:1"
    with replay().use_cassette("lock_expired_released.yaml") as played:
        backend = AutumnBackend(REPLAY_KEY, max_retries=0, lock_expiry=60)
        held = backend.lock(_hold(lock_id, cus, "code_exec", 2))
        after_expiry = _remaining(backend, cus)
        late = backend.finalize(_finalize(lock_id, "confirm", held=2))
        backend.close()
    assert played.all_played
    sent = played.requests[1].body
    assert b'"expires_at"' in (sent if isinstance(sent, bytes) else sent.encode())
    assert (held.balance, after_expiry, late) == (96.0, 100.0, False)


def test_an_expiry_is_sent_in_unix_milliseconds_within_a_day():
    call = _lock_call("cus_1", "web_search", 1, "l1", 1_796_153_329.031, None)
    assert call.body["lock"] == {"lock_id": "l1", "enabled": True, "expires_at": 1796153329031}


def test_v2_checks_never_create_customers():
    cus = "cus_v2_check_unknown_customer"
    with replay(body=True).use_cassette("v2_check_unknown_customer.yaml") as played:
        backend = _backend()
        with pytest.raises(CustomerNotFound):
            backend.locks.check(cus, "web_search")
        call = _lock_call(cus, "code_exec", 1, "v2_check_unknown_customer:1", None, None)
        with pytest.raises(CustomerNotFound):
            _lock_result(call, 1, *backend.locks._send(call), None)
        backend.close()
    assert played.all_played


def test_get_or_create_comes_first_once_and_shows_the_hold():
    cus, lock_id = "cus_v2_get_or_create", "v2_get_or_create:1"
    with replay(body=True).use_cassette("v2_get_or_create.yaml") as played:
        backend = _backend()
        held = backend.lock(_hold(lock_id, cus, "web_search", 3))  # get_or_create, then lock
        seen = backend.locks.customer(cus)
        done = backend.finalize(_finalize(lock_id, "confirm", held=3))
        backend.close()
    assert played.all_played
    assert held.balance == 97.0
    assert seen["balances"]["credits"]["remaining"] == 97
    assert done is True


def test_a_v2_track_keyed_by_header_counts_once():
    cus, key = "cus_v2_track_idempotency_header", "v2_track_idempotency_header:call_1"
    with replay(body=True).use_cassette("v2_track_idempotency_header.yaml") as played:
        backend = _backend()
        backend.locks.ensure_customer(cus)
        first = backend.locks.track(cus, "web_search", 1, idempotency_key=key)
        again = backend.locks.track(cus, "web_search", 1, idempotency_key=key)
        final = _remaining(backend, cus)
        backend.close()
    assert played.all_played
    assert [r.headers.get("Idempotency-Key") for r in played.requests[1:3]] == [key, key]
    assert (first, again, final) == (True, False, 99.0)


# -- what a recording cannot show: lost answers, retries, the key -----------------------

LOCKED = {
    "allowed": True,
    "customer_id": "cus_fault",
    "required_balance": 2,
    "balance": {"feature_id": "credits", "granted": 100, "remaining": 98, "usage": 2},
}
CUSTOMER = {"id": "cus_fault", "balances": {}}


def test_a_lock_whose_answer_was_lost_is_retried_and_a_409_means_it_holds():
    exists = error_body("lock_already_exists", "A lock with this ID already exists")
    replies = [Reply(200, CUSTOMER), Reply(504, error_body("t", "x")), Reply(409, exists)]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, backoff=0)
        held = backend.lock(_hold("cus_fault:l1", "cus_fault", "code_exec", 1))
        backend.close()
    assert (held.allowed, held.deducted) == (True, True)
    locks = [(seen.body or {})["lock"]["lock_id"] for seen in server.requests[1:]]
    assert locks == ["cus_fault:l1", "cus_fault:l1"]  # the same id: never two holds


def test_a_failopen_lock_is_retried_and_its_real_answer_used():
    failopen = {"allowed": True, "customer_id": "cus_fault", "balance": None, "flag": None}
    replies = [Reply(200, CUSTOMER), Reply(202, failopen), Reply(200, LOCKED)]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, backoff=0)
        held = backend.lock(_hold("cus_fault:l2", "cus_fault", "code_exec", 1))
        backend.close()
    assert (held.deducted, held.balance) == (True, 98.0)
    headers = server.requests[1].headers
    assert headers["x-api-version"] == "2.3.0"
    assert headers["authorization"] == f"Bearer {SECRET}"


def test_an_unreachable_lock_may_stand_and_never_shows_the_key():
    replies = [Reply(200, CUSTOMER), Reply(200, LOCKED, hang=2)]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=0.2, max_retries=1, backoff=0)
        with pytest.raises(BackendUnavailable) as info:
            backend.lock(_hold("cus_fault:l3", "cus_fault", "code_exec", 1))
        backend.close()
    assert info.value.maybe_applied is True  # release the id to be sure
    from tests.autumn_helpers import exception_texts  # noqa: PLC0415

    assert SECRET not in exception_texts(info.value)
    assert SECRET[:12] not in exception_texts(info.value)


def test_the_customer_is_created_once_per_process():
    replies = [Reply(200, CUSTOMER), Reply(200, LOCKED)]
    with FaultServer(replies) as server:
        backend = AutumnBackend(SECRET, base_url=server.url)
        for n in range(3):
            backend.lock(_hold(f"cus_fault:c{n}", "cus_fault", "code_exec", 1))
        backend.close()
    paths = [seen.path for seen in server.requests]
    assert paths == ["/v1/customers.get_or_create"] + ["/v1/balances.check"] * 3
