"""Shared fixtures for the Autumn backend tests: cassette replay, pricing, a fault server."""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import vcr

from agent_meter import Pricing
from agent_meter.pricing import Plan

CASSETTES = Path(__file__).parent / "cassettes" / "autumn"

# The key every cassette was replayed with; headers are not matched, any key replays.
REPLAY_KEY = "am_sk_test_REDACTED"
# A key that must never show up anywhere: in messages, causes, reprs or logs.
SECRET = "am_sk_test_s3cr3tK3yThatMustNeverLeak0123"  # noqa: S105 - a fake, for leak checks

# The configuration the cassettes were recorded against (their README, "Seeded configuration").
PRICING = Pricing(
    features={
        "web_search": "metered",
        "code_exec": "metered",
        "llm_tokens": "metered",
        "premium_tools": "boolean",
    },
    credit_systems={"credits": {"web_search": 1, "code_exec": 2, "llm_tokens": 0.001}},
    plans={"agent_free": Plan(auto_enable=True, grants={"credits": 100})},
)

_MATCH = ["method", "scheme", "host", "port", "path", "query"]


def replay(*, body: bool = False) -> vcr.VCR:
    """A vcrpy replayer over the cassettes, never recording.

    Args:
        body: Also match request bodies, which proves our requests serialize exactly as
            the recorded autumn-py calls did (sync cassettes only: the aiohttp ones store
            bodies as YAML mappings, see the cassettes' README).
    """
    return vcr.VCR(
        cassette_library_dir=str(CASSETTES),
        record_mode="none",
        match_on=[*_MATCH, "body"] if body else _MATCH,
        decode_compressed_response=True,
    )


@dataclass
class Reply:
    """One scripted answer of the fault server."""

    status: int = 200
    body: str | bytes | dict[str, Any] = field(default_factory=dict)
    content_type: str = "application/json"
    hang: float = 0.0  # seconds to wait before answering (past the client's timeout)


@dataclass
class Seen:
    """One request the fault server received."""

    method: str
    path: str
    body: dict[str, Any] | None
    headers: dict[str, str]


class FaultServer:
    """A local HTTP server on 127.0.0.1 that answers from a script.

    Replies are used in order; the last one repeats. Every request is recorded in
    :attr:`requests`.

    Example:
        >>> with FaultServer([Reply(500), Reply(200, TRACK_OK)]) as server:
        ...     AutumnBackend(SECRET, base_url=server.url).track(...)
    """

    def __init__(self, replies: list[Reply]) -> None:
        self.replies = list(replies)
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                with owner._lock:
                    index = len(owner.requests)
                    owner.requests.append(
                        Seen(
                            self.command,
                            self.path,
                            json.loads(raw) if raw else None,
                            dict(self.headers.items()),
                        )
                    )
                    reply = owner.replies[min(index, len(owner.replies) - 1)]
                if reply.hang:
                    owner._stop.wait(reply.hang)
                payload = reply.body
                if isinstance(payload, dict):
                    payload = json.dumps(payload)
                data = payload.encode() if isinstance(payload, str) else payload
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", reply.content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a timeout test); nothing to tell it

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def refused_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def check_ok(balance: float = 100, *, required: float = 1, allowed: bool = True) -> dict[str, Any]:
    """A v1.2 check answer about the credits pool, shaped like the recorded ones."""
    return {
        "allowed": allowed,
        "code": "feature_found",
        "customer_id": "cus_fault",
        "feature_id": "credits",
        "required_balance": required,
        "unlimited": False,
        "balance": balance,
        "usage": 100 - balance,
        "included_usage": 100,
    }


TRACK_OK = {
    "id": "placeholder",
    "code": "event_received",
    "customer_id": "cus_fault",
    "feature_id": "credits",
}


def error_body(code: str, message: str) -> dict[str, str]:
    """Autumn's error shape."""
    return {"message": message, "code": code, "env": "sandbox"}


def exception_texts(exc: BaseException) -> str:
    """Every text an exception chain can show: messages, reprs, formatted tracebacks."""
    import traceback  # noqa: PLC0415

    texts: list[str] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        texts += [str(item), repr(item), repr(item.args)]
        todo += [item.__cause__, item.__context__]
    texts.append("".join(traceback.format_exception(exc)))
    return "\n".join(texts)
