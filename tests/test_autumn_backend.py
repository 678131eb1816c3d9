"""AutumnBackend against recordings of a real Autumn server, call by call.

Sync cassettes are replayed matching request bodies too, which proves that our requests
are the ones autumn-py sent when they were recorded. The contract cases (what every
backend must do, DESIGN.md §5) are written over AutumnBackend here, where the cassettes
cover them; the embedded backends run the lead's suite in test_backend_contract.py.

Contract cases covered here (cassette): new customers created with the auto-enabled plan
(unknown_customer_autocreate), checks about the pool with required converted
(credit_conversion, reserve_then_refund, negative_and_fractional_values), send_event
deducting in one step (reserve_then_refund) and a denial deducting nothing
(reserve_until_denied), tracks lowering the pool by the converted cost (credit_conversion),
capped at 0 (track_over_balance), refunds and zero (negative_and_fractional_values),
repeated keys recorded once (track_duplicate_idempotency, async_duplicate_idempotency),
keys global across customers (idempotency_key_scope), boolean gates
(boolean_feature_gate), bad input refused before any request, async twins. Not
recorded, so not covered: plan resets, set_balance (Autumn's admin API is not wrapped),
entities.
"""

from __future__ import annotations

import logging
import math
import pickle

import pytest
import requests

from agent_meter import (
    AsyncBackend,
    Backend,
    BackendError,
    ConfigError,
    InvalidUsage,
    Meter,
    UsageLimitExceeded,
)
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import CheckRequest, TrackRequest
from agent_meter.keys import idempotency_key
from tests.autumn_helpers import (
    REPLAY_KEY,
    SECRET,
    FaultServer,
    Reply,
    check_ok,
    exception_texts,
    replay,
)

# -- construction and secrecy ---------------------------------------------------------


def test_missing_key_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv("AUTUMN_SECRET_KEY", raising=False)
    with pytest.raises(ConfigError, match="AUTUMN_SECRET_KEY") as info:
        AutumnBackend()
    assert "secret_key=" in str(info.value)


def test_key_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("AUTUMN_SECRET_KEY", SECRET)
    with FaultServer([Reply(200, check_ok())]) as server:
        backend = AutumnBackend(base_url=server.url)
        assert backend.check(CheckRequest("cus_fault", "web_search")).allowed
        backend.close()
    assert server.requests[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert server.requests[0].headers["X-Api-Version"] == "1.2.0"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1.0}, "timeout"),
        ({"max_retries": -1}, "max_retries"),
        ({"max_retries": 1.5}, "max_retries"),
    ],
)
def test_options_out_of_range_are_config_errors(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        AutumnBackend(SECRET, **kwargs)


def test_the_key_is_not_in_repr_vars_or_pickles():
    backend = AutumnBackend(SECRET, base_url="https://autumn.example.com/")
    assert SECRET not in repr(backend)
    assert SECRET not in repr(vars(backend))
    assert backend.base_url == "https://autumn.example.com"
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(backend)


def test_implements_both_protocols():
    backend = AutumnBackend(SECRET)
    assert isinstance(backend, Backend)
    assert isinstance(backend, AsyncBackend)


def test_clients_are_created_on_first_use_and_closed():
    with replay(body=True).use_cassette("check_allowed.yaml"):
        backend = AutumnBackend(REPLAY_KEY)
        assert backend._sync is None
        backend.check(CheckRequest("cus_check_allowed", "web_search"))
        assert backend._sync is not None
        session = backend._sync.http.session
        assert session is not None
        backend.close()
    assert backend._sync is None
    with pytest.raises(BackendError, match="closed"):
        backend.check(CheckRequest("cus_check_allowed", "web_search"))


async def test_async_client_is_created_on_first_use_and_closed():
    with replay().use_cassette("async_check_track.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        assert backend._async is None
        await backend.acheck(CheckRequest("cus_async_check_track", "web_search"))
        assert backend._async is not None
        session = backend._async.http.session
        await backend.atrack(
            TrackRequest("cus_async_check_track", "web_search", 1, idempotency_key="k1")
        )
        await backend.acheck(CheckRequest("cus_async_check_track", "web_search"))
        await backend.aclose()
    assert cassette.all_played
    assert session.closed
    with pytest.raises(BackendError, match="closed"):
        await backend.acheck(CheckRequest("cus_async_check_track", "web_search"))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda b: b.check(CheckRequest("", "web_search")), "customer_id"),
        (
            lambda b: b.check(CheckRequest("cus_1", "web_search", required_balance=math.nan)),
            "finite",
        ),
        (lambda b: b.check(CheckRequest("cus_1", "web_search", required_balance=-1)), "negative"),
        (
            lambda b: b.track(TrackRequest("cus_1", "web_search", 1, idempotency_key="")),
            "idempotency_key",
        ),
        (
            lambda b: b.track(TrackRequest("cus_1", "web_search", math.inf, idempotency_key="k")),
            "finite",
        ),
        (lambda b: b.track(TrackRequest("cus_1", "", 1, idempotency_key="k")), "feature_id"),
    ],
)
def test_bad_input_is_refused_before_any_request(call, match):
    with replay().use_cassette("check_allowed.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        with pytest.raises(InvalidUsage, match=match):
            call(backend)
    assert cassette.play_count == 0


# -- the contract, over recorded answers ------------------------------------------------


def test_check_answers_about_the_pool_with_every_field():
    with replay(body=True).use_cassette("credit_conversion.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        five_k = backend.check(
            CheckRequest("cus_credit_conversion", "llm_tokens", required_balance=5000)
        )
        too_many = backend.check(
            CheckRequest("cus_credit_conversion", "llm_tokens", required_balance=200000)
        )
        backend.track(
            TrackRequest(
                "cus_credit_conversion", "llm_tokens", 1234, idempotency_key="tokens_run_1"
            )
        )
        after = backend.check(CheckRequest("cus_credit_conversion", "web_search"))
        backend.close()
    assert cassette.all_played
    assert cassette.play_count == 4  # one request per call
    assert (five_k.allowed, five_k.required, five_k.balance) == (True, 5.0, 100.0)
    assert five_k.balance_feature_id == "credits"
    assert five_k.feature_id == "llm_tokens"
    assert (five_k.included_usage, five_k.usage, five_k.unlimited) == (100.0, 0.0, False)
    assert not five_k.deducted
    assert (too_many.allowed, too_many.required, too_many.balance) == (False, 200.0, 100.0)
    assert after.balance == pytest.approx(98.766)
    assert after.usage == pytest.approx(1.234)


def test_send_event_deducts_atomically_and_a_negative_track_refunds():
    with replay(body=True).use_cassette("reserve_then_refund.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        reserved = backend.check(
            CheckRequest("cus_reserve_then_refund", "code_exec", send_event=True)
        )
        seen = backend.check(CheckRequest("cus_reserve_then_refund", "web_search"))
        refund = backend.track(
            TrackRequest(
                "cus_reserve_then_refund", "code_exec", -1, idempotency_key="refund_call_7"
            )
        )
        final = backend.check(CheckRequest("cus_reserve_then_refund", "web_search"))
        backend.close()
    assert cassette.all_played
    assert (reserved.allowed, reserved.deducted, reserved.required) == (True, True, 2.0)
    assert reserved.balance == 98.0  # the balance after the deduction
    assert seen.balance == 98.0
    assert (refund.value, refund.duplicate) == (-1.0, False)
    assert final.balance == 100.0


def test_a_denied_send_event_check_deducts_nothing():
    with replay(body=True).use_cassette("reserve_until_denied.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        answers = [
            backend.check(CheckRequest("cus_reserve_until_denied", "code_exec", send_event=True))
            for _ in range(51)
        ]
        backend.close()
    assert cassette.all_played
    assert [a.balance for a in answers[:50]] == [float(b) for b in range(98, -1, -2)]
    assert all(a.allowed and a.deducted for a in answers[:50])
    last = answers[50]
    assert (last.allowed, last.deducted, last.balance, last.required) == (False, False, 0.0, 2.0)


def test_a_repeated_key_is_success_and_billed_once():
    with replay(body=True).use_cassette("track_duplicate_idempotency.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        cus = "cus_track_duplicate_idempotency"
        first = backend.track(TrackRequest(cus, "web_search", 1, idempotency_key="dup_call_1"))
        second = backend.track(TrackRequest(cus, "web_search", 1, idempotency_key="dup_call_1"))
        check = backend.check(CheckRequest(cus, "web_search"))
        backend.close()
    assert cassette.all_played
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.idempotency_key == "dup_call_1"
    assert check.balance == 99.0


async def test_a_repeated_key_is_success_and_billed_once_async():
    with replay().use_cassette("async_duplicate_idempotency.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        cus = "cus_async_duplicate_idempotency"
        first = await backend.atrack(
            TrackRequest(cus, "code_exec", 1, idempotency_key="async_dup_1")
        )
        second = await backend.atrack(
            TrackRequest(cus, "code_exec", 1, idempotency_key="async_dup_1")
        )
        check = await backend.acheck(CheckRequest(cus, "code_exec"))
        await backend.aclose()
    assert cassette.all_played
    assert (first.duplicate, second.duplicate) == (False, True)
    assert (check.balance, check.required) == (98.0, 2.0)


def test_keys_are_organisation_wide_so_the_meter_scopes_them_per_customer():
    with replay(body=True).use_cassette("idempotency_key_scope.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        a = backend.track(
            TrackRequest("cus_idem_scope_a", "web_search", 1, idempotency_key="shared_key_1")
        )
        b = backend.track(
            TrackRequest("cus_idem_scope_b", "web_search", 1, idempotency_key="shared_key_1")
        )
        balance_a = backend.check(CheckRequest("cus_idem_scope_a", "web_search")).balance
        balance_b = backend.check(CheckRequest("cus_idem_scope_b", "web_search")).balance
        backend.close()
    assert cassette.all_played
    assert (a.duplicate, b.duplicate) == (False, True)
    assert (balance_a, balance_b) == (99.0, 100.0)  # b was silently not charged
    # Which is why keys built by the meter name the customer: the same call id for two
    # customers can never collide in Autumn.
    key_a = idempotency_key("cus_idem_scope_a", "web_search", "shared_key_1", "track")
    key_b = idempotency_key("cus_idem_scope_b", "web_search", "shared_key_1", "track")
    assert key_a != key_b


def test_a_track_past_the_balance_is_accepted_and_capped():
    with replay(body=True).use_cassette("track_over_balance.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        backend.check(CheckRequest("cus_track_over_balance", "web_search"))
        over = backend.track(
            TrackRequest("cus_track_over_balance", "web_search", 150, idempotency_key="over_1")
        )
        after = backend.check(CheckRequest("cus_track_over_balance", "web_search"))
        backend.close()
    assert cassette.all_played
    assert over.value == 150.0
    assert (after.allowed, after.balance, after.usage) == (False, 0.0, 100.0)


def test_zero_and_fractional_values_are_sent_as_they_are():
    cus = "cus_negative_and_fractional_values"
    with replay(body=True).use_cassette("negative_and_fractional_values.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        balances = [backend.check(CheckRequest(cus, "web_search")).balance]
        for feature, value, key in [
            ("llm_tokens", 0, "nf_zero"),
            ("web_search", 2, "nf_two"),
            ("llm_tokens", 2.5, "nf_frac"),
            ("web_search", -1, "nf_neg"),
        ]:
            backend.track(TrackRequest(cus, feature, value, idempotency_key=key))
            balances.append(backend.check(CheckRequest(cus, "web_search")).balance)
        half = backend.check(CheckRequest(cus, "web_search", required_balance=0.5))
        backend.close()
    assert cassette.all_played
    assert balances == pytest.approx([100, 100, 98, 97.9975, 98.9975])
    assert (half.allowed, half.required) == (True, 0.5)


def test_unknown_customers_are_created_on_first_use():
    with replay(body=True).use_cassette("unknown_customer_autocreate.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        check = backend.check(CheckRequest("cus_unknown_customer_autocreate", "web_search"))
        balances = backend.balances("cus_unknown_customer_autocreate")
        backend.close()
    assert cassette.all_played
    assert (check.allowed, check.balance) == (True, 100.0)
    assert balances == {"credits": 100.0}


def test_a_boolean_feature_is_gated_without_a_balance():
    with replay().use_cassette("boolean_feature_gate.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        before = backend.check(CheckRequest("cus_boolean_feature_gate", "premium_tools"))
        # The grant is an admin call autumn-py lacks (v2 balances.create); the recording
        # made it with plain requests, and so does the replay.
        grant = requests.post(
            "https://api.useautumn.com/v1/balances.create",
            json={"customer_id": "cus_boolean_feature_gate", "feature_id": "premium_tools"},
            timeout=5,
        )
        after = backend.check(CheckRequest("cus_boolean_feature_gate", "premium_tools"))
        backend.close()
    assert cassette.all_played
    assert grant.json() == {"success": True}
    assert (before.allowed, before.balance, before.balance_feature_id) == (
        False,
        None,
        "premium_tools",
    )
    assert (after.allowed, after.balance) == (True, 0.0)


# -- errors from the recorded server --------------------------------------------------


def test_unknown_feature_is_a_config_error_naming_it():
    # Bodies are not matched: the recorded track was sent without an idempotency key,
    # which this backend always sends.
    with replay().use_cassette("feature_not_found.yaml") as cassette:
        backend = AutumnBackend(REPLAY_KEY)
        with pytest.raises(ConfigError, match="no_such_feature") as on_check:
            backend.check(CheckRequest("cus_feature_not_found", "no_such_feature"))
        with pytest.raises(ConfigError, match="no_such_feature") as on_track:
            backend.track(
                TrackRequest("cus_feature_not_found", "no_such_feature", 1, idempotency_key="k")
            )
        backend.close()
    assert cassette.all_played
    assert cassette.play_count == 2  # 4xx is not retried
    for info in (on_check, on_track):
        assert "feature_not_found" in str(info.value)
        assert type(info.value.__cause__).__name__ == "AutumnHTTPError"


def test_a_wrong_key_is_a_backend_error_that_never_shows_the_key(caplog):
    caplog.set_level(logging.DEBUG)
    with replay().use_cassette("invalid_secret_key.yaml") as cassette:
        backend = AutumnBackend(SECRET, max_retries=3)
        with pytest.raises(BackendError) as info:
            backend.check(CheckRequest("cus_invalid_secret_key", "web_search"))
        backend.close()
    assert cassette.play_count == 1  # a wrong key is not retried
    error = info.value
    assert not isinstance(error, ConfigError)
    assert "secret key" in str(error)
    assert "401" in str(error)
    # The server echoes the key's first characters ("am_sk_test_wron***"): the cause is
    # dropped, the message is ours, and nothing of the key (nor the echo) is anywhere.
    assert error.__cause__ is None
    assert error.__context__ is None
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("agent_meter")]
    texts = exception_texts(error) + "\n".join(ours)
    assert SECRET not in texts
    assert SECRET[:12] not in texts
    assert "am_sk_test_wron" not in texts


def test_a_wrong_key_through_the_meter_refuses_the_call_without_the_key():
    with replay().use_cassette("invalid_secret_key.yaml"):
        meter = Meter(AutumnBackend(SECRET), on_backend_error="allow", strategy="reserve")
        # Even fail-open does not let a wrong key through: it is not an outage.
        with (
            pytest.raises(BackendError, match="refused the check") as info,
            meter.guard("cus_invalid_secret_key", "web_search"),
        ):
            pytest.fail("the guarded block must not run")
    assert not isinstance(info.value, UsageLimitExceeded)
    assert SECRET[:12] not in exception_texts(info.value)


# -- the example -------------------------------------------------------------------------


def test_the_example_explains_the_setup_and_exits_cleanly_without_a_key():
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    root = Path(__file__).parent.parent
    env = {k: v for k, v in os.environ.items() if k != "AUTUMN_SECRET_KEY"}
    env["PYTHONPATH"] = str(root)
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "autumn_backend.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "AUTUMN_SECRET_KEY is not set" in done.stdout
    assert "export AUTUMN_SECRET_KEY=" in done.stdout
