"""An Autumn-shaped local server for outage tests and benchmarks: no network, 127.0.0.1 only.

:class:`AutumnServer` answers ``POST /v1/check``, ``POST /v1/track`` and
``GET /v1/customers/<id>`` with the v1.2 JSON shapes of the recorded cassettes, over a real
ledger: one credit pool per customer (100 credits granted on first sight), ``web_search`` =
1 credit, ``code_exec`` = 2, ``llm_tokens`` = 0.001; ``send_event`` checks and deducts in
one step; a track past the balance is capped at 0; a repeated idempotency key answers 409
``duplicate_idempotency_key``; an unknown feature answers 404 ``feature_not_found``.

It also speaks the v2 lock routes as the recorded server does (facts 11 and 13 to 19 of
the cassettes' README): ``customers.get_or_create``, ``balances.check`` with a ``lock``
(a lock id is unique: 409 ``lock_already_exists``; a denied lock leaves nothing) and
``balances.finalize`` (confirm, with ``override_value`` in the feature's units, or an exact
release; 400 ``Lock not found`` for an id that holds nothing). Any ``/v1`` route honours
an ``Idempotency-Key`` header (409 on a repeat; a 2xx, a 202 included, keeps the key). A
refund (negative track) never lifts a balance above the grant, and is answered 200.

It can be switched, while clients run, to refuse connections (its listening socket is
closed), to answer 503, to hang (optionally after applying the request, so that the
answer is what gets lost), or to fail open (checks answer ``202 allowed`` with no balance
and deduct nothing, finalizes answer 202); ``failopen_first`` fails open the first checks
of every new customer. It can add latency to every answer. Every track it receives is
counted by key, applied or not, so tests can prove "delivered exactly once".
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from agent_meter import Meter, Pricing
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import Strategy
from agent_meter.pricing import Plan

__all__ = [
    "RATES",
    "SECRET",
    "AutumnServer",
    "Mode",
    "arun_guarded",
    "autumn_meter",
    "pricing",
    "run_guarded",
]

SECRET = "am_sk_test_outage_helpers_fake_key"  # noqa: S105 - a fake key for a local server

# credits per unit, as in DESIGN.md §7 and the cassettes' seeded configuration
RATES = {"web_search": 1.0, "code_exec": 2.0, "llm_tokens": 0.001}
GRANT = 100.0
NANO = 1_000_000_000  # balances are kept in billionths of a credit, like the ledger

Mode = Literal["up", "refuse", "503", "hang", "failopen"]


def pricing() -> Pricing:
    """The catalogue the server bills by, for meters that should know it."""
    return Pricing(
        features={name: "metered" for name in RATES},
        credit_systems={"credits": dict(RATES)},
        plans={"agent_free": Plan(auto_enable=True, grants={"credits": GRANT})},
    )


def autumn_meter(
    server: AutumnServer, outbox: Path, strategy: Strategy = "reserve", *, timeout: float = 0.5
) -> Meter:
    """A meter on ``server`` through the real AutumnBackend: no retries, short back-off."""
    backend = AutumnBackend(
        SECRET, base_url=server.url, timeout=timeout, max_retries=0, backoff=0.01, max_backoff=0.02
    )
    return Meter(
        backend, pricing=pricing(), outbox=outbox, strategy=strategy, recover_on_start=False
    )


def _nano(credits: float) -> int:
    return round(credits * NANO)


@dataclass
class Stats:
    """What the server received, for assertions."""

    checks: int = 0
    tracks_received: Counter[str] = field(default_factory=Counter)
    """Every track request by idempotency key (duplicates and failed answers included)."""
    tracks_applied: Counter[str] = field(default_factory=Counter)
    """Tracks that changed a balance, by key: each must be 1."""
    duplicates: Counter[str] = field(default_factory=Counter)
    """Tracks answered 409 duplicate_idempotency_key, by key."""
    refused: int = 0
    """Requests answered 503 or left hanging."""
    failed_open: int = 0
    """Checks answered 202 without being evaluated."""
    locks: int = 0
    """Locks made (allowed lock checks)."""
    finalized: Counter[str] = field(default_factory=Counter)
    """Finalizes that settled a lock, by action."""
    finalize_log: list[tuple[str, str]] = field(default_factory=list)
    """(lock id, action) of every finalize that settled a lock, in order."""


class AutumnServer:
    """A local server that behaves like Autumn's v1 API for checks and tracks.

    Args:
        latency: Seconds added before every answer (the round trip to a real server).
        grant: Credits a customer gets on first sight.

    Example:
        >>> with AutumnServer() as server:
        ...     backend = AutumnBackend(SECRET, base_url=server.url, timeout=0.3)
        ...     server.set_mode("refuse")      # the outage starts
    """

    def __init__(
        self, *, latency: float = 0.0, grant: float = GRANT, failopen_first: int = 0
    ) -> None:
        self.latency = latency
        self.grant = grant
        self.failopen_first = failopen_first
        self._checks_seen: Counter[str] = Counter()
        self._locks: dict[str, tuple[str, int, str]] = {}  # lock id -> (customer, held, feature)
        self._header_keys: set[str] = set()
        self.stats = Stats()
        self.mode: Mode = "up"
        self.hang_after_apply = False
        self._balances: dict[str, int] = {}
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._release = threading.Event()  # ends every hang
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL to give ``AutumnBackend(base_url=...)``; fixed for the server's life."""
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> AutumnServer:
        """Listen (again, on the same port once one was chosen) and serve."""
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                owner._handle(self)

            do_GET = do_POST

            def log_message(self, format: str, *args: Any) -> None:
                return

        server = ThreadingHTTPServer(("127.0.0.1", self._port), Handler)
        server.daemon_threads = True
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )
        self._thread.start()
        return self

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()  # closes the listening socket: connections are refused
        if self._thread is not None:
            self._thread.join(timeout=5)

    def set_mode(self, mode: Mode, *, after_apply: bool = False) -> None:
        """Switch behaviour: ``up``, ``refuse`` connections, answer ``503``, or ``hang``.

        Args:
            mode: The new behaviour.
            after_apply: For ``hang``: apply the request to the ledger first, so that only
                the answer is lost (the client times out on a request that did land).
        """
        with self._lock:
            self.mode = mode
            self.hang_after_apply = after_apply
            if mode == "hang":
                self._release.clear()
            else:
                self._release.set()
        if mode == "refuse":
            self._stop_listening()
        elif self._server is None:
            self.start()

    def __enter__(self) -> AutumnServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self._closing.set()
        self._release.set()
        self._stop_listening()

    # -- the ledger ------------------------------------------------------------------------

    def balance(self, customer_id: str) -> float:
        """A customer's credits (the grant if never seen)."""
        with self._lock:
            return self._balances.get(customer_id, _nano(self.grant)) / NANO

    def set_balance(self, customer_id: str, credits: float) -> None:
        """Set a customer's credits (admin)."""
        with self._lock:
            self._balances[customer_id] = _nano(credits)

    def _customer(self, customer_id: str) -> int:
        return self._balances.setdefault(customer_id, _nano(self.grant))

    def open_locks(self) -> dict[str, float]:
        """Locks still holding credits, by id."""
        with self._lock:
            return {lock_id: entry[1] / NANO for lock_id, entry in self._locks.items()}

    def expire_lock(self, lock_id: str) -> None:
        """What Autumn does at a lock's ``expires_at``: release it (fact 19)."""
        with self._lock:
            customer_id, held, _ = self._locks.pop(lock_id)
            self._balances[customer_id] += held

    # -- requests --------------------------------------------------------------------------

    def _handle(self, request: BaseHTTPRequestHandler) -> None:
        length = int(request.headers.get("Content-Length") or 0)
        body = json.loads(request.rfile.read(length)) if length else {}
        path = request.path.split("?", 1)[0]
        if self.latency:
            time.sleep(self.latency)
        header_key = request.headers.get("Idempotency-Key")
        with self._lock:
            mode, after_apply = self.mode, self.hang_after_apply
            if path == "/v1/track":
                self.stats.tracks_received[str(body.get("idempotency_key"))] += 1
            if mode == "503" or (mode == "hang" and not after_apply):
                self.stats.refused += 1
                status, answer = 503, _error("service_unavailable", "Service unavailable")
            elif header_key is not None and header_key in self._header_keys:
                message = f"Another request with idempotency key {header_key} was received"
                status, answer = 409, _error("duplicate_idempotency_key", message)
            else:
                status, answer = self._failed_open(mode, path, body) or self._answer(
                    request.command, path, body
                )
                if header_key is not None and (status < 400 or status == 409):
                    self._header_keys.add(header_key)  # a 2xx, a 202 included, keeps its key
        if mode == "hang":
            # no answer until the mode changes or the server closes; the client times out
            self._release.wait(30)
            if self._closing.is_set():
                return
        data = json.dumps(answer).encode()
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data)
        except OSError:
            pass  # the client gave up (a timeout); nothing to tell it

    def _failed_open(
        self, mode: Mode, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]] | None:
        """Autumn's 202: the check is not evaluated, nothing is deducted or locked."""
        if path not in ("/v1/check", "/v1/balances.check", "/v1/balances.finalize"):
            return None
        customer_id = str(body.get("customer_id", ""))
        if path != "/v1/balances.finalize":
            self._checks_seen[customer_id] += 1
        first = path != "/v1/balances.finalize" and (
            self._checks_seen[customer_id] <= self.failopen_first
        )
        if mode != "failopen" and not first:
            return None
        if path == "/v1/balances.finalize":  # queued for replay by the server: applied later
            status, done = self._finalize(body)
            return (202, done) if status == 200 else (status, done)
        self.stats.failed_open += 1
        answer: dict[str, Any] = {
            "allowed": True,
            "customer_id": customer_id,
            "required_balance": body.get("required_balance", 1),
        }
        if path == "/v1/check":
            answer |= {"code": "feature_found", "feature_id": body.get("feature_id")}
        else:
            answer |= {"balance": None, "flag": None}
        return 202, answer

    def _answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path == "/v1/balances.check":
            return self._check_v2(body)
        if method == "POST" and path == "/v1/balances.finalize":
            return self._finalize(body)
        if method == "POST" and path == "/v1/customers.get_or_create":
            customer_id = str(body["customer_id"])
            return 200, {"id": customer_id, "balances": {"credits": self._v2_balance(customer_id)}}
        if method == "POST" and path == "/v1/check":
            return self._check(body)
        if method == "POST" and path == "/v1/track":
            return self._track(body)
        if method == "GET" and path.startswith("/v1/customers/"):
            customer_id = path.rsplit("/", 1)[1]
            credits = self._customer(customer_id) / NANO
            return 200, {
                "id": customer_id,
                "features": {
                    "credits": {"type": "single_use", "balance": credits, "unlimited": False}
                },
            }
        return 404, _error("not_found", f"{method} {path} not found")

    def _check(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.stats.checks += 1
        customer_id, feature_id = str(body["customer_id"]), str(body["feature_id"])
        if feature_id not in RATES:
            return 404, _error("feature_not_found", f"Feature {feature_id} not found")
        required = float(body.get("required_balance", 1))
        cost = _nano(required * RATES[feature_id])
        balance = self._customer(customer_id)
        allowed = balance >= cost
        if allowed and body.get("send_event"):
            balance -= cost
            self._balances[customer_id] = balance
        return 200, {
            "allowed": allowed,
            "code": "feature_found",
            "customer_id": customer_id,
            "feature_id": "credits",
            "required_balance": required,
            "interval": "month",
            "interval_count": 1,
            "unlimited": False,
            "balance": balance / NANO,
            "usage": (_nano(self.grant) - balance) / NANO,
            "included_usage": self.grant,
            "overage_allowed": False,
        }

    def _track(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        customer_id, feature_id = str(body["customer_id"]), str(body["feature_id"])
        key = str(body.get("idempotency_key"))
        if feature_id not in RATES:
            return 404, _error("feature_not_found", f"Feature {feature_id} not found")
        if key in self._keys:
            self.stats.duplicates[key] += 1
            return 409, _error(
                "duplicate_idempotency_key",
                f"Another request with idempotency key {key} has already been received",
            )
        self._keys.add(key)
        cost = _nano(float(body.get("value", 1)) * RATES[feature_id])
        balance = self._customer(customer_id)
        if cost > 0:
            self._balances[customer_id] = max(0, balance - cost)
        else:  # a refund stops at the grant, and is answered 200 all the same (fact 16)
            self._balances[customer_id] = balance + min(-cost, max(0, _nano(self.grant) - balance))
        self.stats.tracks_applied[key] += 1
        return 200, {
            "id": "placeholder",
            "code": "event_received",
            "customer_id": customer_id,
            "feature_id": "credits",
        }

    def _v2_balance(self, customer_id: str) -> dict[str, Any]:
        balance = self._customer(customer_id)
        return {
            "feature_id": "credits",
            "granted": self.grant,
            "remaining": balance / NANO,
            "usage": (_nano(self.grant) - balance) / NANO,
            "unlimited": False,
            "overage_allowed": False,
            "max_purchase": None,
            "next_reset_at": 1798831487482,
            "breakdown": [],
        }

    def _check_v2(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.stats.checks += 1
        customer_id, feature_id = str(body["customer_id"]), str(body["feature_id"])
        if feature_id not in RATES:
            return 404, _error("feature_not_found", f"Feature {feature_id} not found")
        if customer_id not in self._balances:  # v2 checks never create customers
            return 404, _error("customer_not_found", f"Customer {customer_id} not found")
        required = float(body.get("required_balance", 1))
        cost = _nano(required * RATES[feature_id])
        lock = body.get("lock") or {}
        lock_id = str(lock.get("lock_id", ""))
        if lock.get("enabled") and lock_id in self._locks:
            return 409, _error("lock_already_exists", "A lock with this ID already exists")
        balance = self._customer(customer_id)
        allowed = balance >= cost
        if allowed and lock.get("enabled"):
            self._balances[customer_id] = balance - cost
            self._locks[lock_id] = (customer_id, cost, feature_id)
            self.stats.locks += 1
        return 200, {
            "allowed": allowed,
            "customer_id": customer_id,
            "required_balance": cost / NANO,
            "balance": self._v2_balance(customer_id),
            "flag": None,
        }

    def _finalize(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        lock_id = str(body.get("lock_id"))
        entry = self._locks.pop(lock_id, None)
        if entry is None:
            return 400, _error("invalid_request", f"Lock not found for ID: {lock_id}")
        customer_id, held, feature_id = entry
        balance = self._balances[customer_id]
        if body.get("action") == "release":
            self._balances[customer_id] = balance + held  # exact, above the grant too
        elif body.get("override_value") is not None:
            # override_value is in the locked feature's units (fact 18)
            cost = _nano(float(body["override_value"]) * RATES[feature_id])
            self._balances[customer_id] = max(0, balance + held - cost)
        self.stats.finalized[str(body.get("action"))] += 1
        self.stats.finalize_log.append((lock_id, str(body.get("action"))))
        return 200, {"success": True}


def _error(code: str, message: str) -> dict[str, str]:
    return {"message": message, "code": code, "env": "sandbox"}


def run_guarded(meter: Meter, customer: str, call_id: str) -> str:
    """One guarded web_search that succeeds."""
    with meter.guard(customer, "web_search", call_id=call_id):
        return "ran"


async def arun_guarded(meter: Meter, customer: str, call_id: str) -> str:
    """Async :func:`run_guarded`."""
    async with meter.aguard(customer, "web_search", call_id=call_id):
        return "ran"
