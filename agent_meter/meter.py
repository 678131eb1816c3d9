"""The meter: check → work → track around any call, for one backend.

:class:`Meter` drives the pure decisions of :mod:`agent_meter.engine` against a backend,
synchronously (:meth:`Meter.guard`) or asynchronously (:meth:`Meter.aguard`). Every
integration (LangChain tools, callbacks, middleware, OpenAI) is a thin adapter over it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from contextvars import Token
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agent_meter import engine
from agent_meter.backends.base import AsyncBackend, Backend
from agent_meter.context import CustomerRef, bind_customer, unbind_customer
from agent_meter.engine import Admission, FailPolicy, MeteredCall, Strategy, TrackRequest
from agent_meter.errors import BackendError, ConfigError, InvalidUsage
from agent_meter.keys import new_call_id
from agent_meter.pricing import FeatureType, Pricing
from agent_meter.results import CheckResult, TrackResult
from agent_meter.tokens import TokenFeatures, TokenUsage
from agent_meter.validation import check_customer_id, check_entity_id, check_feature_id, check_units

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool

    from agent_meter.langchain.callbacks import MeteringCallbackHandler
    from agent_meter.langchain.tools import MeteredTool

__all__ = ["AsyncGuard", "CustomerScope", "Guard", "GuardedCall", "Meter"]

logger = logging.getLogger("agent_meter")


class Meter:
    """Guards calls against a billing backend: check → work → track.

    Args:
        backend: Implements :class:`~agent_meter.backends.Backend` and its async twin
            (every backend shipped does).
        strategy: ``"reserve"`` (deduct atomically up front, refund on failure; no
            concurrent overspend) or ``"check_then_track"`` (Autumn's literal pattern).
        on_backend_error: ``"deny"`` refuses a call whose check the backend cannot answer;
            ``"allow"`` runs it and bills it afterwards.
        pricing: The feature catalogue, when the backend does not carry one; lets the
            meter refuse unknown features and know which features are boolean.

    Example:
        >>> meter = Meter(SQLiteBackend("usage.db", pricing=pricing))
        >>> with meter.guard("cus_1", "code_exec", call_id="call_42"):
        ...     run_code()          # returns: billed; raises: refunded and re-raised
    """

    def __init__(
        self,
        backend: Backend | AsyncBackend,
        *,
        strategy: Strategy = "reserve",
        on_backend_error: FailPolicy = "deny",
        pricing: Pricing | None = None,
    ) -> None:
        if strategy not in engine.STRATEGIES:
            msg = f"strategy must be one of {engine.STRATEGIES}, not {strategy!r}"
            raise ConfigError(msg)
        if on_backend_error not in engine.FAIL_POLICIES:
            msg = (
                f"on_backend_error must be one of {engine.FAIL_POLICIES}, not {on_backend_error!r}"
            )
            raise ConfigError(msg)
        self.backend = backend
        self.strategy: Strategy = strategy
        self.on_backend_error: FailPolicy = on_backend_error
        self.pricing = pricing if pricing is not None else getattr(backend, "pricing", None)
        self._undelivered: list[TrackRequest] = []

    def __repr__(self) -> str:
        return (
            f"Meter({self.backend!r}, strategy={self.strategy!r}, "
            f"on_backend_error={self.on_backend_error!r})"
        )

    # -- building calls ------------------------------------------------------------------

    def feature_type(self, feature_id: str) -> FeatureType | None:
        """The type of ``feature_id`` when the catalogue is known, else None.

        Raises:
            ConfigError: The catalogue is known and does not declare ``feature_id``.
        """
        if self.pricing is None:
            return None
        kind = self.pricing.feature_type(feature_id)
        if kind is None:
            known = ", ".join(sorted(self.pricing.features))
            msg = f"unknown feature {feature_id!r}: the pricing declares {known}"
            raise ConfigError(msg)
        return kind

    def metered_call(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        call_id: str | None = None,
        entity_id: str | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
    ) -> MeteredCall:
        """Validate the parts of a guarded call and assemble them (no I/O).

        Raises:
            InvalidUsage: A malformed id or units.
            ConfigError: An unknown feature, strategy or policy.
        """
        customer_id = check_customer_id(customer_id)
        feature_id = check_feature_id(feature_id)
        entity_id = check_entity_id(entity_id)
        units = check_units(units, feature_id=feature_id, customer_id=customer_id)
        if call_id is not None and (not isinstance(call_id, str) or not call_id):
            msg = f"call_id for {feature_id!r} must be a non-empty string, not {call_id!r}"
            raise InvalidUsage(msg)
        strategy = strategy or self.strategy
        policy = on_backend_error or self.on_backend_error
        if strategy not in engine.STRATEGIES or policy not in engine.FAIL_POLICIES:
            msg = f"unknown strategy {strategy!r} or on_backend_error {policy!r}"
            raise ConfigError(msg)
        return MeteredCall(
            customer_id=customer_id,
            feature_id=feature_id,
            units=units,
            call_id=call_id or new_call_id(),
            entity_id=entity_id,
            strategy=strategy,
            on_backend_error=policy,
            gate_only=self.feature_type(feature_id) is FeatureType.BOOLEAN,
        )

    def _track_request(  # noqa: PLR0917 - private, mirrors track()'s parameters in order
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        idempotency_key: str | None,
        entity_id: str | None,
        properties: Mapping[str, Any] | None,
    ) -> TrackRequest:
        customer_id = check_customer_id(customer_id)
        feature_id = check_feature_id(feature_id)
        entity_id = check_entity_id(entity_id)
        value = check_units(
            value, feature_id=feature_id, customer_id=customer_id, allow_negative=True
        )
        if self.feature_type(feature_id) is FeatureType.BOOLEAN:
            msg = f"{feature_id!r} is a boolean feature: it is checked, never tracked"
            raise InvalidUsage(msg)
        if idempotency_key is not None and (
            not isinstance(idempotency_key, str) or not idempotency_key
        ):
            msg = f"idempotency_key for {feature_id!r} must be a non-empty string"
            raise InvalidUsage(msg)
        call = MeteredCall(
            customer_id, feature_id, value, idempotency_key or new_call_id(), entity_id
        )
        return TrackRequest(
            customer_id, feature_id, value, call.key("track"), entity_id, properties
        )

    # -- check and track -------------------------------------------------------------------

    def check(
        self, customer_id: str, feature_id: str, units: float = 1, *, entity_id: str | None = None
    ) -> CheckResult:
        """Ask whether ``customer_id`` may use ``units`` of ``feature_id``; deducts nothing."""
        call = self.metered_call(customer_id, feature_id, units, entity_id=entity_id)
        return self.backend.check(  # type: ignore[union-attr]
            call.customer_id, call.feature_id, required_balance=call.units, entity_id=entity_id
        )

    async def acheck(
        self, customer_id: str, feature_id: str, units: float = 1, *, entity_id: str | None = None
    ) -> CheckResult:
        """Async :meth:`check`."""
        call = self.metered_call(customer_id, feature_id, units, entity_id=entity_id)
        return await self.backend.acheck(  # type: ignore[union-attr]
            call.customer_id, call.feature_id, required_balance=call.units, entity_id=entity_id
        )

    def track(
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        *,
        idempotency_key: str | None = None,
        entity_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> TrackResult:
        """Record ``value`` units of usage (a batch: 1,830 tokens is one track).

        Args:
            customer_id: Who pays.
            feature_id: The metered feature (never the credit pool: the backend converts).
            value: Units used; negative refunds.
            idempotency_key: Names this usage: the same key for the same customer and
                feature is recorded once, however often it is sent. Scoped to the customer
                and feature before it reaches the backend. Generated when omitted.
            entity_id: Sub-scope of the customer.
            properties: Free-form details stored with the event.
        """
        request = self._track_request(
            customer_id, feature_id, value, idempotency_key, entity_id, properties
        )
        return self._send(request)

    async def atrack(
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        *,
        idempotency_key: str | None = None,
        entity_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> TrackResult:
        """Async :meth:`track`."""
        request = self._track_request(
            customer_id, feature_id, value, idempotency_key, entity_id, properties
        )
        return await self._asend(request)

    # -- the drivers -------------------------------------------------------------------

    def _admit(self, call: MeteredCall) -> Admission:
        request = engine.admission(call)
        try:
            result = self.backend.check(  # type: ignore[union-attr]
                request.customer_id, request.feature_id, **request.kwargs()
            )
        except ConfigError:
            raise
        except BackendError as exc:
            return engine.admit_unverified(call, exc)
        return engine.admit(call, result)

    async def _aadmit(self, call: MeteredCall) -> Admission:
        request = engine.admission(call)
        try:
            result = await self.backend.acheck(  # type: ignore[union-attr]
                request.customer_id, request.feature_id, **request.kwargs()
            )
        except ConfigError:
            raise
        except BackendError as exc:
            return engine.admit_unverified(call, exc)
        return engine.admit(call, result)

    def _send(self, request: TrackRequest) -> TrackResult:
        return self.backend.track(  # type: ignore[union-attr]
            request.customer_id, request.feature_id, request.value, **request.kwargs()
        )

    async def _asend(self, request: TrackRequest) -> TrackResult:
        return await self.backend.atrack(  # type: ignore[union-attr]
            request.customer_id, request.feature_id, request.value, **request.kwargs()
        )

    def _settle(self, requests: tuple[TrackRequest, ...]) -> None:
        for request in requests:
            try:
                self._send(request)
            except BackendError as exc:
                self._keep(request, exc)

    async def _asettle(self, requests: tuple[TrackRequest, ...]) -> None:
        for request in requests:
            try:
                await self._asend(request)
            except BackendError as exc:
                self._keep(request, exc)

    def _keep(self, request: TrackRequest, exc: BackendError) -> None:
        logger.warning(
            "agent_meter: track %s of %s for %s not delivered (%s); kept for flush()",
            request.idempotency_key,
            request.feature_id,
            request.customer_id,
            exc,
        )
        self._undelivered.append(request)

    def flush(self) -> int:
        """Send again the tracks the backend did not acknowledge; return how many remain."""
        pending, self._undelivered = self._undelivered, []
        self._settle(tuple(pending))
        return len(self._undelivered)

    async def aflush(self) -> int:
        """Async :meth:`flush`."""
        pending, self._undelivered = self._undelivered, []
        await self._asettle(tuple(pending))
        return len(self._undelivered)

    # -- guards ----------------------------------------------------------------------------

    def guard(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        call_id: str | None = None,
        entity_id: str | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
    ) -> Guard:
        """Guard a block: admitted or refused on entry, billed only if it succeeds.

        Args:
            customer_id: Who pays (from trusted server-side context).
            feature_id: The metered (or boolean) feature the block uses.
            units: Units the block uses (a batch: 20 URLs is 20); an estimate when the
                block reports the real count with :meth:`GuardedCall.bill`.
            call_id: Names the call in idempotency keys (a tool_call_id); generated when
                omitted.
            entity_id: Sub-scope of the customer.
            strategy: Overrides the meter's strategy for this call.
            on_backend_error: Overrides the meter's fail policy for this call.

        Raises:
            UsageLimitExceeded: On entry, when the customer may not use the feature.
            BackendError: On entry, when the check failed and the policy is ``deny``.

        Example:
            >>> with meter.guard("cus_1", "web_search", units=len(urls)) as call:
            ...     pages = fetch(urls)
        """
        return Guard(
            self,
            self.metered_call(
                customer_id,
                feature_id,
                units,
                call_id=call_id,
                entity_id=entity_id,
                strategy=strategy,
                on_backend_error=on_backend_error,
            ),
        )

    def aguard(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        call_id: str | None = None,
        entity_id: str | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
    ) -> AsyncGuard:
        """Async :meth:`guard`, for ``async with``."""
        return AsyncGuard(
            self,
            self.metered_call(
                customer_id,
                feature_id,
                units,
                call_id=call_id,
                entity_id=entity_id,
                strategy=strategy,
                on_backend_error=on_backend_error,
            ),
        )

    def gate(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        entity_id: str | None = None,
    ) -> Admission:
        """Admit or refuse a use without reserving (the LLM gate): check, never deduct.

        Raises:
            UsageLimitExceeded: The customer has less than ``units`` left.
            BackendError: The check failed and the fail policy is ``deny``.
        """
        call = self.metered_call(
            customer_id, feature_id, units, entity_id=entity_id, strategy="check_then_track"
        )
        return self._admit(call)

    async def agate(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        entity_id: str | None = None,
    ) -> Admission:
        """Async :meth:`gate`."""
        call = self.metered_call(
            customer_id, feature_id, units, entity_id=entity_id, strategy="check_then_track"
        )
        return await self._aadmit(call)

    def _token_requests(
        self,
        customer_id: str,
        usage: TokenUsage,
        call_id: str,
        features: TokenFeatures,
        entity_id: str | None,
    ) -> list[TrackRequest]:
        properties = {"model": usage.model} if usage.model else None
        return [
            self._track_request(customer_id, feature_id, tokens, call_id, entity_id, properties)
            for feature_id, tokens in features.values(usage)
        ]

    def track_tokens(
        self,
        customer_id: str,
        usage: TokenUsage,
        *,
        call_id: str,
        features: TokenFeatures | None = None,
        entity_id: str | None = None,
    ) -> list[TrackResult]:
        """Bill one LLM call's tokens as batch values, keyed by ``call_id`` (the run id).

        The same ``call_id`` is billed once however often it is reported.
        """
        requests = self._token_requests(
            customer_id, usage, call_id, features or TokenFeatures(), entity_id
        )
        return [self._send(request) for request in requests]

    async def atrack_tokens(
        self,
        customer_id: str,
        usage: TokenUsage,
        *,
        call_id: str,
        features: TokenFeatures | None = None,
        entity_id: str | None = None,
    ) -> list[TrackResult]:
        """Async :meth:`track_tokens`."""
        requests = self._token_requests(
            customer_id, usage, call_id, features or TokenFeatures(), entity_id
        )
        return [await self._asend(request) for request in requests]

    # -- integrations (thin adapters, imported on use) -----------------------------------

    def wrap_tool(
        self, tool: BaseTool, feature_id: str, units: Any = 1, **options: Any
    ) -> MeteredTool:
        """Wrap a LangChain tool so every call is checked and only successes are billed.

        See :func:`agent_meter.langchain.tools.wrap_tool` for the options.
        """
        from agent_meter.langchain.tools import wrap_tool  # noqa: PLC0415 - optional extra

        return wrap_tool(self, tool, feature_id, units, **options)

    def wrap_tools(
        self, tools: Sequence[BaseTool], features: Mapping[str, str], **options: Any
    ) -> list[MeteredTool]:
        """Wrap several LangChain tools; ``features`` maps each tool name to its feature."""
        from agent_meter.langchain.tools import wrap_tools  # noqa: PLC0415 - optional extra

        return wrap_tools(self, tools, features, **options)

    def metered(self, feature_id: str, units: Any = 1, **options: Any) -> Any:
        """Decorate a plain sync or async function so each call is guarded."""
        from agent_meter.langchain.tools import metered  # noqa: PLC0415

        return metered(self, feature_id, units, **options)

    def callback_handler(
        self,
        feature_id: str | None = "llm_tokens",
        input_feature_id: str | None = None,
        output_feature_id: str | None = None,
        **options: Any,
    ) -> MeteringCallbackHandler:
        """A LangChain callback handler that meters (and gates) an agent's LLM tokens."""
        from agent_meter.langchain.callbacks import MeteringCallbackHandler  # noqa: PLC0415

        return MeteringCallbackHandler(
            self,
            feature_id=feature_id,
            input_feature_id=input_feature_id,
            output_feature_id=output_feature_id,
            **options,
        )

    def verify(self, features: Iterable[str] | None = None) -> None:
        """Confirm at start-up that each metered feature exists where it is billed.

        Raises:
            ConfigError: Every problem found, in one message.
        """
        from agent_meter.verification import verify  # noqa: PLC0415

        verify(self, features)

    def customer(self, customer_id: str, entity_id: str | None = None) -> CustomerScope:
        """Bind a customer for code that has no LangChain config to carry one.

        Use the result as a context manager (integrations inside the block bill this
        customer) or call its ``check``/``track``/``guard`` methods directly.
        """
        return CustomerScope(self, CustomerRef.of(customer_id, entity_id))

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Deliver what is pending, then close the backend."""
        remaining = self.flush()
        if remaining:
            logger.error("agent_meter: closing with %d undelivered tracks", remaining)
        self.backend.close()  # type: ignore[union-attr]

    async def aclose(self) -> None:
        """Async :meth:`close`."""
        remaining = await self.aflush()
        if remaining:
            logger.error("agent_meter: closing with %d undelivered tracks", remaining)
        await self.backend.aclose()  # type: ignore[union-attr]

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Meter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class GuardedCall:
    """The handle a guard yields: what was admitted, and how the block reports its outcome.

    Attributes:
        call: The metered call (customer, feature, units, call id).
        admission: The go-ahead, once the guard is entered.
        billed: Units that stayed billed, once the guard has exited.
    """

    __slots__ = ("_actual", "_failure", "admission", "billed", "call")

    def __init__(self, call: MeteredCall) -> None:
        self.call = call
        self.admission: Admission | None = None
        self.billed: float | None = None
        self._actual: float | None = None
        self._failure: str | None = None

    @property
    def check(self) -> CheckResult | None:
        """The backend's answer to the admitting check (None for an unverified call)."""
        return None if self.admission is None else self.admission.check

    def bill(self, units: float) -> None:
        """Bill ``units`` instead of the estimate (the real count, known after the work)."""
        self._actual = check_units(
            units, feature_id=self.call.feature_id, customer_id=self.call.customer_id
        )

    def fail(self, reason: str = "failed") -> None:
        """Mark the call failed without raising (an error result): nothing stays billed."""
        self._failure = reason

    @property
    def failed(self) -> bool:
        """Whether :meth:`fail` was called."""
        return self._failure is not None

    def _settlement(self, exc_type: type[BaseException] | None) -> tuple[TrackRequest, ...]:
        assert self.admission is not None  # noqa: S101 - set by __enter__
        succeeded = exc_type is None and self._failure is None
        requests = engine.settlement(
            self.call, self.admission, succeeded=succeeded, actual_units=self._actual
        )
        final = self._actual if self._actual is not None else self.call.units
        self.billed = final if succeeded and not self.call.gate_only else 0.0
        return requests


class Guard:
    """Context manager returned by :meth:`Meter.guard`."""

    __slots__ = ("_meter", "handle")

    def __init__(self, meter: Meter, call: MeteredCall) -> None:
        self._meter = meter
        self.handle = GuardedCall(call)

    def __enter__(self) -> GuardedCall:
        self.handle.admission = self._meter._admit(self.handle.call)
        return self.handle

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._meter._settle(self.handle._settlement(exc_type))


class AsyncGuard:
    """Async context manager returned by :meth:`Meter.aguard`."""

    __slots__ = ("_meter", "handle")

    def __init__(self, meter: Meter, call: MeteredCall) -> None:
        self._meter = meter
        self.handle = GuardedCall(call)

    async def __aenter__(self) -> GuardedCall:
        self.handle.admission = await self._meter._aadmit(self.handle.call)
        return self.handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._meter._asettle(self.handle._settlement(exc_type))


class CustomerScope:
    """A meter bound to one customer: a context manager and a set of bound methods.

    Example:
        >>> with meter.customer("cus_1"):
        ...     agent.invoke(inputs)            # wrapped tools bill cus_1
        >>> meter.customer("cus_1").check("web_search").allowed
    """

    def __init__(self, meter: Meter, ref: CustomerRef) -> None:
        self.meter = meter
        self.ref = ref
        self._tokens: list[Token[CustomerRef | None]] = []

    def __repr__(self) -> str:
        return f"CustomerScope({self.ref.customer_id!r}, entity_id={self.ref.entity_id!r})"

    def __enter__(self) -> CustomerScope:
        self._tokens.append(bind_customer(self.ref))
        return self

    def __exit__(self, *exc_info: object) -> None:
        unbind_customer(self._tokens.pop())

    async def __aenter__(self) -> CustomerScope:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()

    def check(self, feature_id: str, units: float = 1) -> CheckResult:
        """:meth:`Meter.check` for this customer."""
        return self.meter.check(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id
        )

    async def acheck(self, feature_id: str, units: float = 1) -> CheckResult:
        """:meth:`Meter.acheck` for this customer."""
        return await self.meter.acheck(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id
        )

    def track(self, feature_id: str, value: float, **kwargs: Any) -> TrackResult:
        """:meth:`Meter.track` for this customer."""
        return self.meter.track(
            self.ref.customer_id, feature_id, value, entity_id=self.ref.entity_id, **kwargs
        )

    async def atrack(self, feature_id: str, value: float, **kwargs: Any) -> TrackResult:
        """:meth:`Meter.atrack` for this customer."""
        return await self.meter.atrack(
            self.ref.customer_id, feature_id, value, entity_id=self.ref.entity_id, **kwargs
        )

    def guard(self, feature_id: str, units: float = 1, **kwargs: Any) -> Guard:
        """:meth:`Meter.guard` for this customer."""
        return self.meter.guard(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id, **kwargs
        )

    def aguard(self, feature_id: str, units: float = 1, **kwargs: Any) -> AsyncGuard:
        """:meth:`Meter.aguard` for this customer."""
        return self.meter.aguard(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id, **kwargs
        )
