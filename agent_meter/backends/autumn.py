"""Autumn as the billing backend, over autumn-py, with the wrapping DESIGN.md §2 asks for.

autumn-py carries the requests (sync :class:`autumn.Client` over requests, async
:class:`autumn.Autumn` over aiohttp): its URL, headers, ``X-Api-Version: 1.2.0`` and its
mapping of error bodies to :class:`autumn.error.AutumnHTTPError`. Around it this module
adds what autumn-py lacks:

- **One request per call, the whole answer.** ``CheckResponse`` drops ``required_balance``,
  ``usage``, ``included_usage`` and ``unlimited``, so checks go through autumn-py's own HTTP
  layer (``client.http.request``) with a model that keeps every field: still one request.
- **Timeouts** on both transports (requests has none by default): per request for
  requests, on the session for aiohttp.
- **Our own retries.** autumn-py's are off (``max_retries=0``: it retries POSTs on 5xx
  without looking at idempotency and then raises a private exception). Retries here use
  exponential back-off with jitter, and only where they cannot bill twice:

  ========================================  ========  ============  ==================
  failure                                   track     plain check   check, send_event
  ========================================  ========  ============  ==================
  connection refused, connect timeout       retried   retried       retried
  429, 503 (request refused, not run)       retried   retried       retried
  500, 502, 504, read timeout, reset        retried   retried       **not retried**
  ========================================  ========  ============  ==================

  Tracks always carry an idempotency key, so a retry of a track that did land answers
  409 ``duplicate_idempotency_key``, which is success. A check with ``send_event=True``
  deducts; given an ``idempotency_key`` it is sent with Autumn's ``Idempotency-Key``
  header (honoured by every ``/v1`` route, fact 15 of the cassettes' README) and is then
  retried like a track: a retry of a reserve that landed answers 409 and deducts nothing
  more. A 409 on a keyed reserve only says the key was *received* (a fail-open answer
  keeps its key too), so it leaves the reserve in doubt (``maybe_applied``). An unkeyed
  reserve is not retried after failures where it may have reached Autumn.
- **Fail-open answers are not answers.** When Autumn cannot evaluate a check in time it
  answers ``202 {"allowed": true}`` with no balance and deducts nothing, even with
  ``send_event=true`` (fact 13). A check answered that way raises
  :class:`BackendUnavailable` (never a reservation, so it is never refunded); a keyed
  reserve first retries with a fresh key, since the 202 used its key up.
- **Refunds stop at the grant.** Autumn never lifts a balance above the plan's grant
  with a negative track and still answers 200 (fact 16): a refund to a customer whose
  last seen balance was above its grant is logged. Use the ``lock`` strategy
  (:mod:`agent_meter.backends.autumn_locks`), whose releases are exact.
- **One error tree.** Every failure becomes an :class:`~agent_meter.errors.AgentMeterError`
  here, chained with ``from``: 401 → :class:`BackendError` (the server's message echoes
  the key's prefix, so it is never passed on), 404 ``feature_not_found`` →
  :class:`ConfigError`, 404 ``customer_not_found`` → :class:`CustomerNotFound`, 429/5xx
  after retries, timeouts and refused connections → :class:`BackendUnavailable`,
  anything else → :class:`BackendError`.
- **The key stays secret**: not in ``repr()``, logs, messages, nor in the chained causes
  (a cause whose text carries the key or its prefix is replaced by a redacted copy).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Literal, NoReturn, cast
from urllib.parse import quote

from agent_meter.extras import require

require(
    "autumn", "autumn", "aiohttp", "requests", "httpx", integration="agent_meter.backends.autumn"
)

import aiohttp
import autumn
import requests
from autumn.aio.client import AsyncClient
from autumn.aio.http import AsyncHTTPClient
from autumn.error import AutumnError, AutumnHTTPError
from autumn.http import _RetryRequestError
from pydantic import BaseModel, ConfigDict
from urllib3.exceptions import (
    ConnectTimeoutError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
)

from agent_meter.backends.autumn_locks import DEFAULT_API_VERSION, MAX_LOCK_SECONDS, LockClient
from agent_meter.backends.autumn_wire import (
    CHUNK,
    MAX_ANSWER_BYTES,
    V1_BALANCE,
    AnswerTooLarge,
    check_result,
    number,
    retry_after,
    retry_wait,
    status_class,
    wire,
)
from agent_meter.engine import CheckRequest, FinalizeRequest, Hold, TrackRequest, VoidReserve
from agent_meter.errors import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    CustomerNotFound,
    InvalidUsage,
)
from agent_meter.results import CatalogueEntry, CheckResult, TrackResult
from agent_meter.validation import (
    check_customer_id,
    check_entity_id,
    check_feature_id,
    check_units,
)

__all__ = ["MAX_ANSWER_BYTES", "AutumnBackend"]

logger = logging.getLogger("agent_meter.autumn")

KEY_ENV = "AUTUMN_SECRET_KEY"
URL_ENV = "AUTUMN_BASE_URL"
_SETUP = (
    "pass AutumnBackend(secret_key=...) or set the AUTUMN_SECRET_KEY environment variable "
    "(create a secret key in the Autumn dashboard under Developer > API keys)"
)
# Anything shaped like an Autumn secret key, whole or echoed in part ("am_sk_test_wron***").
_KEY_SHAPED = re.compile(r"am_sk_[A-Za-z0-9_*.\-]+")
_PREFIX_CHARS = 12


class _RawAnswer(BaseModel):
    """Keeps the whole JSON object autumn-py parsed, where its own models drop fields."""

    model_config = ConfigDict(extra="allow")

    def fields(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class _SecretKey:
    """Holds the key; prints as ``***`` wherever an object graph gets printed."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        msg = "the Autumn secret key is not picklable"
        raise TypeError(msg)


class _RedactedCause(Exception):
    """Stands in for a foreign exception whose text carried the secret key."""


@dataclass(slots=True)
class _Exchange:
    """One attempt: what it saw of the HTTP response, and the limits its answer must keep.

    Attributes:
        deadline: ``time.monotonic()`` by which the whole answer must have arrived.
        status: The HTTP status, for errors autumn-py reports without it.
        retry_after: Seconds the server asked to wait (``Retry-After``), if it did.
        received: Bytes of the body received so far (async transport).
    """

    deadline: float = float("inf")
    status: int | None = None
    retry_after: float | None = None
    received: int = 0

    def requests_hook(self, response: requests.Response, *args: object, **kwargs: object) -> None:
        """Runs once the headers are in, before requests reads the body: reads it here.

        requests' timeout bounds each read, not the answer: a server dripping a byte at a
        time would hold the caller forever. The body is read against the whole request's
        deadline, and never beyond :data:`MAX_ANSWER_BYTES`.
        """
        self.status = response.status_code
        self.retry_after = retry_after(response.headers.get("Retry-After"))
        too_large = AnswerTooLarge.announced(response.headers.get("Content-Length"))
        if too_large is not None:
            response.close()
            raise too_large
        sock = getattr(getattr(response.raw, "_connection", None), "sock", None)
        read = getattr(response.raw, "read1", response.raw.read)
        body = bytearray()
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                response.close()
                msg = "the whole answer did not arrive in time"
                raise requests.exceptions.ReadTimeout(msg)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.settimeout(remaining)
            # read1: whatever has arrived (read() would wait for the whole chunk)
            try:
                chunk = read(CHUNK, decode_content=True)
            except TypeError:  # a stand-in response (vcrpy's) without urllib3's keywords
                chunk = read(CHUNK)
            if not chunk:
                break
            body += chunk
            try:
                AnswerTooLarge.check(len(body))
            except AnswerTooLarge:
                response.close()
                raise
        response._content = bytes(body)  # what requests would have read, read by our rules
        response._content_consumed = True  # type: ignore[attr-defined]


async def _record_status(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceRequestEndParams,
) -> None:
    exchange = context.trace_request_ctx
    if isinstance(exchange, _Exchange):
        exchange.status = params.response.status
        exchange.retry_after = retry_after(params.response.headers.get("Retry-After"))


async def _count_chunk(
    session: aiohttp.ClientSession,
    context: SimpleNamespace,
    params: aiohttp.TraceResponseChunkReceivedParams,
) -> None:
    exchange = context.trace_request_ctx
    if isinstance(exchange, _Exchange):
        exchange.received += len(params.chunk)
        AnswerTooLarge.check(exchange.received)


class _KeyHeader(requests.auth.AuthBase):
    """Adds ``Idempotency-Key`` to one request.

    autumn-py takes no per-request headers, but its ``**kwargs`` reach requests, whose
    ``auth=`` may edit the prepared request (the cassettes' recorders' notes).
    """

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        request.headers["Idempotency-Key"] = self.key
        return request


def _key_middleware(key: str) -> Any:
    """The aiohttp twin of :class:`_KeyHeader`: a per-request client middleware."""

    async def add_key(
        request: aiohttp.ClientRequest, handler: aiohttp.ClientHandlerType
    ) -> aiohttp.ClientResponse:
        request.headers["Idempotency-Key"] = key
        return await handler(request)

    return add_key


@dataclass(frozen=True, slots=True)
class _Call:
    """One request to Autumn, and what a retry of it would risk."""

    op: Literal["check", "track", "customer", "catalogue", "probe", "fence"]
    method: str
    path: str
    body: dict[str, Any] | None
    customer_id: str = ""
    feature_id: str = ""
    deducts: bool = False  # a check that deducts: unkeyed, retried only when surely unsent
    key: str | None = None  # the Idempotency-Key header of a keyed reserve

    def describe(self) -> str:
        if self.op == "catalogue":
            return "listing features"
        if self.op == "customer":
            return f"reading customer {self.customer_id!r}"
        if self.op == "probe":
            return f"question whether reserve {self.key!r} reached Autumn"
        if self.op == "fence":
            return f"spending the key of reserve {self.key!r}"
        return f"{self.op} of {self.feature_id!r} for {self.customer_id!r}"


@dataclass(frozen=True, slots=True)
class _Failure:
    """One failed attempt, classified.

    ``transient`` failures may succeed on a retry; ``unsent`` ones surely never reached
    Autumn's ledger (refused connection, 429, 503), so even a deducting check may retry.
    """

    kind: str
    status: int | None = None
    code: str = ""
    message: str = ""
    transient: bool = False
    unsent: bool = False
    cause: BaseException | None = None
    retry_after: float | None = None


_PROBE_FEATURE = "agent_meter_probe_no_such_feature"
"""A feature no one has: a check of it under a reserve's key answers 409 when Autumn
holds the key, else 404, after which Autumn frees the key (see ``reserve_received``)."""

_FAILED_OPEN = _Failure("failopen", 202, transient=True, unsent=True)
"""Autumn answered ``202 allowed`` without evaluating the check: it deducted nothing."""


def _failed_open(call: _Call, status: int | None, raw: Mapping[str, Any]) -> bool:
    """Whether a check's answer is Autumn's fail-open 202 rather than a decision.

    The status is the sure sign; where a transport hides it, the v1.2 shape is: a metered
    feature answered ``allowed`` with no ``balance`` (a granted boolean reads balance 0).
    """
    if call.op != "check":
        return False
    if status == 202:
        return True
    return raw.get("allowed") is True and "balance" not in raw and raw.get("unlimited") is not True


def _next_key(call: _Call, key: str | None, failure: _Failure, attempt: int) -> str | None:
    """The key of the next attempt: the same, except after a 202, which used it up."""
    if key is None or call.key is None or failure.kind != "failopen":
        return key
    return f"{call.key}:fo{attempt + 1}"


class AutumnBackend:
    """Autumn (https://useautumn.com) as the billing backend, through autumn-py.

    Exactly one HTTP request per check and per track. The clients are created on first
    use and released by :meth:`close` / :meth:`aclose`.

    Args:
        secret_key: Autumn secret key; defaults to ``AUTUMN_SECRET_KEY``. Never printed.
        base_url: The Autumn server (a self-hosted one); defaults to ``AUTUMN_BASE_URL``,
            else autumn-py's ``https://api.useautumn.com``.
        timeout: Seconds each attempt may take, on both transports.
        max_retries: Retries after the first attempt for failures that a retry may cure
            (5xx, 429, timeouts, connection errors); see the module docstring for which
            ones a deducting check skips.
        backoff: Base delay in seconds: attempt ``n`` waits about ``backoff * 2**n``
            (with jitter, at most ``max_backoff``).
        max_backoff: The longest wait between two attempts.
        api_version: The Autumn API version of the v2 lock routes (strategy ``lock``).
        lock_expiry: Seconds after which Autumn releases a lock its process never
            finalized (a safety net; ``meter.recover()`` releases dead processes' locks
            first). At most one day, Autumn's limit; None sets no expiry.

    Raises:
        ConfigError: No key was given or found, or an option is out of range.

    Example:
        >>> backend = AutumnBackend()              # reads AUTUMN_SECRET_KEY
        >>> meter = Meter(backend, pricing=Pricing.from_file("pricing.toml"))
        >>> meter.verify()                         # every feature exists, right pool
    """

    service_name = "Autumn"
    keyed_reserves = True
    locks_by_default = True

    def __init__(
        self,
        secret_key: str | None = None,
        base_url: str | None = None,
        timeout: float = 5.0,
        max_retries: int = 3,
        *,
        backoff: float = 0.25,
        max_backoff: float = 8.0,
        api_version: str = DEFAULT_API_VERSION,
        lock_expiry: float | None = 3600.0,
    ) -> None:
        key = secret_key if secret_key is not None else os.environ.get(KEY_ENV)
        if not isinstance(key, str) or not key.strip():
            msg = f"AutumnBackend needs an Autumn secret key: {_SETUP}"
            raise ConfigError(msg)
        if not key.strip().isprintable() or any(c.isspace() for c in key.strip()):
            # such a key cannot be sent in a header, and the error saying so would quote it
            msg = (
                "the Autumn secret key contains whitespace or control characters (a pasted "
                f"line break?): {_SETUP}"
            )
            raise ConfigError(msg)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0:
            msg = f"AutumnBackend timeout must be a positive number of seconds, not {timeout!r}"
            raise ConfigError(msg)
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            msg = f"AutumnBackend max_retries must be an int >= 0, not {max_retries!r}"
            raise ConfigError(msg)
        if backoff < 0 or max_backoff < 0:
            msg = "AutumnBackend backoff and max_backoff must not be negative"
            raise ConfigError(msg)
        if lock_expiry is not None and not 0 < lock_expiry <= MAX_LOCK_SECONDS - 60:
            msg = (
                f"AutumnBackend lock_expiry must be between 0 and {MAX_LOCK_SECONDS - 60:.0f} "
                f"seconds (Autumn refuses more than one day ahead), not {lock_expiry!r}"
            )
            raise ConfigError(msg)
        self._key = _SecretKey(key.strip())
        self.base_url = (base_url or os.environ.get(URL_ENV) or autumn.BASE_URL).rstrip("/")
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self._lock = threading.Lock()
        self._sync: autumn.Client | None = None
        self._async: AsyncClient | None = None
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._above_grant: dict[str, bool] = {}  # customer -> last seen balance > grant
        self.api_version = api_version
        self.lock_expiry = lock_expiry
        secret = self._key.reveal
        self.locks = LockClient(
            secret,
            self.base_url,
            api_version=api_version,
            timeout=self.timeout,
            max_retries=max_retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            redact=lambda exc: _safe_cause(exc, secret()),
        )
        """The v2 lock routes (see :mod:`agent_meter.backends.autumn_locks`)."""

    @property
    def outbox_id(self) -> str:
        """Names this backend's default outbox: the server and the key, hashed.

        Usage queued for one Autumn organisation must never be delivered with another's key,
        so meters on different keys or servers never share an outbox by default.
        """
        identity = f"{self.base_url}\n{self._key.reveal()}".encode()
        return hashlib.sha256(identity).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"AutumnBackend(base_url={self.base_url!r}, timeout={self.timeout!r}, "
            f"max_retries={self.max_retries!r})"
        )

    # -- clients -----------------------------------------------------------------------

    def _sync_client(self) -> autumn.Client:
        client = self._sync
        if client is not None:
            return client
        with self._lock:
            self._ensure_open()
            if self._sync is None:
                self._sync = autumn.Client(
                    token=self._key.reveal(), base_url=self.base_url, max_retries=0
                )
            return self._sync

    def _async_client(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        client = self._async
        if client is not None and self._async_loop is loop:
            return client
        self._ensure_open()
        if client is not None:
            # An aiohttp session belongs to the loop that made it; that loop is gone
            # (asyncio.run called again), so its session cannot be closed from here.
            logger.warning("agent_meter: AutumnBackend used from a new event loop; new session")
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(_record_status)
        trace.on_response_chunk_received.append(_count_chunk)
        session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout), trace_configs=[trace]
        )
        self._async = AsyncClient(
            token=self._key.reveal(), base_url=self.base_url, max_retries=0, session=session
        )
        self._async_loop = loop
        return self._async

    def _ensure_open(self) -> None:
        if self._closed:
            msg = f"{self!r} is closed"
            raise BackendError(msg)

    # -- the drivers: one attempt at a time, retried by the same policy ------------------

    def _request(self, call: _Call) -> dict[str, Any]:
        self._ensure_open()
        client = self._sync_client()
        attempts = self.max_retries + 1
        key = call.key
        for attempt in range(attempts):
            exchange = _Exchange(deadline=time.monotonic() + self.timeout)
            extra: dict[str, Any] = {} if key is None else {"auth": _KeyHeader(key)}
            try:
                answer = client.http.request(
                    call.method,
                    call.path,
                    _RawAnswer,
                    json=call.body,
                    timeout=self.timeout,
                    hooks={"response": [exchange.requests_hook]},
                    **extra,
                )
            except Exception as exc:  # noqa: BLE001 - every foreign error is mapped below
                failure = _classify(exc, exchange.status, self._key.reveal())
                failure = replace(failure, retry_after=exchange.retry_after)
            else:
                fields = answer.fields()
                if not _failed_open(call, exchange.status, fields):
                    return fields
                failure = _FAILED_OPEN
            delay = self._wait(call, failure, attempt)
            if delay is None:
                break
            key = _next_key(call, key, failure, attempt)
            time.sleep(delay)
        raise _error(call, failure, attempt + 1, self.base_url, key) from failure.cause

    async def _arequest(self, call: _Call) -> dict[str, Any]:
        self._ensure_open()
        # AsyncClient inherits Client's annotation of .http; it holds the async one.
        http = cast("AsyncHTTPClient", self._async_client().http)
        attempts = self.max_retries + 1
        key = call.key
        for attempt in range(attempts):
            exchange = _Exchange()
            extra: dict[str, Any] = {} if key is None else {"middlewares": (_key_middleware(key),)}
            try:
                answer = await http.request(
                    call.method,
                    call.path,
                    _RawAnswer,
                    json=call.body,
                    trace_request_ctx=exchange,
                    **extra,
                )
            except Exception as exc:  # noqa: BLE001 - every foreign error is mapped below
                failure = _classify(exc, exchange.status, self._key.reveal())
                failure = replace(failure, retry_after=exchange.retry_after)
            else:
                fields = answer.fields()
                if not _failed_open(call, exchange.status, fields):
                    return fields
                failure = _FAILED_OPEN
            delay = self._wait(call, failure, attempt)
            if delay is None:
                break
            key = _next_key(call, key, failure, attempt)
            await asyncio.sleep(delay)
        raise _error(call, failure, attempt + 1, self.base_url, key) from failure.cause

    def _wait(self, call: _Call, failure: _Failure, attempt: int) -> float | None:
        """Seconds before the next attempt, or None to stop at this one."""
        if attempt >= self.max_retries or not failure.transient:
            return None
        if call.op == "probe" and not failure.unsent:
            return None  # a probe answered 2xx (fail-open) spent the key: not sent twice
        if not (failure.unsent or not call.deducts or call.key is not None):
            return None  # an unkeyed reserve that may have landed is not sent twice
        return retry_wait(
            call.describe(),
            _what(failure),
            attempt,
            retries=self.max_retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            asked=failure.retry_after,
        )

    # -- the protocol ------------------------------------------------------------------

    def check(self, request: CheckRequest) -> CheckResult:
        """Ask Autumn whether the customer may use ``required_balance`` units (one request).

        With ``send_event=True`` Autumn deducts atomically when it allows. Given an
        ``idempotency_key`` (unique across customers: Autumn scopes keys to the
        organisation) the reserve is sent with that ``Idempotency-Key`` header and retried
        like a track; without one it is not retried after failures where it may have
        reached Autumn. A fail-open answer (HTTP 202, no balance) is never taken for a
        decision: it raises :class:`BackendUnavailable`, after retries.

        Raises:
            InvalidUsage: An id or ``required_balance`` is malformed.
            ConfigError: Autumn does not know ``feature_id``.
            CustomerNotFound: Autumn does not know the customer (API versions that do not
                create customers on first use).
            BackendUnavailable: Autumn could not be reached, stayed overloaded, failed
                open, or a keyed reserve's outcome is unknown (``maybe_applied``).
            BackendError: Autumn refused the request (a wrong key, bad input).
        """
        call = _check_call(*_check_fields(request))
        answer = self._request(call)
        return self._seen(_check_result(call, answer, request.required_balance, request.entity_id))

    async def acheck(self, request: CheckRequest) -> CheckResult:
        """Async :meth:`check`, over aiohttp."""
        call = _check_call(*_check_fields(request))
        answer = await self._arequest(call)
        return self._seen(_check_result(call, answer, request.required_balance, request.entity_id))

    def _seen(self, result: CheckResult) -> CheckResult:
        """Remember whether the customer's balance stood above its grant (refunds stop there)."""
        if result.balance is not None and result.included_usage is not None:
            self._above_grant[result.customer_id] = result.balance > result.included_usage
        return result

    def _note_refund(self, customer_id: str, feature_id: str, value: float) -> None:
        if value < 0 and self._above_grant.get(customer_id):
            logger.warning(
                "agent_meter: refund of %s %s to %r sent while its balance stood above its "
                "plan's grant: Autumn caps refunds at the grant and answers 200 anyway, so it "
                "may be dropped (use strategy='lock' for exact releases)",
                -value,
                feature_id,
                customer_id,
            )

    def track(self, request: TrackRequest) -> TrackResult:
        """Record usage in Autumn (one request), once per idempotency key.

        A 409 ``duplicate_idempotency_key`` means Autumn already has this usage: the
        result is a success with ``duplicate=True``.

        Raises:
            InvalidUsage: An id, the key or ``value`` is malformed.
            ConfigError: Autumn does not know ``feature_id``.
            CustomerNotFound: Autumn does not know the customer.
            BackendUnavailable: Autumn could not be reached, or stayed overloaded.
            BackendError: Autumn refused the request.
        """
        call, result = _track_call(
            request.customer_id,
            request.feature_id,
            request.value,
            idempotency_key=request.idempotency_key,
            entity_id=request.entity_id,
            properties=request.properties,
        )
        self._note_refund(result.customer_id, result.feature_id, result.value)
        try:
            self._request(call)
        except _Duplicate:
            return _as_duplicate(result)
        return result

    async def atrack(self, request: TrackRequest) -> TrackResult:
        """Async :meth:`track`, over aiohttp."""
        call, result = _track_call(
            request.customer_id,
            request.feature_id,
            request.value,
            idempotency_key=request.idempotency_key,
            entity_id=request.entity_id,
            properties=request.properties,
        )
        self._note_refund(result.customer_id, result.feature_id, result.value)
        try:
            await self._arequest(call)
        except _Duplicate:
            return _as_duplicate(result)
        return result

    def reserve_received(self, request: VoidReserve) -> bool | None:
        """Whether Autumn received a keyed reserve whose answer was lost.

        Asks under the reserve's ``Idempotency-Key`` with a check of a feature no one has:
        Autumn's idempotency runs before the check, so a key it holds answers ``409``
        (received; whether it deducted, a 409 cannot say: fact 15), and a free key gets
        ``404 feature_not_found``, after which Autumn frees the key again (it keeps a key
        only for 2xx and 409 answers). So the question changes nothing and may be asked
        again: a lost answer cannot turn into a false "received".

        Returns:
            True when received; False when not (the key is still free: spend it with
            :meth:`spend_reserve_key`); None when not, and the question was answered
            2xx anyway (a fail-open 202), which spent the key.

        Raises:
            BackendUnavailable: Autumn did not answer; ask again later.
            BackendError: Autumn refused the question (a wrong key).
        """
        body = {
            "customer_id": request.customer_id,
            "feature_id": _PROBE_FEATURE,
            "required_balance": wire(request.units),
            "send_event": False,
            "with_preview": False,
        }
        call = _Call(
            "probe", "POST", "/check", body, request.customer_id, _PROBE_FEATURE, False,
            request.idempotency_key,
        )  # fmt: skip
        try:
            self._request(call)
        except _Duplicate:
            return True
        except ConfigError as exc:
            if "feature_not_found" not in str(exc):
                raise
            return False
        return None

    def spend_reserve_key(self, request: VoidReserve) -> None:
        """Take a reserve's key with a check that deducts nothing (a 409: already taken).

        Afterwards the reserve, should it still arrive, is answered 409 and deducts nothing.
        """
        call = _check_call(
            request.customer_id, request.feature_id, request.units, False, request.entity_id
        )
        with contextlib.suppress(_Duplicate):
            self._request(replace(call, op="fence", key=request.idempotency_key))

    # -- locks (strategy "lock", Autumn API v2) -----------------------------------------

    def _expires_at(self) -> float | None:
        return None if self.lock_expiry is None else time.time() + self.lock_expiry

    def lock(self, hold: Hold) -> CheckResult:
        """Hold ``hold.units`` under the lock id ``hold.key`` (``balances.check`` + ``lock``).

        The customer is created first, once per process. The lock carries an
        ``expires_at`` of ``lock_expiry`` seconds.

        Raises:
            BackendUnavailable: Autumn failed open (no lock) or could not be reached
                (``maybe_applied``: release the id to be sure nothing stays held).
        """
        self._ensure_open()
        return self.locks.lock(
            hold.customer_id,
            hold.feature_id,
            hold.units,
            hold.key,
            expires_at=self._expires_at(),
            entity_id=hold.entity_id,
        )

    async def alock(self, hold: Hold) -> CheckResult:
        """Async :meth:`lock`."""
        self._ensure_open()
        return await self.locks.alock(
            hold.customer_id,
            hold.feature_id,
            hold.units,
            hold.key,
            expires_at=self._expires_at(),
            entity_id=hold.entity_id,
        )

    def finalize(self, request: FinalizeRequest) -> bool:
        """Confirm (with ``override_value`` when given) or release a lock.

        Returns:
            False when Autumn holds nothing under the id (finalized before, never made,
            expired): nothing more to do.
        """
        self._ensure_open()
        return self.locks.finalize(request.lock_id, request.action, request.override_value)

    async def afinalize(self, request: FinalizeRequest) -> bool:
        """Async :meth:`finalize`."""
        self._ensure_open()
        return await self.locks.afinalize(request.lock_id, request.action, request.override_value)

    def close(self) -> None:
        """Close the sync client; the backend may not be used afterwards.

        An async session can only be closed on its event loop: use :meth:`aclose` when
        the async methods were used.
        """
        self._close_sync()
        self.locks.close()
        if self._async is not None:
            logger.warning("agent_meter: AutumnBackend.close() left an aiohttp session open")

    async def aclose(self) -> None:
        """Close both clients; the backend may not be used afterwards."""
        self._close_sync()
        await self.locks.aclose()
        client, self._async = self._async, None
        if client is not None:
            await client.close()  # type: ignore[no-untyped-call]

    def _close_sync(self) -> None:
        with self._lock:
            self._closed = True
            client, self._sync = self._sync, None
        if client is not None:
            client.http.close()  # type: ignore[no-untyped-call]

    # -- reports and start-up checks -----------------------------------------------------

    def balances(self, customer_id: str) -> dict[str, float | bool]:
        """A customer's balances in Autumn, by feature or pool id (``GET /v1/customers/<id>``).

        Booleans read True; unlimited balances read ``inf``.

        Raises:
            CustomerNotFound: Autumn does not know the customer.
        """
        call = _customer_call(customer_id)
        return _balances(self._request(call))

    async def abalances(self, customer_id: str) -> dict[str, float | bool]:
        """Async :meth:`balances`."""
        call = _customer_call(customer_id)
        return _balances(await self._arequest(call))

    def catalogue(self) -> dict[str, CatalogueEntry]:
        """Every feature Autumn bills, with the pool each draws from (``GET /v1/features``).

        autumn-py's ``features`` API only sets usage and balances, so the list is read
        through its HTTP layer. Used by :meth:`Meter.verify <agent_meter.Meter.verify>`.
        """
        call = _Call("catalogue", "GET", "/features", None)
        return _catalogue(self._request(call))


# -- building requests and reading answers (pure) --------------------------------------


class _Duplicate(Exception):
    """Internal: Autumn answered 409 duplicate_idempotency_key to a track."""


def _check_fields(
    request: CheckRequest,
) -> tuple[str, str, float, bool, str | None, str | None]:
    return (
        request.customer_id,
        request.feature_id,
        request.required_balance,
        request.send_event,
        request.entity_id,
        request.idempotency_key,
    )


def _check_call(  # noqa: PLR0917 - private; mirrors CheckRequest's fields in order
    customer_id: str,
    feature_id: str,
    required_balance: float,
    send_event: bool,
    entity_id: str | None,
    idempotency_key: str | None = None,
) -> _Call:
    customer_id = check_customer_id(customer_id)
    feature_id = check_feature_id(feature_id)
    entity_id = check_entity_id(entity_id)
    required = check_units(required_balance, feature_id=feature_id, customer_id=customer_id)
    # The same fields, in the same order, as autumn.Client.check sends.
    body: dict[str, Any] = {
        "customer_id": customer_id,
        "feature_id": feature_id,
        "required_balance": wire(required),
        "send_event": bool(send_event),
        "with_preview": False,
    }
    if entity_id is not None:
        body["entity_id"] = entity_id
    key = None
    if send_event and idempotency_key is not None:
        if not isinstance(idempotency_key, str) or not idempotency_key.strip():
            msg = f"reserve of {feature_id!r} for {customer_id!r} needs a non-empty idempotency_key"
            raise InvalidUsage(msg)
        key = idempotency_key
    return _Call("check", "POST", "/check", body, customer_id, feature_id, bool(send_event), key)


def _track_call(
    customer_id: str,
    feature_id: str,
    value: float,
    *,
    idempotency_key: str,
    entity_id: str | None,
    properties: Mapping[str, Any] | None,
) -> tuple[_Call, TrackResult]:
    customer_id = check_customer_id(customer_id)
    feature_id = check_feature_id(feature_id)
    entity_id = check_entity_id(entity_id)
    units = check_units(value, feature_id=feature_id, customer_id=customer_id, allow_negative=True)
    if not isinstance(idempotency_key, str) or not idempotency_key.strip():
        msg = f"track of {feature_id!r} for {customer_id!r} needs a non-empty idempotency_key"
        raise InvalidUsage(msg)
    body: dict[str, Any] = {
        "customer_id": customer_id,
        "feature_id": feature_id,
        "value": wire(units),
    }
    if entity_id is not None:
        body["entity_id"] = entity_id
    body["idempotency_key"] = idempotency_key
    if properties:
        body["properties"] = dict(properties)
    call = _Call("track", "POST", "/track", body, customer_id, feature_id)
    return call, TrackResult(customer_id, feature_id, units, idempotency_key)


def _customer_call(customer_id: str) -> _Call:
    customer_id = check_customer_id(customer_id)
    path = f"/customers/{quote(customer_id, safe='')}"
    return _Call("customer", "GET", path, None, customer_id)


def _as_duplicate(result: TrackResult) -> TrackResult:
    return TrackResult(
        result.customer_id, result.feature_id, result.value, result.idempotency_key, True
    )


def _check_result(
    call: _Call, raw: Mapping[str, Any], required_balance: float, entity_id: str | None
) -> CheckResult:
    """Autumn's v1.2 check answer as a CheckResult, every field it gives kept."""
    return check_result(
        call.describe(),
        raw,
        V1_BALANCE,
        customer_id=call.customer_id,
        feature_id=call.feature_id,
        units=required_balance,
        entity_id=entity_id,
        deducted=call.deducts,
    )


def _balances(raw: Mapping[str, Any]) -> dict[str, float | bool]:
    features = raw.get("features")
    balances: dict[str, float | bool] = {}
    if not isinstance(features, Mapping):
        return balances
    for feature_id, entry in features.items():
        if not isinstance(entry, Mapping):
            continue
        if entry.get("unlimited") is True:
            balances[feature_id] = float("inf")
        elif entry.get("type") in ("static", "boolean"):
            balances[feature_id] = True
        else:
            balances[feature_id] = number(entry.get("balance")) or 0.0
    return dict(sorted(balances.items()))


def _catalogue(raw: Mapping[str, Any]) -> dict[str, CatalogueEntry]:
    items = raw.get("list")
    if not isinstance(items, list):
        msg = "Autumn's feature list has no 'list' field"
        raise BackendError(msg)
    pools: dict[str, tuple[str, float | None]] = {}
    kinds: dict[str, tuple[str, bool]] = {}
    for item in items:
        if not isinstance(item, Mapping) or not isinstance(item.get("id"), str):
            continue
        kinds[item["id"]] = (str(item.get("type", "")), item.get("archived") is True)
        for rate in item.get("credit_schema") or ():
            if isinstance(rate, Mapping) and isinstance(rate.get("metered_feature_id"), str):
                pools[rate["metered_feature_id"]] = (item["id"], number(rate.get("credit_cost")))
    entries: dict[str, CatalogueEntry] = {}
    for feature_id, (kind, archived) in kinds.items():
        pool, cost = pools.get(feature_id, (None, None))
        if kind == "credit_system":
            entries[feature_id] = CatalogueEntry(feature_id, "credit_system", archived=archived)
        elif kind in ("boolean", "static"):
            entries[feature_id] = CatalogueEntry(feature_id, "boolean", archived=archived)
        else:  # metered, single_use, continuous_use
            entries[feature_id] = CatalogueEntry(feature_id, "metered", pool, cost, archived)
    return entries


# -- failures: classified once, for both transports (pure) -----------------------------


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend((item.__cause__, item.__context__))
        todo.extend(arg for arg in item.args if isinstance(arg, BaseException))
        reason = getattr(item, "reason", None)
        if isinstance(reason, BaseException):
            todo.append(reason)


def _redact(text: str, secret: str) -> str:
    text = text.replace(secret, "***")
    if len(secret) >= _PREFIX_CHARS:
        text = text.replace(secret[:_PREFIX_CHARS], "***")
    return _KEY_SHAPED.sub("am_sk_***", text)


def _safe_cause(exc: BaseException, secret: str) -> BaseException:
    """``exc`` itself, or a redacted stand-in when anything reachable from it holds the key.

    Not only its text: a requests exception keeps the request it failed (``.request``,
    with the ``Authorization`` header), an aiohttp one its ``request_info`` with headers.
    """
    probes = [secret] + ([secret[:_PREFIX_CHARS]] if len(secret) >= _PREFIX_CHARS else [])
    for item in _chain(exc):
        try:
            text = f"{item!s}\n{item!r}"
        except Exception:  # noqa: BLE001 - a broken __repr__ must not hide the real error
            text = ""
        leaks = any(probe in text for probe in probes) or _KEY_SHAPED.search(text)
        if leaks or _holds(item, probes, depth=4, seen=set()):
            name = f"{type(exc).__module__}.{type(exc).__qualname__}"
            return _RedactedCause(f"{name}: {_redact(str(exc), secret)} (redacted)")
    return exc


def _holds(obj: object, probes: list[str], *, depth: int, seen: set[int]) -> bool:
    """Whether ``obj`` or what it refers to (attributes, mappings, sequences) holds a probe."""
    if isinstance(obj, (str, bytes)):
        text = obj.decode("latin-1") if isinstance(obj, bytes) else obj
        return any(probe in text for probe in probes)
    if depth <= 0 or obj is None or isinstance(obj, (int, float, bool)) or id(obj) in seen:
        return False
    seen.add(id(obj))
    try:
        if isinstance(obj, Mapping):
            items: list[object] = [*obj.keys(), *obj.values()]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            items = list(obj)
        else:
            attributes = dict(getattr(obj, "__dict__", {}))
            for klass in type(obj).__mro__:
                for slot in getattr(klass, "__slots__", ()):
                    if isinstance(slot, str) and hasattr(obj, slot):
                        attributes[slot] = getattr(obj, slot)
            items = list(attributes.values())
            items.extend(getattr(obj, name, None) for name in ("headers", "request_info"))
    except Exception:  # noqa: BLE001 - an object that cannot be inspected is not trusted
        return True
    return any(_holds(item, probes, depth=depth - 1, seen=seen) for item in items)


def _classify(  # noqa: PLR0911, PLR0912 - one branch per family of failures, in order
    exc: Exception, status: int | None, secret: str
) -> _Failure:
    """Map whatever autumn-py or its transport raised to a classified failure."""
    cause = _safe_cause(exc, secret)
    if isinstance(exc, AutumnHTTPError):
        if exc.status_code == 409 and exc.code == "duplicate_idempotency_key":
            return _Failure("duplicate", 409, exc.code)
        transient, unsent = status_class(exc.status_code)
        message = _redact(str(exc.message or ""), secret)
        if exc.status_code == 401 or exc.code == "invalid_secret_key":
            return _Failure("auth", exc.status_code, exc.code, "", cause=None)
        kind = "overloaded" if transient else "http"
        return _Failure(kind, exc.status_code, exc.code, message, transient, unsent, cause)
    if isinstance(exc, _RetryRequestError):  # autumn-py's word for 500-504
        transient, unsent = status_class(status or 500)
        return _Failure("overloaded", status, transient=True, unsent=unsent, cause=cause)
    if isinstance(exc, AnswerTooLarge):
        return _Failure("unreadable", status, message=str(exc), cause=cause)
    if isinstance(exc, (requests.JSONDecodeError, json.JSONDecodeError, aiohttp.ContentTypeError)):
        if isinstance(exc, aiohttp.ContentTypeError):
            status = status or exc.status
        transient, unsent = status_class(status)
        kind = "overloaded" if transient else "unreadable"
        return _Failure(kind, status, transient=transient, unsent=unsent, cause=cause)
    if isinstance(
        exc,
        (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
         requests.exceptions.InvalidSchema, aiohttp.InvalidURL),
    ):  # fmt: skip
        return _Failure("url", cause=cause)
    if isinstance(exc, (requests.Timeout, ReadTimeoutError)):
        # urllib3's own ReadTimeoutError: raised unwrapped while the answer's body is read
        # against the request's deadline (``_Exchange.requests_hook``)
        unsent = isinstance(exc, requests.ConnectTimeout)
        return _Failure("timeout", transient=True, unsent=unsent, cause=cause)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        unsent = isinstance(exc, aiohttp.ConnectionTimeoutError)
        return _Failure("timeout", transient=True, unsent=unsent, cause=cause)
    if isinstance(exc, requests.ConnectionError):
        unsent = any(isinstance(e, (NewConnectionError, ConnectTimeoutError)) for e in _chain(exc))
        return _Failure("connection", transient=True, unsent=unsent, cause=cause)
    if isinstance(exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)):
        unsent = isinstance(exc, (aiohttp.ClientConnectorError, ConnectionRefusedError))
        return _Failure("connection", transient=True, unsent=unsent, cause=cause)
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, ProtocolError)):
        return _Failure("connection", transient=True, cause=cause)
    if isinstance(exc, AutumnError):
        return _Failure("protocol", code=str(exc.code), cause=cause)
    return _Failure("unexpected", cause=cause)


def _what(failure: _Failure) -> str:  # noqa: PLR0911 - one phrase per kind of failure
    """A short phrase for what went wrong, safe to log."""
    if failure.kind == "failopen":
        return "failed open (HTTP 202: Autumn did not evaluate the check; nothing deducted)"
    if failure.kind in ("overloaded", "http") and failure.status is not None:
        code = f" {failure.code}" if failure.code else ""
        return f"HTTP {failure.status}{code}"
    if failure.kind == "overloaded":
        return "HTTP 5xx"
    if failure.kind == "timeout":
        return "timed out"
    if failure.kind == "connection":
        return "could not connect" if failure.unsent else "connection failed"
    if failure.kind == "unreadable":
        status = f"HTTP {failure.status}, " if failure.status else ""
        return f"unreadable answer ({status}{failure.message or 'not JSON'})"
    cause = failure.cause
    return f"{failure.kind}: {type(cause).__name__ if cause else 'error'}"


def _error(  # noqa: PLR0911 - one error per kind of failure
    call: _Call, failure: _Failure, attempts: int, base_url: str, key: str | None = None
) -> Exception:
    """The error of ours that a final failure becomes (``key``: the last attempt's)."""
    if failure.kind == "duplicate" and call.op in ("track", "probe", "fence"):
        return _Duplicate()
    if failure.kind == "duplicate" and call.key is not None:
        # The key was received before; a fail-open answer keeps its key too (fact 15), so
        # this says nothing about whether that reserve deducted.
        return BackendUnavailable(
            f"Autumn had already received this reserve's key (409 duplicate_idempotency_key, "
            f"{call.describe()}); whether it deducted is unknown",
            maybe_applied=True,
            reserve_key=key,
        )
    if failure.kind == "auth":
        return BackendError(
            f"Autumn rejected the secret key (HTTP 401 invalid_secret_key) on the "
            f"{call.describe()}: check AUTUMN_SECRET_KEY (or secret_key=) and that the key "
            "belongs to this Autumn environment (sandbox or production)"
        )
    if failure.kind == "http" and failure.status == 404:
        if failure.code == "feature_not_found":
            return ConfigError(
                f"Autumn has no feature {call.feature_id!r} (404 feature_not_found, "
                f"{call.describe()}): create it in Autumn or fix the feature id"
            )
        if failure.code == "customer_not_found":
            return CustomerNotFound(call.customer_id, "Autumn")
    if failure.kind == "url":
        return ConfigError(f"AutumnBackend base_url {base_url!r} is not a usable URL")
    tries = f"after {attempts} attempt{'s' if attempts > 1 else ''}"
    if failure.kind == "unreadable" and call.op == "track":
        # not Autumn's answer (a proxy's HTML page, a cut body): the track may or may not
        # have landed, and its key makes sending it again safe, so it waits in the outbox
        return BackendUnavailable(
            f"Autumn's answer could not be read: {_what(failure)} {tries} ({call.describe()})"
        )
    if failure.transient:
        note = ""
        if call.deducts and not failure.unsent:
            note = (
                "; this keyed reserve may have reached Autumn"
                if call.key is not None
                else "; not retried: this check deducts and may have reached Autumn"
            )
        return BackendUnavailable(
            f"Autumn is unavailable: {_what(failure)} {tries} ({call.describe()}{note})",
            maybe_applied=bool(note),
            reserve_key=key if note else None,
        )
    detail = f": {failure.message}" if failure.message else ""
    return BackendError(f"Autumn failed the {call.describe()}: {_what(failure)}{detail}")
