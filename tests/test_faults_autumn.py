"""Faults of the Autumn transport (issue 12): deadlines, 429 Retry-After, answer size,
a 200 that is not Autumn's answer, and the secret key reachable from an exception.

A misbehaving Autumn-shaped server on 127.0.0.1 plays each fault. Each test reproduces one
break found by the fault campaign and failed before its fix.
"""

from __future__ import annotations

import contextlib
import gc
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent_meter import Meter
from agent_meter.backends.autumn import MAX_ANSWER_BYTES, AutumnBackend
from agent_meter.engine import CheckRequest, TrackRequest
from agent_meter.errors import AgentMeterError, BackendError, BackendUnavailable, ConfigError
from tests.autumn_helpers import PRICING, SECRET

CHECK_OK = {
    "allowed": True,
    "customer_id": "cus_1",
    "feature_id": "credits",
    "balance": 99,
    "required_balance": 1,
}

Handler = Callable[[BaseHTTPRequestHandler], None]


class Misbehaving:
    """A local server whose every answer is written by ``answer`` (one handler per request)."""

    def __init__(self, answer: Handler) -> None:
        self.answer = answer
        self.times: list[float] = []
        owner = self

        class _Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                owner.times.append(time.monotonic())
                with contextlib.suppress(OSError):  # the client gave up
                    owner.answer(self)

            do_GET = do_POST = _serve

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}"

    def __enter__(self) -> Misbehaving:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _send(
    request: BaseHTTPRequestHandler,
    status: int,
    body: bytes,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> None:
    request.send_response(status)
    request.send_header("Content-Type", content_type)
    request.send_header("Content-Length", str(len(body)))
    for name, value in (headers or {}).items():
        request.send_header(name, value)
    request.end_headers()
    request.wfile.write(body)


def _reachable_texts(root: object, depth: int = 8) -> str:
    """Every string reachable from ``root``: causes, contexts, args and attributes."""
    texts: list[str] = []
    seen: set[int] = set()
    todo: list[tuple[object, int]] = [(root, depth)]
    while todo:
        obj, left = todo.pop()
        if id(obj) in seen or left < 0:
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            texts.append(obj)
            continue
        if isinstance(obj, bytes):
            texts.append(obj.decode("latin-1"))
            continue
        if obj is None or isinstance(obj, (int, float, bool)):
            continue
        if isinstance(obj, BaseException):
            todo += [(obj.__cause__, left - 1), (obj.__context__, left - 1)]
            texts += [str(obj), repr(obj)]
        children: list[object] = []
        if isinstance(obj, dict):
            children += [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children += list(obj)
        else:
            children += list(getattr(obj, "__dict__", {}).values())
            for klass in type(obj).__mro__:
                for slot in getattr(klass, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(obj, slot):
                        children.append(getattr(obj, slot))
            for name in ("headers", "request", "request_info", "response", "args"):
                children.append(getattr(obj, name, None))
            if hasattr(obj, "items") and callable(obj.items):
                with contextlib.suppress(Exception):  # a mapping-like we cannot walk
                    children += [value for pair in obj.items() for value in pair]
        todo += [(child, left - 1) for child in children]
    return "\n".join(texts)


# -- 15: the key is reachable from no exception we raise ----------------------------------------


def test_a_timeout_error_holds_no_request_with_the_key() -> None:
    def hang(request: BaseHTTPRequestHandler) -> None:
        time.sleep(1.5)

    with Misbehaving(hang) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=0.3, max_retries=0)
        with pytest.raises(BackendUnavailable) as info:
            backend.track(TrackRequest("cus_1", "web_search", 1, "k1"))
        backend.close()
    assert SECRET not in _reachable_texts(info.value)
    assert SECRET[:12] not in _reachable_texts(info.value)


def test_a_connection_error_holds_no_request_with_the_key() -> None:
    backend = AutumnBackend(SECRET, base_url="http://127.0.0.1:9", timeout=0.5, max_retries=0)
    with pytest.raises(BackendUnavailable) as info:
        backend.check(CheckRequest("cus_1", "web_search"))
    backend.close()
    assert SECRET not in _reachable_texts(info.value)


@pytest.mark.parametrize("key", [f"{SECRET}\nSECONDLINEOFTHEKEY", f"{SECRET[:20]} {SECRET[20:]}"])
def test_a_key_with_a_line_break_is_refused_without_quoting_it(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        AutumnBackend(key)
    text = _reachable_texts(info.value)
    assert "SECONDLINE" not in text
    assert SECRET[12:20] not in text


# -- 14: 429 Retry-After, answer size, a 200 that is not Autumn's answer -----------------------


def test_429_retry_after_is_honoured() -> None:
    def limited(request: BaseHTTPRequestHandler) -> None:
        body = json.dumps({"message": "slow down", "code": "rate_limited"}).encode()
        _send(request, 429, body, {"Retry-After": "1"})

    with Misbehaving(limited) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=2, max_retries=2, backoff=0.01)
        with pytest.raises(BackendUnavailable):
            backend.track(TrackRequest("cus_1", "web_search", 1, "k1"))
        backend.close()
    assert len(server.times) == 3
    gaps = [later - earlier for earlier, later in zip(server.times, server.times[1:], strict=False)]
    assert min(gaps) >= 0.95, gaps  # not 6 requests in 0.25 s


def test_a_retry_after_longer_than_the_backoff_cap_is_not_waited_for() -> None:
    def limited(request: BaseHTTPRequestHandler) -> None:
        _send(request, 429, b'{"code": "rate_limited"}', {"Retry-After": "3600"})

    with Misbehaving(limited) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=2, max_retries=3)
        start = time.monotonic()
        with pytest.raises(BackendUnavailable):
            backend.track(TrackRequest("cus_1", "web_search", 1, "k1"))
        backend.close()
    assert time.monotonic() - start < 2
    assert len(server.times) == 1


def test_an_oversized_answer_is_refused_before_it_is_read() -> None:
    padding = "x" * (MAX_ANSWER_BYTES + 1024)
    body = json.dumps({**CHECK_OK, "padding": padding}).encode()

    def huge(request: BaseHTTPRequestHandler) -> None:
        _send(request, 200, body)

    with Misbehaving(huge) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=5, max_retries=0)
        with pytest.raises(BackendError, match=r"longer than|announces"):
            backend.check(CheckRequest("cus_1", "web_search"))
        backend.close()


def test_an_oversized_answer_without_a_length_is_cut_at_the_cap() -> None:
    def huge(request: BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Connection", "close")
        request.end_headers()
        chunk = b" " * 65536
        for _ in range(MAX_ANSWER_BYTES // 65536 + 8):
            request.wfile.write(chunk)
        request.wfile.write(json.dumps(CHECK_OK).encode())

    with Misbehaving(huge) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=5, max_retries=0)
        with pytest.raises(BackendError, match="longer than"):
            backend.check(CheckRequest("cus_1", "web_search"))
        backend.close()
    gc.collect()


async def test_an_oversized_answer_is_refused_async() -> None:
    body = json.dumps({**CHECK_OK, "padding": "x" * (MAX_ANSWER_BYTES + 1024)}).encode()

    def huge(request: BaseHTTPRequestHandler) -> None:
        _send(request, 200, body)

    with Misbehaving(huge) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=5, max_retries=0)
        with pytest.raises(BackendError, match="longer than"):
            await backend.acheck(CheckRequest("cus_1", "web_search"))
        await backend.aclose()


def test_a_track_answered_with_an_html_page_is_queued_not_raised(tmp_path: Path) -> None:
    def portal(request: BaseHTTPRequestHandler) -> None:
        _send(request, 200, b"<html><body>Sign in to the wifi</body></html>", None, "text/html")

    with Misbehaving(portal) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=2, max_retries=0)
        meter = Meter(
            backend, pricing=PRICING, outbox=tmp_path / "outbox.db", recover_on_start=False
        )
        result = meter.track("cus_1", "web_search", 1, idempotency_key="k1")
        assert result.queued
        assert meter.outbox.pending() == 1
        meter.deliverer.stop()
        meter.close(timeout=0.5)


# -- 11: a whole request has one deadline --------------------------------------------------------


def _dripping(request: BaseHTTPRequestHandler) -> None:
    body = json.dumps(CHECK_OK).encode()
    request.send_response(200)
    request.send_header("Content-Type", "application/json")
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    for byte in body:  # one byte every 0.2 s: each read is quick, the answer takes 20 s
        request.wfile.write(bytes([byte]))
        request.wfile.flush()
        time.sleep(0.2)


@pytest.fixture
def dripping() -> Iterator[Misbehaving]:
    with Misbehaving(_dripping) as server:
        yield server


def test_a_slowly_dripping_answer_is_cut_at_the_timeout(dripping: Misbehaving) -> None:
    backend = AutumnBackend(SECRET, base_url=dripping.url, timeout=1, max_retries=0)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match="timed out"):
        backend.check(CheckRequest("cus_1", "web_search"))
    assert time.monotonic() - start < 2.0
    backend.close()


async def test_a_slowly_dripping_answer_is_cut_at_the_timeout_async(
    dripping: Misbehaving,
) -> None:
    backend = AutumnBackend(SECRET, base_url=dripping.url, timeout=1, max_retries=0)
    start = time.monotonic()
    with pytest.raises(AgentMeterError):
        await backend.acheck(CheckRequest("cus_1", "web_search"))
    assert time.monotonic() - start < 2.0
    await backend.aclose()
