"""AutumnBackend against a misbehaving server: retries, timeouts and error mapping.

No network: a threaded HTTP server on 127.0.0.1 answers from a script (500, 502 with an
HTML page, 429, garbage JSON, a hang past the timeout, Autumn's error bodies), and a
closed port refuses connections. Each case checks the error raised, the number of
attempts the server saw, and for tracks that every attempt carried the same key.
"""

from __future__ import annotations

import logging
import time

import pytest

from agent_meter import (
    AgentMeterError,
    BackendError,
    BackendUnavailable,
    ConfigError,
    CustomerNotFound,
    Meter,
)
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import CheckRequest, TrackRequest
from tests.autumn_helpers import (
    SECRET,
    TRACK_OK,
    FaultServer,
    Reply,
    check_ok,
    error_body,
    exception_texts,
    refused_url,
)

HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
RATE_LIMITED = Reply(429, error_body("rate_limit_exceeded", "Too many requests"))


def backend_for(url: str, **kwargs) -> AutumnBackend:
    options = {"max_retries": 3, "backoff": 0.001, "timeout": 2.0} | kwargs
    return AutumnBackend(SECRET, base_url=url, **options)


def track(backend: AutumnBackend, key: str = "am1:cus_fault::web_search:call_1:track"):
    return backend.track(TrackRequest("cus_fault", "web_search", 1, idempotency_key=key))


async def atrack(backend: AutumnBackend, key: str = "am1:cus_fault::web_search:call_1:track"):
    return await backend.atrack(TrackRequest("cus_fault", "web_search", 1, idempotency_key=key))


def keys(server: FaultServer) -> list[str]:
    return [seen.body["idempotency_key"] for seen in server.requests if seen.body is not None]


# -- 5xx: retried (tracks and plain checks), then BackendUnavailable ---------------------


def test_a_track_on_500_is_retried_with_the_same_key_then_unavailable():
    with FaultServer([Reply(500, error_body("internal_error", "boom"))]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendUnavailable, match="after 4 attempts") as info:
            track(backend)
        backend.close()
    assert len(server.requests) == 4
    assert keys(server) == ["am1:cus_fault::web_search:call_1:track"] * 4
    assert type(info.value.__cause__).__name__ == "_RetryRequestError"
    assert "HTTP 500" in str(info.value)


async def test_a_track_on_500_is_retried_with_the_same_key_then_unavailable_async():
    with FaultServer([Reply(500, error_body("internal_error", "boom"))]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendUnavailable, match="after 4 attempts"):
            await atrack(backend)
        await backend.aclose()
    assert len(server.requests) == 4
    assert len(set(keys(server))) == 1


def test_a_track_recovers_when_the_server_does():
    with FaultServer([Reply(503), Reply(500), Reply(200, TRACK_OK)]) as server:
        backend = backend_for(server.url)
        result = track(backend)
        backend.close()
    assert (result.duplicate, result.value) == (False, 1.0)
    assert len(server.requests) == 3
    assert len(set(keys(server))) == 1


async def test_a_track_recovers_when_the_server_does_async():
    with FaultServer([Reply(503), Reply(500), Reply(200, TRACK_OK)]) as server:
        backend = backend_for(server.url)
        result = await atrack(backend)
        await backend.aclose()
    assert not result.duplicate
    assert len(server.requests) == 3
    assert len(set(keys(server))) == 1


def test_a_retried_track_that_had_landed_is_a_duplicate_not_an_error():
    # The first attempt was recorded but its answer lost (504 from a proxy): the retry
    # with the same key answers 409, which means "already recorded".
    duplicate = error_body("duplicate_idempotency_key", "already received")
    with FaultServer([Reply(504), Reply(409, duplicate)]) as server:
        backend = backend_for(server.url)
        result = track(backend)
        backend.close()
    assert result.duplicate
    assert len(server.requests) == 2
    assert len(set(keys(server))) == 1


async def test_a_retried_track_that_had_landed_is_a_duplicate_async():
    duplicate = error_body("duplicate_idempotency_key", "already received")
    with FaultServer([Reply(504), Reply(409, duplicate)]) as server:
        backend = backend_for(server.url)
        result = await atrack(backend)
        await backend.aclose()
    assert result.duplicate
    assert len(server.requests) == 2


def test_502_with_an_html_page_is_retried_then_unavailable():
    with FaultServer([Reply(502, HTML_502, "text/html")]) as server:
        backend = backend_for(server.url, max_retries=2)
        with pytest.raises(BackendUnavailable, match="HTTP 502") as info:
            backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()
    assert len(server.requests) == 3
    assert "after 3 attempts" in str(info.value)


async def test_502_with_an_html_page_is_retried_then_unavailable_async():
    with FaultServer([Reply(502, HTML_502, "text/html")]) as server:
        backend = backend_for(server.url, max_retries=2)
        with pytest.raises(BackendUnavailable, match="HTTP 502"):
            await backend.acheck(CheckRequest("cus_fault", "web_search"))
        await backend.aclose()
    assert len(server.requests) == 3


def test_no_retries_means_one_attempt():
    with FaultServer([Reply(500)]) as server:
        backend = backend_for(server.url, max_retries=0)
        with pytest.raises(BackendUnavailable, match=r"after 1 attempt\b"):
            track(backend)
        backend.close()
    assert len(server.requests) == 1


# -- 429: refused, never run, so retried even for a deducting check ------------------------


def test_429_is_retried_even_for_a_deducting_check_then_unavailable():
    with FaultServer([RATE_LIMITED]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendUnavailable, match="HTTP 429 rate_limit_exceeded"):
            backend.check(CheckRequest("cus_fault", "code_exec", send_event=True))
        backend.close()
    assert len(server.requests) == 4
    assert all((seen.body or {}).get("send_event") is True for seen in server.requests)


async def test_429_is_retried_even_for_a_deducting_check_async():
    with FaultServer([RATE_LIMITED, Reply(200, check_ok(98, required=2))]) as server:
        backend = backend_for(server.url)
        result = await backend.acheck(CheckRequest("cus_fault", "code_exec", send_event=True))
        await backend.aclose()
    assert (result.allowed, result.deducted, result.balance) == (True, True, 98.0)
    assert len(server.requests) == 2


def test_429_with_an_html_body_is_still_a_rate_limit():
    # autumn-py reads the body of a 429 as JSON and fails; the status tells what it was.
    with FaultServer([Reply(429, "<html>slow down</html>", "text/html")]) as server:
        backend = backend_for(server.url, max_retries=1)
        with pytest.raises(BackendUnavailable, match="HTTP 429"):
            backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()
    assert len(server.requests) == 2


async def test_429_with_an_html_body_is_still_a_rate_limit_async():
    with FaultServer([Reply(429, "<html>slow down</html>", "text/html")]) as server:
        backend = backend_for(server.url, max_retries=1)
        with pytest.raises(BackendUnavailable, match="HTTP 429"):
            await backend.acheck(CheckRequest("cus_fault", "web_search"))
        await backend.aclose()
    assert len(server.requests) == 2


async def test_429_with_a_broken_json_body_is_still_a_rate_limit_async():
    # A JSON content type with a broken body: aiohttp's decoding error carries no
    # status, so the status seen by the session's trace decides.
    with FaultServer([Reply(429, "{oops", "application/json")]) as server:
        backend = backend_for(server.url, max_retries=1)
        with pytest.raises(BackendUnavailable, match="HTTP 429"):
            await backend.acheck(CheckRequest("cus_fault", "web_search"))
        await backend.aclose()
    assert len(server.requests) == 2


def test_429_with_a_broken_json_body_is_still_a_rate_limit():
    with FaultServer([Reply(429, "{oops", "application/json")]) as server:
        backend = backend_for(server.url, max_retries=1)
        with pytest.raises(BackendUnavailable, match="HTTP 429"):
            backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()
    assert len(server.requests) == 2


# -- a deducting check is not retried where it may have deducted -------------------------


@pytest.mark.parametrize("status", [500, 502, 504])
def test_a_deducting_check_is_not_retried_after_a_5xx_that_may_have_run(status):
    with FaultServer([Reply(status), Reply(200, check_ok(98, required=2))]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendUnavailable, match="not retried") as info:
            backend.check(CheckRequest("cus_fault", "code_exec", send_event=True))
        backend.close()
    assert len(server.requests) == 1
    assert f"HTTP {status}" in str(info.value)


async def test_a_deducting_check_is_not_retried_after_a_500_async():
    with FaultServer([Reply(500), Reply(200, check_ok(98, required=2))]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendUnavailable, match="not retried"):
            await backend.acheck(CheckRequest("cus_fault", "code_exec", send_event=True))
        await backend.aclose()
    assert len(server.requests) == 1


def test_a_deducting_check_is_retried_after_503():
    with FaultServer([Reply(503), Reply(200, check_ok(98, required=2))]) as server:
        backend = backend_for(server.url)
        result = backend.check(CheckRequest("cus_fault", "code_exec", send_event=True))
        backend.close()
    assert (result.allowed, result.deducted, result.required) == (True, True, 2.0)
    assert len(server.requests) == 2


def test_a_plain_check_is_retried_after_500():
    with FaultServer([Reply(500), Reply(200, check_ok(100))]) as server:
        backend = backend_for(server.url)
        result = backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()
    assert (result.allowed, result.deducted, result.balance) == (True, False, 100.0)
    assert len(server.requests) == 2


# -- garbage -----------------------------------------------------------------------------


def test_garbage_json_on_200_is_a_backend_error_not_retried():
    with FaultServer([Reply(200, "{not json", "application/json")]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendError, match="unreadable answer") as info:
            backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()
    assert not isinstance(info.value, BackendUnavailable)
    assert len(server.requests) == 1
    assert "JSONDecodeError" in type(info.value.__cause__).__name__


async def test_garbage_json_on_200_is_a_backend_error_not_retried_async():
    with FaultServer([Reply(200, "{not json", "application/json")]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendError, match="unreadable answer") as info:
            await backend.acheck(CheckRequest("cus_fault", "web_search"))
        await backend.aclose()
    assert not isinstance(info.value, BackendUnavailable)
    assert len(server.requests) == 1


async def test_a_non_json_200_is_a_backend_error_async():
    with FaultServer([Reply(200, "OK", "text/plain")]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendError, match="unreadable answer") as info:
            await backend.acheck(CheckRequest("cus_fault", "web_search"))
        await backend.aclose()
    assert not isinstance(info.value, BackendUnavailable)
    # aiohttp's ContentTypeError repr carries the request headers, the key among them.
    assert SECRET not in exception_texts(info.value)


def test_an_answer_without_allowed_is_a_backend_error():
    with FaultServer([Reply(200, {"code": "feature_found"})]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendError, match="no 'allowed'"):
            backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()


# -- timeouts and refused connections ----------------------------------------------------


def test_a_hang_past_the_timeout_is_retried_then_unavailable():
    with FaultServer([Reply(200, check_ok(), hang=5)]) as server:
        backend = backend_for(server.url, timeout=0.2, max_retries=1)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="timed out after 2 attempts"):
            backend.check(CheckRequest("cus_fault", "web_search"))
        elapsed = time.monotonic() - started
        backend.close()
    assert len(server.requests) == 2
    assert elapsed < 2.0  # the timeout was enforced; requests has none by default


async def test_a_hang_past_the_timeout_is_retried_then_unavailable_async():
    with FaultServer([Reply(200, check_ok(), hang=5)]) as server:
        backend = backend_for(server.url, timeout=0.2, max_retries=1)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match="timed out after 2 attempts"):
            await backend.acheck(CheckRequest("cus_fault", "web_search"))
        elapsed = time.monotonic() - started
        await backend.aclose()
    assert len(server.requests) == 2
    assert elapsed < 2.0


def test_a_deducting_check_that_timed_out_is_not_retried():
    with FaultServer([Reply(200, check_ok(98, required=2), hang=5)]) as server:
        backend = backend_for(server.url, timeout=0.2)
        with pytest.raises(BackendUnavailable, match="not retried"):
            backend.check(CheckRequest("cus_fault", "code_exec", send_event=True))
        backend.close()
    assert len(server.requests) == 1


async def test_a_deducting_check_that_timed_out_is_not_retried_async():
    with FaultServer([Reply(200, check_ok(98, required=2), hang=5)]) as server:
        backend = backend_for(server.url, timeout=0.2)
        with pytest.raises(BackendUnavailable, match="not retried"):
            await backend.acheck(CheckRequest("cus_fault", "code_exec", send_event=True))
        await backend.aclose()
    assert len(server.requests) == 1


def test_a_timed_out_track_is_retried_with_the_same_key():
    with FaultServer([Reply(200, TRACK_OK, hang=5), Reply(200, TRACK_OK)]) as server:
        backend = backend_for(server.url, timeout=0.2)
        result = track(backend)
        backend.close()
    assert not result.duplicate
    assert len(server.requests) == 2
    assert len(set(keys(server))) == 1


def test_a_refused_connection_is_retried_then_unavailable(caplog):
    caplog.set_level(logging.INFO, logger="agent_meter.autumn")
    backend = backend_for(refused_url())
    with pytest.raises(BackendUnavailable, match="could not connect after 4 attempts") as info:
        # Refused means never sent: even a deducting check may be retried.
        backend.check(CheckRequest("cus_fault", "code_exec", send_event=True))
    backend.close()
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert info.value.__cause__ is not None


async def test_a_refused_connection_is_retried_then_unavailable_async(caplog):
    caplog.set_level(logging.INFO, logger="agent_meter.autumn")
    backend = backend_for(refused_url())
    with pytest.raises(BackendUnavailable, match="could not connect after 4 attempts"):
        await backend.acheck(CheckRequest("cus_fault", "code_exec", send_event=True))
    await backend.aclose()
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 3


def test_back_off_grows_between_attempts():
    with FaultServer([Reply(503)]) as server:
        backend = backend_for(server.url, backoff=0.04, max_retries=3)
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            backend.check(CheckRequest("cus_fault", "web_search"))
        elapsed = time.monotonic() - started
        backend.close()
    # Waits of at least half of 0.04, 0.08 and 0.16 seconds.
    assert elapsed >= 0.14
    assert len(server.requests) == 4


def test_a_bad_base_url_is_a_config_error():
    backend = AutumnBackend(SECRET, base_url="not a url")
    with pytest.raises(ConfigError, match="base_url"):
        backend.check(CheckRequest("cus_fault", "web_search"))
    backend.close()


# -- Autumn's refusals: never retried ----------------------------------------------------


def test_an_unknown_customer_is_customer_not_found_naming_it():
    body = error_body("customer_not_found", "Customer cus_ghost not found")
    with FaultServer([Reply(404, body)]) as server:
        backend = backend_for(server.url)
        with pytest.raises(CustomerNotFound, match="cus_ghost") as info:
            backend.check(CheckRequest("cus_ghost", "web_search"))
        backend.close()
    assert info.value.customer_id == "cus_ghost"
    assert isinstance(info.value, AgentMeterError)
    assert len(server.requests) == 1


async def test_an_unknown_customer_is_customer_not_found_naming_it_async():
    body = error_body("customer_not_found", "Customer cus_ghost not found")
    with FaultServer([Reply(404, body)]) as server:
        backend = backend_for(server.url)
        with pytest.raises(CustomerNotFound, match="cus_ghost"):
            await backend.abalances("cus_ghost")
        await backend.aclose()
    assert server.requests[0].path == "/v1/customers/cus_ghost"


def test_invalid_inputs_is_a_backend_error_with_the_server_message():
    body = error_body("invalid_inputs", "value must be a number")
    with FaultServer([Reply(400, body)]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendError, match="value must be a number") as info:
            track(backend)
        backend.close()
    assert not isinstance(info.value, BackendUnavailable)
    assert len(server.requests) == 1


def test_a_server_message_echoing_the_key_is_redacted_everywhere(caplog):
    caplog.set_level(logging.DEBUG, logger="agent_meter")
    echo = error_body("forbidden", f"key {SECRET} may not do this ({SECRET[:15]}***)")
    with FaultServer([Reply(403, echo)]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendError, match="403 forbidden") as info:
            backend.check(CheckRequest("cus_fault", "web_search"))
        backend.close()
    texts = exception_texts(info.value) + caplog.text
    assert SECRET not in texts
    assert SECRET[:12] not in texts
    assert info.value.__cause__ is not None  # a redacted stand-in, still chained
    assert type(info.value.__cause__).__name__ == "_RedactedCause"


def test_a_wrong_key_from_a_live_server_hides_the_key():
    echo = error_body("invalid_secret_key", f"Invalid secret key: {SECRET[:15]}*********")
    with FaultServer([Reply(401, echo)]) as server:
        backend = backend_for(server.url)
        with pytest.raises(BackendError, match="rejected the secret key") as info:
            track(backend)
        backend.close()
    assert len(server.requests) == 1
    assert SECRET[:12] not in exception_texts(info.value)


# -- through the meter: the fail policy sees the mapped errors --------------------------


def test_the_meter_fails_closed_on_an_outage_with_a_clear_reason():
    with FaultServer([Reply(503)]) as server:
        meter = Meter(backend_for(server.url, max_retries=1))
        with (
            pytest.raises(BackendUnavailable, match="unreachable") as info,
            meter.guard("cus_fault", "code_exec", call_id="c1"),
        ):
            pytest.fail("must not run")
        meter.close()
    assert "no credits were used" in str(info.value)
    assert len(server.requests) == 2


def test_the_meter_fails_open_on_an_outage_when_told_to():
    with FaultServer([Reply(503), Reply(503), Reply(200, TRACK_OK)]) as server:
        meter = Meter(backend_for(server.url, max_retries=1), on_backend_error="allow")
        with meter.guard("cus_fault", "code_exec", call_id="c1") as call:
            ran = True
        meter.close()
    assert ran
    assert call.admission is not None
    assert call.admission.verified is False
    # The unverified call is tracked afterwards, keyed by its call id.
    assert server.requests[-1].path == "/v1/track"
    assert (server.requests[-1].body or {})["idempotency_key"].endswith(":c1:track")
