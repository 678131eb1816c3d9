"""How every adapter bills one LLM call: reserve the estimate before, settle after.

The callback handler, :class:`~agent_meter.langchain.middleware.MeteringMiddleware` and
:func:`~agent_meter.openai.wrap_client` take the same options and hand them to
:func:`llm_billing`:

- ``estimate``: how a call's cost is estimated before it runs (see
  :mod:`agent_meter.estimate`): None counts the prompt's text and adds the completion
  limit the call sets; a function of a text is your tokenizer; a number reserves that
  many tokens per call whatever the prompt;
- ``default_max_tokens``: the output tokens reserved for a call that sets no limit;
- ``on_denied``: ``"raise"`` (:class:`~agent_meter.UsageLimitExceeded` reaches the
  caller and the model is not called), or ``"message"`` where the adapter can answer for
  the model (the middleware answers with an ``AIMessage`` carrying the refusal);
- ``reserve``: True (the default) reserves the estimate (:mod:`agent_meter.reservation`);
  False only checks that the balance covers it, then bills the reported usage (the
  behaviour before reservations; concurrent calls may overspend).

:meth:`LLMBilling.begin` returns an :class:`LLMCall` that the adapter closes once, with
:meth:`~LLMCall.settle` (the usage the provider reported, or None) or
:meth:`~LLMCall.release` (the call failed). Every outcome is an event passed to the
meter's hooks (:mod:`agent_meter.hooks`), with or without a reservation: the call
admitted or denied, billed what the balance paid, refunded, or tokens left unbilled.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, TypedDict

from agent_meter.engine import MeteredCall
from agent_meter.errors import ConfigError
from agent_meter.estimate import DEFAULT_MAX_TOKENS, Estimator, TokenCounter, estimator
from agent_meter.hooks import Billed, Refunded, UnbilledTokens
from agent_meter.reservation import NO_USAGE, TokenSettlement, areserve_tokens, reserve_tokens
from agent_meter.tokens import TokenFeatures, TokenUsage

if TYPE_CHECKING:
    from agent_meter.context import CustomerRef
    from agent_meter.meter import Meter
    from agent_meter.results import TrackResult

__all__ = ["NO_USAGE", "ON_DENIED", "LLMBilling", "LLMCall", "OnDenied", "llm_billing", "unmetered"]

OnDenied = Literal["raise", "message"]
"""What a refused LLM call does: raise :class:`~agent_meter.UsageLimitExceeded`, or
(where the adapter can) answer for the model with the refusal as its message."""

ON_DENIED: tuple[str, ...] = ("raise", "message")


def unmetered(model: str) -> str:
    """Why a reply of ``model`` without token usage is not metered, and what to change."""
    return (
        f"model {model} reported no token usage; the call is not metered. Ask the model for "
        "usage: stream_usage=True, or OpenAI's stream_options={'include_usage': True}"
    )


class LLMCall(Protocol):
    """One LLM call's billing, closed once by :meth:`settle` or :meth:`release`.

    Attributes:
        customer: Who pays.
        call_id: Names the call in idempotency keys and events.
    """

    customer: CustomerRef
    call_id: str

    def settle(self, usage: TokenUsage | None, reason: str = NO_USAGE) -> TokenSettlement | None:
        """Bill the reported usage.

        None: the call reported none (``reason`` says why); nothing is billed and the call
        is reported not metered.
        """
        ...

    async def asettle(
        self, usage: TokenUsage | None, reason: str = NO_USAGE
    ) -> TokenSettlement | None:
        """Async :meth:`settle`."""
        ...

    def release(self, reason: str = "the call failed") -> TokenSettlement | None:
        """The call failed: nothing is billed."""
        ...

    async def arelease(self, reason: str = "the call failed") -> TokenSettlement | None:
        """Async :meth:`release`."""
        ...


class _TokenTrack(TypedDict):
    """The arguments of :meth:`Meter.track_tokens <agent_meter.Meter.track_tokens>`."""

    customer_id: str
    usage: TokenUsage
    call_id: str
    features: TokenFeatures
    entity_id: str | None


@dataclass(slots=True)
class _Unreserved:
    """A call admitted by a check only (``reserve=False`` or ``gate=False``): billed after.

    Its outcome reaches the hooks as a reserved call's does (what the guards report
    there): Billed per tracked feature (less what the balance could not pay),
    UnbilledTokens for that shortfall or a reply without usage, Refunded (0 units: nothing
    was held) when the call failed or reported nothing.
    """

    meter: Meter
    customer: CustomerRef
    features: TokenFeatures
    call_id: str
    started_at: float = field(default_factory=time.time)

    def settle(self, usage: TokenUsage | None, reason: str = NO_USAGE) -> TokenSettlement | None:
        if usage is None:
            self._closed(reason, unmetered=True)
        else:  # keyed by the call: a repeat is billed once
            self._billed(usage, self.meter.track_tokens(**self._tracked(usage)))
        return None

    async def asettle(
        self, usage: TokenUsage | None, reason: str = NO_USAGE
    ) -> TokenSettlement | None:
        if usage is None:
            self._closed(reason, unmetered=True)
        else:
            self._billed(usage, await self.meter.atrack_tokens(**self._tracked(usage)))
        return None

    def release(self, reason: str = "the call failed") -> TokenSettlement | None:
        self._closed(reason, unmetered=False)
        return None

    async def arelease(self, reason: str = "the call failed") -> TokenSettlement | None:
        self._closed(reason, unmetered=False)
        return None

    def _tracked(self, usage: TokenUsage) -> _TokenTrack:
        return {
            "customer_id": self.customer.customer_id,
            "usage": usage,
            "call_id": self.call_id,
            "features": self.features,
            "entity_id": self.customer.entity_id,
        }

    def _call(self, feature_id: str, units: float) -> MeteredCall:
        return MeteredCall(
            self.customer.customer_id,
            feature_id,
            units,
            self.call_id,
            self.customer.entity_id,
            strategy="check_then_track",
            on_backend_error=self.meter.on_backend_error,
        )

    def _billed(self, usage: TokenUsage, results: list[TrackResult]) -> None:
        hooks = self.meter.hooks
        if not hooks:
            return
        now = time.time()
        unpaid = 0.0
        for (feature_id, tokens), result in zip(self.features.values(usage), results, strict=True):
            short = result.uncharged or 0.0
            unpaid += short
            units = 0.0 if result.duplicate else tokens - short
            hooks.emit(Billed(self._call(feature_id, tokens), units, self.started_at, now))
        if unpaid > 0:
            why = (
                f"LLM call used {usage.total_tokens} tokens; the balance could not pay "
                f"{unpaid:g} of them (it was charged what was left)"
            )
            hooks.emit(
                UnbilledTokens(self.customer.customer_id, self.call_id, math.ceil(unpaid), why)
            )

    def _closed(self, reason: str, *, unmetered: bool) -> None:
        hooks = self.meter.hooks
        if not hooks:
            return
        call = self._call(self.features.gate_feature, 0)
        hooks.emit(Refunded(call, 0.0, self.started_at, time.time(), reason))
        if unmetered:
            hooks.emit(UnbilledTokens(self.customer.customer_id, self.call_id, 0, reason))


@dataclass(frozen=True, slots=True)
class LLMBilling:
    """An adapter's LLM billing policy (built by :func:`llm_billing`).

    Attributes:
        meter: The meter that reserves and bills.
        features: Where tokens are billed.
        estimator: Estimates a call before it runs.
        reserve: Reserve the estimate (True) or only check it (False).
        gate: Check or reserve before the call at all (False: bill after only).
        on_denied: What a refused call does.
    """

    meter: Meter
    features: TokenFeatures
    estimator: Estimator
    reserve: bool = True
    gate: bool = True
    on_denied: OnDenied = "raise"

    def begin(
        self, customer: CustomerRef, prompt: object, limit: int | None, *, call_id: str
    ) -> LLMCall:
        """Admit one LLM call: reserve (or check) its estimate.

        Args:
            customer: Who pays.
            prompt: What the call sends (messages, texts, tool schemas).
            limit: The completion limit the call sets, if any.
            call_id: Names the call in idempotency keys (a run id, a fresh id).

        Raises:
            UsageLimitExceeded: The customer cannot pay the estimate; nothing was held.
            BackendError: The backend could not answer and the fail policy is ``deny``.
        """
        if not self.gate:
            return _Unreserved(self.meter, customer, self.features, call_id)
        estimate = self.estimator.estimate(prompt, limit)
        if self.reserve:
            return reserve_tokens(self.meter, customer, self.features, estimate, call_id=call_id)
        self.meter.gate(
            customer.customer_id,
            self.features.gate_feature,
            max(estimate.total_tokens, 1),
            entity_id=customer.entity_id,
            call_id=call_id,
        )
        return _Unreserved(self.meter, customer, self.features, call_id)

    async def abegin(
        self, customer: CustomerRef, prompt: object, limit: int | None, *, call_id: str
    ) -> LLMCall:
        """Async :meth:`begin`."""
        if not self.gate:
            return _Unreserved(self.meter, customer, self.features, call_id)
        estimate = self.estimator.estimate(prompt, limit)
        if self.reserve:
            return await areserve_tokens(
                self.meter, customer, self.features, estimate, call_id=call_id
            )
        await self.meter.agate(
            customer.customer_id,
            self.features.gate_feature,
            max(estimate.total_tokens, 1),
            entity_id=customer.entity_id,
            call_id=call_id,
        )
        return _Unreserved(self.meter, customer, self.features, call_id)


def llm_billing(
    meter: Meter,
    features: TokenFeatures,
    *,
    estimate: Estimator | TokenCounter | float | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    reserve: bool = True,
    gate: bool = True,
    on_denied: str = "raise",
    allowed_on_denied: tuple[str, ...] = ON_DENIED,
) -> LLMBilling:
    """Validate an adapter's LLM billing options (see the module) and build its policy.

    Args:
        meter: The meter that reserves and bills.
        features: Where tokens are billed (checked against the meter's pricing).
        estimate: See the module.
        default_max_tokens: See the module.
        reserve: See the module.
        gate: Admit calls before they run at all.
        on_denied: See the module.
        allowed_on_denied: The ``on_denied`` values this adapter supports.

    Raises:
        ConfigError: An option is invalid, or a feature is unknown to the pricing.
    """
    for feature in features.billed:
        meter.feature_type(feature)  # ConfigError now rather than on the first call
    if on_denied not in allowed_on_denied:
        msg = f"on_denied must be one of {allowed_on_denied} here, not {on_denied!r}"
        raise ConfigError(msg)
    return LLMBilling(
        meter,
        features,
        estimator(estimate, default_max_tokens),
        reserve=bool(reserve),
        gate=bool(gate),
        on_denied=on_denied,  # type: ignore[arg-type]
    )
