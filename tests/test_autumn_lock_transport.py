"""The lock client keeps the transport rules of the v1 path (issue 12, points 11, 14, 15).

Autumn's v2 routes (lock, finalize, get_or_create) go over httpx, not autumn-py; they must
honour a 429's ``Retry-After`` (never waiting longer than the back-off cap), cap an answer
at 4 MiB, bound a whole request by its timeout (not each read), keep a finalize answered
with a page that is not Autumn's for a later delivery, and hold the key in no exception.
A misbehaving server on 127.0.0.1 plays each fault.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from agent_meter.backends.autumn import AutumnBackend
from agent_meter.backends.autumn_wire import MAX_ANSWER_BYTES
from agent_meter.engine import FinalizeRequest, Hold, TrackRequest
from agent_meter.errors import AgentMeterError, BackendError, BackendUnavailable
from tests.autumn_helpers import SECRET, FaultServer, Reply, error_body
from tests.test_faults_autumn import Misbehaving, _dripping, _reachable_texts, _send

RELEASE = FinalizeRequest("lk1", "cus_1", "web_search", 1, "release")
HOLD = Hold("lk2", "cus_1", "web_search", 1, None, "lk2:refund", "o", 0.0, lock=True)
LOCKED = {
    "allowed": True,
    "customer_id": "cus_1",
    "required_balance": 1,
    "balance": {"feature_id": "credits", "granted": 100, "remaining": 99, "usage": 1},
}


def _backend(url: str, **options: float) -> AutumnBackend:
    settings = {"timeout": 2.0, "max_retries": 0, "backoff": 0.01, "lock_expiry": None}
    return AutumnBackend(SECRET, base_url=url, **(settings | options))  # type: ignore[arg-type]


def _known_customer(backend: AutumnBackend) -> AutumnBackend:
    backend.locks._customers.add("cus_1")  # created before: the lock is the only request
    return backend


# -- 429 Retry-After ---------------------------------------------------------------------------


def test_a_finalize_answered_429_waits_as_long_as_retry_after_says() -> None:
    def limited(request: BaseHTTPRequestHandler) -> None:
        _send(request, 429, b'{"code": "rate_limited"}', {"Retry-After": "1"})

    with Misbehaving(limited) as server:
        backend = _backend(server.url, max_retries=2)
        with pytest.raises(BackendUnavailable):
            backend.finalize(RELEASE)
        backend.close()
    assert len(server.times) == 3
    gaps = [later - earlier for earlier, later in zip(server.times, server.times[1:], strict=False)]
    assert min(gaps) >= 0.95, gaps


def test_a_retry_after_longer_than_the_backoff_cap_is_not_waited_for_by_a_lock() -> None:
    def limited(request: BaseHTTPRequestHandler) -> None:
        _send(request, 429, b'{"code": "rate_limited"}', {"Retry-After": "3600"})

    with Misbehaving(limited) as server:
        backend = _known_customer(_backend(server.url, max_retries=3))
        start = time.monotonic()
        with pytest.raises(BackendUnavailable) as info:
            backend.lock(HOLD)
        backend.close()
    assert time.monotonic() - start < 2
    assert len(server.times) == 1
    assert info.value.maybe_applied is False  # a 429 ran nothing: no lock to release


# -- the answer's size -------------------------------------------------------------------------


def test_an_oversized_lock_answer_is_refused_before_it_is_read() -> None:
    body = json.dumps({**LOCKED, "padding": "x" * (MAX_ANSWER_BYTES + 1024)}).encode()

    def huge(request: BaseHTTPRequestHandler) -> None:
        _send(request, 200, body)

    with Misbehaving(huge) as server:
        backend = _known_customer(_backend(server.url))
        with pytest.raises(BackendError, match=r"announces|longer than"):
            backend.lock(HOLD)
        backend.close()


def test_an_oversized_chunked_answer_is_cut_at_the_cap() -> None:
    def huge(request: BaseHTTPRequestHandler) -> None:
        request.protocol_version = "HTTP/1.1"  # chunked: no length announced
        request.send_response(200)
        request.send_header("Transfer-Encoding", "chunked")
        request.end_headers()
        piece = b" " * 65536
        for _ in range(MAX_ANSWER_BYTES // len(piece) + 8):
            request.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        request.wfile.write(b"0\r\n\r\n")

    with Misbehaving(huge) as server:
        backend = _backend(server.url)
        with pytest.raises(BackendError, match="longer than"):
            backend.finalize(RELEASE)
        backend.close()


async def test_an_oversized_answer_is_refused_async() -> None:
    body = json.dumps({"success": True, "padding": "x" * (MAX_ANSWER_BYTES + 1024)}).encode()

    def huge(request: BaseHTTPRequestHandler) -> None:
        _send(request, 200, body)

    with Misbehaving(huge) as server:
        backend = _backend(server.url)
        with pytest.raises(BackendError, match=r"announces|longer than"):
            await backend.afinalize(RELEASE)
        await backend.aclose()


# -- a 200 that is not Autumn's answer ---------------------------------------------------------


def _portal(request: BaseHTTPRequestHandler) -> None:
    _send(request, 200, b"<html><body>Sign in to the wifi</body></html>", None, "text/html")


def test_a_finalize_answered_with_an_html_page_waits_for_a_later_delivery() -> None:
    """BackendUnavailable keeps it in the outbox; a BackendError would set it aside."""
    with Misbehaving(_portal) as server:
        backend = _backend(server.url)
        with pytest.raises(BackendUnavailable, match="could not be read"):
            backend.finalize(RELEASE)
        backend.close()


def test_a_lock_answered_with_an_html_page_may_stand_and_is_released_by_id() -> None:
    with Misbehaving(_portal) as server:
        backend = _known_customer(_backend(server.url))
        with pytest.raises(BackendUnavailable) as info:
            backend.lock(HOLD)
        backend.close()
    assert info.value.maybe_applied is True


# -- one deadline per request ------------------------------------------------------------------


@pytest.fixture
def dripping() -> Iterator[Misbehaving]:
    """An answer dripping one byte every 0.2 s: each read is quick, the whole is slow."""
    with Misbehaving(_dripping) as server:
        yield server


def test_a_slowly_dripping_finalize_answer_is_cut_at_the_timeout(dripping: Misbehaving) -> None:
    backend = _backend(dripping.url, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match="timed out"):
        backend.finalize(RELEASE)
    assert time.monotonic() - start < 1.8
    backend.close()


async def test_a_slowly_dripping_finalize_answer_is_cut_at_the_timeout_async(
    dripping: Misbehaving,
) -> None:
    backend = _backend(dripping.url, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match="timed out"):
        await backend.afinalize(RELEASE)
    assert time.monotonic() - start < 1.8
    await backend.aclose()


# -- the key is reachable from no exception ----------------------------------------------------


def test_a_timed_out_lock_holds_no_request_with_the_key() -> None:
    def hang(request: BaseHTTPRequestHandler) -> None:
        time.sleep(1.5)

    with Misbehaving(hang) as server:
        backend = _known_customer(_backend(server.url, timeout=0.3))
        with pytest.raises(BackendUnavailable) as info:
            backend.lock(HOLD)
        backend.close()
    assert SECRET not in _reachable_texts(info.value)
    assert SECRET[:12] not in _reachable_texts(info.value)


@pytest.mark.parametrize("route", ["lock", "finalize", "customer"])
def test_a_refused_connection_holds_no_request_with_the_key(route: str) -> None:
    backend = _backend("http://127.0.0.1:9", timeout=0.5)
    calls = {
        "lock": lambda: backend.lock(HOLD),
        "finalize": lambda: backend.finalize(RELEASE),
        "customer": lambda: backend.locks.customer("cus_1"),
    }
    with pytest.raises(AgentMeterError) as info:
        calls[route]()
    backend.close()
    assert isinstance(info.value, BackendUnavailable)
    assert SECRET not in _reachable_texts(info.value)


# -- a finalize whose first attempt may have landed --------------------------------------------


def test_lock_not_found_after_a_lost_finalize_answer_is_that_finalize_landing() -> None:
    """The first confirm landed and its answer was lost; the retry finds no lock: settled
    by the first attempt, not a lock gone before its confirm (which would read unbilled)."""
    replies = [
        Reply(200, {"success": True}, hang=1.0),
        Reply(400, error_body("invalid_request", "Lock not found for ID: lk1")),
    ]
    with FaultServer(replies) as server:
        backend = _backend(server.url, timeout=0.3, max_retries=1)
        assert backend.finalize(RELEASE) is True
        backend.close()
    assert len(server.requests) == 2


def test_lock_not_found_at_the_first_attempt_is_a_lock_gone() -> None:
    with FaultServer([Reply(400, error_body("invalid_request", "Lock not found"))]) as server:
        backend = _backend(server.url, max_retries=1)
        assert backend.finalize(RELEASE) is False
        backend.close()


# -- a body that stops coming (both clients) ----------------------------------------------------


def _stalled_body(request: BaseHTTPRequestHandler) -> None:
    request.send_response(200)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", "100")
    request.end_headers()
    request.wfile.write(b'{"id": ')
    request.wfile.flush()
    time.sleep(1.5)


def test_a_track_whose_body_stalls_past_the_timeout_is_a_timeout_and_stays_queued() -> None:
    """Found by the outage suite: urllib3's ReadTimeoutError, raised while the answer was
    read against the deadline, was an 'unexpected' error, and the track was set aside."""
    with Misbehaving(_stalled_body) as server:
        backend = _backend(server.url, timeout=0.3)
        with pytest.raises(BackendUnavailable, match="timed out"):
            backend.track(TrackRequest("cus_1", "web_search", 1, "k-stalled"))
        backend.close()


def test_a_finalize_whose_body_stalls_past_the_timeout_is_a_timeout() -> None:
    with Misbehaving(_stalled_body) as server:
        backend = _backend(server.url, timeout=0.3)
        with pytest.raises(BackendUnavailable, match="timed out"):
            backend.finalize(RELEASE)
        backend.close()
