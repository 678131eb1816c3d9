"""Autumn's v2 lock → finalize routes, over a thin httpx client.

A lock is a check that holds the units (``POST /v1/balances.check`` with ``lock``);
``POST /v1/balances.finalize`` then confirms it (charging the hold, or ``override_value``
in the feature's units) or releases it, exactly, above the plan's grant too. The facts
this client relies on are 11 and 13 to 19 of the cassettes' README:

- **A lock id is unique** per organisation: a second lock with the same id answers
  ``409 lock_already_exists`` and holds nothing more, and a denied lock leaves no
  receipt. So a lock request is retried with its own id, and a 409 on a retry means the
  earlier attempt was allowed and holds the units.
- **A lock finalizes once**: a second finalize, or one of a lock that was never created
  (denied, failed open) or has expired, answers ``400 Lock not found``. That answer is
  "nothing is held under this id any more", reported as ``False``.
- **Fail-open**: with a dependency down, a lock answers ``202 allowed`` with no balance
  and creates no lock (:class:`BackendUnavailable`, retried); a finalize answers ``202``
  after queueing itself for replay, which is an acknowledgement.
- **v2 checks never create customers** (404 ``customer_not_found``): customers are made
  with ``customers.get_or_create`` once per process, before their first lock.
- **The transport rules of the v1 path** (:mod:`agent_meter.backends.autumn_wire`): one
  deadline per request however slowly the answer drips, answers cut at 4 MiB, a 429's
  ``Retry-After`` waited for (or not at all past the back-off cap), an unreadable 2xx
  taken for a lost answer (retried; a finalize waits in the outbox, a lock is released by
  id), and no key in any exception raised.

Why httpx and not the official ``autumn-sdk``: the SDK builds and validates pydantic
models for every request and answer. Measured in the issue, that put a lock at 0.61 to 0.70
of the seed pattern's latency against 0.51 to 0.53 over plain HTTP; measured here
(``benchmarks/bench_lock_client.py``, same local server, no latency) the SDK's lock took
about 20 ms against about 2 ms for this client. The SDK also fails open on the client by
default (a 5xx or a timeout becomes a fake ``allowed=True``) and has no idempotency-key
parameter on track. Three JSON routes do not need it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from agent_meter.extras import require

require("autumn", "httpx", integration="agent_meter.backends.autumn_locks")

import httpx

from agent_meter.backends.autumn_wire import (
    V2_BALANCE,
    AnswerTooLarge,
    check_result,
    retry_after,
    retry_wait,
    status_class,
    wire,
)
from agent_meter.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CustomerNotFound,
)
from agent_meter.results import CheckResult

__all__ = ["DEFAULT_API_VERSION", "MAX_LOCK_SECONDS", "LockClient"]

logger = logging.getLogger("agent_meter.autumn")

DEFAULT_API_VERSION = "2.3.0"
"""The API version the lock cassettes were recorded with (autumn-sdk 1.2.0's default
``2.5.0`` was refused by that server)."""

MAX_LOCK_SECONDS = 86_400.0
"""Autumn refuses a lock ``expires_at`` more than one day ahead (fact 19)."""

_FAILED_OPEN = 202


@dataclass(frozen=True, slots=True)
class _V2Call:
    """One request to a v2 route, and what its answer means."""

    op: Literal["lock", "check", "finalize", "customer", "track"]
    path: str
    body: dict[str, Any]
    customer_id: str = ""
    feature_id: str = ""
    key: str | None = None  # an Idempotency-Key header

    def describe(self) -> str:
        if self.op == "finalize":
            return f"finalize ({self.body.get('action')}) of lock {self.body.get('lock_id')!r}"
        if self.op == "customer":
            return f"get_or_create of customer {self.customer_id!r}"
        return f"{self.op} of {self.feature_id!r} for {self.customer_id!r}"


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One attempt's outcome: an answer (status, body) or a classified failure."""

    status: int | None
    body: dict[str, Any]
    error: str = ""
    transient: bool = False
    cause: BaseException | None = None
    unsent: bool = False  # surely never reached Autumn (refused connection, 429, 503)
    retry_after: float | None = None  # seconds the server asked to wait
    earlier_landed: bool = False  # an earlier attempt of the same request may have landed

    @property
    def may_have_landed(self) -> bool:
        """It failed in a way that may have reached Autumn's ledger (a lost answer)."""
        return self.transient and not self.unsent and self.status != _FAILED_OPEN


class _Late(Exception):
    """The whole answer did not arrive before the request's deadline."""


class _Body:
    """Reads an answer against the request's deadline and the answer size cap.

    httpx's timeouts bound each read, not the answer: a server dripping a byte at a time
    would hold the caller for ever. Every chunk is checked against both limits.
    """

    __slots__ = ("_deadline", "data")

    def __init__(self, response: httpx.Response, deadline: float) -> None:
        too_large = AnswerTooLarge.announced(response.headers.get("Content-Length"))
        if too_large is not None:
            raise too_large
        self._deadline = deadline
        self.data = bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        AnswerTooLarge.check(len(self.data))
        if time.monotonic() > self._deadline:
            raise _Late


class LockClient:
    """The v2 routes a ``lock`` strategy needs: get_or_create, lock, finalize.

    Created and owned by :class:`~agent_meter.backends.autumn.AutumnBackend`, which shares
    its key, server, timeout and retry settings; the sync and async twins share every
    decision (the pure functions below) and differ only in how they carry a request.

    Args:
        key: Returns the secret key (never stored elsewhere, never printed).
        base_url: The Autumn server.
        api_version: Sent as ``x-api-version``.
        timeout: Seconds each attempt may take.
        max_retries: Retries after the first attempt of a transient failure.
        backoff: Base delay of the exponential back-off, in seconds.
        max_backoff: The longest wait between two attempts.
        redact: Makes an exception safe to chain (the key removed from its text).
    """

    def __init__(
        self,
        key: Any,
        base_url: str,
        *,
        api_version: str = DEFAULT_API_VERSION,
        timeout: float = 5.0,
        max_retries: int = 3,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        redact: Any = None,
    ) -> None:
        self._key = key
        self.base_url = base_url
        self.api_version = api_version
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._redact = redact or (lambda exc: exc)
        self._lock = threading.Lock()
        self._sync: httpx.Client | None = None
        self._async: httpx.AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._customers: set[str] = set()

    def __repr__(self) -> str:
        return f"LockClient(base_url={self.base_url!r}, api_version={self.api_version!r})"

    # -- transports --------------------------------------------------------------------

    def _headers(self, call: _V2Call) -> dict[str, str]:
        headers = {
            "authorization": f"Bearer {self._key()}",
            "x-api-version": self.api_version,
            "content-type": "application/json",
            "accept": "application/json",
        }
        if call.key is not None:
            headers["Idempotency-Key"] = call.key
        return headers

    def _client(self) -> httpx.Client:
        client = self._sync
        if client is None:
            with self._lock:
                if self._sync is None:
                    self._sync = httpx.Client(base_url=self.base_url, timeout=self.timeout)
                client = self._sync
        return client

    def _aclient(self) -> httpx.AsyncClient:
        loop = asyncio.get_running_loop()
        if self._async is None or self._async_loop is not loop:
            # an httpx async client belongs to the loop that used it first
            self._async = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout)
            self._async_loop = loop
        return self._async

    def _once(self, call: _V2Call) -> _Attempt:
        deadline = time.monotonic() + self.timeout
        try:
            with self._client().stream(
                "POST", f"/v1/{call.path}", json=call.body, headers=self._headers(call)
            ) as response:
                body = _Body(response, deadline)
                for chunk in response.iter_bytes():
                    body.add(chunk)
        except (httpx.HTTPError, AnswerTooLarge, _Late) as exc:
            return self._failed(exc)
        return _answer(response.status_code, bytes(body.data), response.headers)

    async def _aonce(self, call: _V2Call) -> _Attempt:
        try:  # the whole exchange under one deadline, as the sync twin
            return await asyncio.wait_for(self._aexchange(call), self.timeout)
        except asyncio.TimeoutError:
            return _Attempt(None, {}, "timed out", transient=True)

    async def _aexchange(self, call: _V2Call) -> _Attempt:
        deadline = time.monotonic() + self.timeout
        try:
            async with self._aclient().stream(
                "POST", f"/v1/{call.path}", json=call.body, headers=self._headers(call)
            ) as response:
                body = _Body(response, deadline)
                async for chunk in response.aiter_bytes():
                    body.add(chunk)
        except (httpx.HTTPError, AnswerTooLarge, _Late) as exc:
            return self._failed(exc)
        return _answer(response.status_code, bytes(body.data), response.headers)

    def _failed(self, exc: Exception) -> _Attempt:
        if isinstance(exc, AnswerTooLarge):
            return _Attempt(None, {}, f"unreadable answer ({exc})")
        if isinstance(exc, _Late):
            return _Attempt(None, {}, "timed out", transient=True)
        assert isinstance(exc, httpx.HTTPError)  # noqa: S101 - the three caught above
        return _transport_failure(exc, self._redact(exc))

    def _wait(self, call: _V2Call, attempt: _Attempt, number: int) -> float | None:
        """Seconds before the next attempt, or None to stop at this one."""
        if number >= self.max_retries or not _retry(call, attempt):
            return None
        return retry_wait(
            call.describe(),
            attempt.error or f"HTTP {attempt.status}",
            number,
            retries=self.max_retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            asked=attempt.retry_after,
        )

    def _send(self, call: _V2Call) -> tuple[_Attempt, int]:
        """Send with retries; returns the last attempt and how many were made."""
        landed = False
        for number in range(self.max_retries + 1):
            attempt = self._once(call)
            delay = self._wait(call, attempt, number)
            if delay is None:
                return replace(attempt, earlier_landed=landed), number + 1
            landed = landed or attempt.may_have_landed
            time.sleep(delay)
        raise AssertionError  # pragma: no cover - the loop always returns

    async def _asend(self, call: _V2Call) -> tuple[_Attempt, int]:
        """Async :meth:`_send`."""
        landed = False
        for number in range(self.max_retries + 1):
            attempt = await self._aonce(call)
            delay = self._wait(call, attempt, number)
            if delay is None:
                return replace(attempt, earlier_landed=landed), number + 1
            landed = landed or attempt.may_have_landed
            await asyncio.sleep(delay)
        raise AssertionError  # pragma: no cover - the loop always returns

    # -- the routes --------------------------------------------------------------------

    def ensure_customer(self, customer_id: str) -> None:
        """Create the customer once per process (v2 checks never create one)."""
        if customer_id in self._customers:
            return
        self.customer(customer_id)

    async def aensure_customer(self, customer_id: str) -> None:
        """Async :meth:`ensure_customer`."""
        if customer_id in self._customers:
            return
        call = _customer_call(customer_id)
        _read(call, *(await self._asend(call)))
        self._customers.add(customer_id)

    def lock(
        self,
        customer_id: str,
        feature_id: str,
        units: float,
        lock_id: str,
        *,
        expires_at: float | None = None,
        entity_id: str | None = None,
    ) -> CheckResult:
        """Hold ``units`` of ``feature_id`` under ``lock_id`` if the balance allows.

        Raises:
            BackendUnavailable: Autumn failed open (no lock was made) or stayed
                unreachable (``maybe_applied``: a lock may stand; release its id).
            CustomerNotFound, ConfigError, BackendError: as for a check.
        """
        self.ensure_customer(customer_id)
        call = _lock_call(customer_id, feature_id, units, lock_id, expires_at, entity_id)
        attempt, made = self._send(call)
        if _customer_missing(attempt):  # deleted since this process created it
            self._customers.discard(customer_id)
            self.ensure_customer(customer_id)
            attempt, made = self._send(call)
        return _lock_result(call, units, attempt, made, entity_id)

    async def alock(
        self,
        customer_id: str,
        feature_id: str,
        units: float,
        lock_id: str,
        *,
        expires_at: float | None = None,
        entity_id: str | None = None,
    ) -> CheckResult:
        """Async :meth:`lock`."""
        await self.aensure_customer(customer_id)
        call = _lock_call(customer_id, feature_id, units, lock_id, expires_at, entity_id)
        attempt, made = await self._asend(call)
        if _customer_missing(attempt):
            self._customers.discard(customer_id)
            await self.aensure_customer(customer_id)
            attempt, made = await self._asend(call)
        return _lock_result(call, units, attempt, made, entity_id)

    def check(self, customer_id: str, feature_id: str, units: float | None = None) -> CheckResult:
        """A plain v2 check (holds nothing); raises CustomerNotFound for unknown customers."""
        body: dict[str, Any] = {"customer_id": customer_id, "feature_id": feature_id}
        if units is not None:
            body["required_balance"] = wire(units)
        call = _V2Call("check", "balances.check", body, customer_id, feature_id)
        raw = _read(call, *self._send(call))
        return _check_result(call, units or 1.0, raw, None, deducted=False)

    def customer(self, customer_id: str) -> dict[str, Any]:
        """``customers.get_or_create``: the customer (created if new) with its balances."""
        call = _customer_call(customer_id)
        body = _read(call, *self._send(call))
        self._customers.add(customer_id)
        return body

    def finalize(self, lock_id: str, action: str, override_value: float | None = None) -> bool:
        """Confirm or release a lock.

        Returns:
            True when Autumn finalized it (or queued the finalize for replay: 202); False
            when no lock is held under ``lock_id`` (already finalized, never made, or
            expired).
        """
        call = _finalize_call(lock_id, action, override_value)
        return _finalized(call, *self._send(call))

    async def afinalize(
        self, lock_id: str, action: str, override_value: float | None = None
    ) -> bool:
        """Async :meth:`finalize`."""
        call = _finalize_call(lock_id, action, override_value)
        return _finalized(call, *(await self._asend(call)))

    def track(
        self, customer_id: str, feature_id: str, value: float, *, idempotency_key: str
    ) -> bool:
        """A v2 track keyed by the ``Idempotency-Key`` header.

        Returns:
            False when the key was seen before (409): counted once, nothing more.
        """
        body = {"customer_id": customer_id, "feature_id": feature_id, "value": wire(value)}
        call = _V2Call("track", "balances.track", body, customer_id, feature_id, idempotency_key)
        attempt, made = self._send(call)
        if attempt.status == 409 and attempt.body.get("code") == "duplicate_idempotency_key":
            return False
        _read(call, attempt, made)
        return True

    def close(self) -> None:
        """Close the sync client (an async one is closed by :meth:`aclose`)."""
        with self._lock:
            client, self._sync = self._sync, None
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        """Close both clients."""
        self.close()
        client, self._async = self._async, None
        if client is not None:
            await client.aclose()


# -- building requests and reading answers (pure) --------------------------------------


def _check_body(customer_id: str, feature_id: str, units: float) -> dict[str, Any]:
    return {"customer_id": customer_id, "feature_id": feature_id, "required_balance": wire(units)}


def _customer_call(customer_id: str) -> _V2Call:
    return _V2Call("customer", "customers.get_or_create", {"customer_id": customer_id}, customer_id)


def _lock_call(  # noqa: PLR0917 - the fields of one lock
    customer_id: str,
    feature_id: str,
    units: float,
    lock_id: str,
    expires_at: float | None,
    entity_id: str | None,
) -> _V2Call:
    body = _check_body(customer_id, feature_id, units)
    if entity_id is not None:
        body["entity_id"] = entity_id
    lock: dict[str, Any] = {"lock_id": lock_id, "enabled": True}
    if expires_at is not None:
        lock["expires_at"] = int(expires_at * 1000)  # Unix milliseconds
    body["lock"] = lock
    return _V2Call("lock", "balances.check", body, customer_id, feature_id)


def _finalize_call(lock_id: str, action: str, override_value: float | None) -> _V2Call:
    if action not in ("confirm", "release"):
        msg = f"a lock is finalized with 'confirm' or 'release', not {action!r}"
        raise ConfigError(msg)
    body: dict[str, Any] = {"lock_id": lock_id, "action": action}
    if override_value is not None and action == "confirm":
        body["override_value"] = wire(override_value)
    return _V2Call("finalize", "balances.finalize", body)


def _answer(status: int, content: bytes, headers: Mapping[str, str]) -> _Attempt:
    transient, unsent = status_class(status)
    asked = retry_after(headers.get("Retry-After"))
    try:
        body = json.loads(content) if content else {}
    except ValueError:
        if 200 <= status < 300:
            # not Autumn's answer (a proxy's page, a cut body): the request may have
            # landed, and every v2 request here is safe to repeat, so it is retried and
            # a finalize waits in the outbox rather than being set aside
            transient = True
        error = f"answer could not be read (HTTP {status}, not JSON)"
        return _Attempt(status, {}, error, transient, unsent=unsent, retry_after=asked)
    if not isinstance(body, dict):
        return _Attempt(status, {}, f"unexpected answer (HTTP {status})")
    return _Attempt(status, body, "", transient, unsent=unsent, retry_after=asked)


def _transport_failure(exc: httpx.HTTPError, cause: BaseException) -> _Attempt:
    if isinstance(exc, (httpx.ConnectTimeout, httpx.PoolTimeout)):
        return _Attempt(None, {}, "could not connect", True, cause, unsent=True)
    if isinstance(exc, httpx.TimeoutException):
        return _Attempt(None, {}, "timed out", True, cause)
    if isinstance(exc, httpx.ConnectError):
        return _Attempt(None, {}, "could not connect", True, cause, unsent=True)
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
        return _Attempt(None, {}, "connection failed", True, cause)
    if isinstance(exc, (httpx.InvalidURL, httpx.UnsupportedProtocol)):
        return _Attempt(None, {}, "url", False, cause)
    return _Attempt(None, {}, f"{type(exc).__name__}", True, cause)


def _retry(call: _V2Call, attempt: _Attempt) -> bool:
    """Whether to repeat a request: every v2 request here is safe to repeat.

    A lock is unique by id, a finalize finalizes once, get_or_create creates once, and a
    track is keyed. A fail-open lock made no lock, so it is worth asking again.
    """
    if attempt.transient:
        return True
    return call.op == "lock" and attempt.status == _FAILED_OPEN


def _customer_missing(attempt: _Attempt) -> bool:
    return attempt.status == 404 and attempt.body.get("code") == "customer_not_found"


def _read(call: _V2Call, attempt: _Attempt, made: int) -> dict[str, Any]:
    """The answer's body when it is a success, else the error it becomes."""
    if call.op in ("lock", "check") and attempt.status == _FAILED_OPEN:
        raise _error(call, attempt, made)
    if attempt.status is not None and 200 <= attempt.status < 300 and not attempt.error:
        return attempt.body
    raise _error(call, attempt, made) from attempt.cause


def _error(call: _V2Call, attempt: _Attempt, made: int) -> Exception:  # noqa: PLR0911
    code = str(attempt.body.get("code") or "")
    tries = f"after {made} attempt{'s' if made > 1 else ''}"
    if attempt.error == "url":
        return ConfigError(f"AutumnBackend base_url {call.path!r} is not a usable URL")
    if attempt.status == 401 or code == "invalid_secret_key":
        return BackendError(
            f"Autumn rejected the secret key (HTTP 401 invalid_secret_key) on the "
            f"{call.describe()}: check AUTUMN_SECRET_KEY (or secret_key=)"
        )
    if attempt.status == 404 and code == "feature_not_found":
        return ConfigError(
            f"Autumn has no feature {call.feature_id!r} (404 feature_not_found, "
            f"{call.describe()}): create it in Autumn or fix the feature id"
        )
    if attempt.status == 404 and code == "customer_not_found":
        return CustomerNotFound(call.customer_id, "Autumn")
    if attempt.status == _FAILED_OPEN:
        return BackendUnavailable(
            f"Autumn failed open (HTTP 202: it could not evaluate the {call.describe()}; "
            f"no lock was made) {tries}"
        )
    if attempt.transient:
        what = attempt.error or f"HTTP {attempt.status} {code}".strip()
        maybe = call.op == "lock" and attempt.may_have_landed
        return BackendUnavailable(
            f"Autumn is unavailable: {what} {tries} ({call.describe()})", maybe_applied=maybe
        )
    message = str(attempt.body.get("message") or attempt.error or "")
    status = f"HTTP {attempt.status} {code}".strip() if attempt.status else "no answer"
    return BackendError(f"Autumn failed the {call.describe()}: {status}: {message}")


def _lock_result(
    call: _V2Call, units: float, attempt: _Attempt, made: int, entity_id: str | None
) -> CheckResult:
    if attempt.status == 409 and attempt.body.get("code") == "lock_already_exists":
        if made > 1:
            # an earlier attempt of this very request made the lock (a denied lock leaves
            # no receipt), and its answer was lost: the units are held
            return CheckResult(
                allowed=True,
                customer_id=call.customer_id,
                feature_id=call.feature_id,
                required=float(units),
                balance_feature_id=call.feature_id,
                entity_id=entity_id,
                deducted=True,
            )
        msg = f"lock id {call.body['lock']['lock_id']!r} was used before: lock ids must be unique"
        raise BackendError(msg)
    return _check_result(call, units, _read(call, attempt, made), entity_id, deducted=True)


def _check_result(
    call: _V2Call,
    units: float,
    raw: Mapping[str, Any],
    entity_id: str | None,
    *,
    deducted: bool,
) -> CheckResult:
    """A v2 check answer as a CheckResult: ``balance`` is an object in v2."""
    return check_result(
        call.describe(),
        raw,
        V2_BALANCE,
        customer_id=call.customer_id,
        feature_id=call.feature_id,
        units=units,
        entity_id=entity_id,
        deducted=deducted,
    )


def _finalized(call: _V2Call, attempt: _Attempt, made: int) -> bool:
    message = str(attempt.body.get("message") or "")
    if attempt.status == 400 and message.startswith("Lock not found"):
        if attempt.earlier_landed:
            # an earlier attempt of this finalize may have settled the lock, its answer
            # lost: a lock finalizes once, so that is what this answer most likely says
            logger.info("agent_meter: %s settled by an earlier attempt", call.describe())
            return True
        return False
    body = _read(call, attempt, made)  # 200, or 202: queued by Autumn for replay
    return body.get("success") is not False
