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
:meth:`~LLMCall.release` (the call failed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from agent_meter.errors import ConfigError
from agent_meter.estimate import DEFAULT_MAX_TOKENS, Estimator, TokenCounter, estimator
from agent_meter.reservation import TokenSettlement, areserve_tokens, reserve_tokens
from agent_meter.tokens import TokenFeatures, TokenUsage

if TYPE_CHECKING:
    from agent_meter.context import CustomerRef
    from agent_meter.meter import Meter

__all__ = ["ON_DENIED", "LLMBilling", "LLMCall", "OnDenied", "llm_billing"]

OnDenied = Literal["raise", "message"]
"""What a refused LLM call does: raise :class:`~agent_meter.UsageLimitExceeded`, or
(where the adapter can) answer for the model with the refusal as its message."""

ON_DENIED: tuple[str, ...] = ("raise", "message")


class LLMCall(Protocol):
    """One LLM call's billing, closed once by :meth:`settle` or :meth:`release`."""

    def settle(self, usage: TokenUsage | None) -> TokenSettlement | None:
        """Bill the reported usage (None: the call reported none; nothing is billed)."""
        ...

    async def asettle(self, usage: TokenUsage | None) -> TokenSettlement | None:
        """Async :meth:`settle`."""
        ...

    def release(self, reason: str = "the call failed") -> TokenSettlement | None:
        """The call failed: nothing is billed."""
        ...

    async def arelease(self, reason: str = "the call failed") -> TokenSettlement | None:
        """Async :meth:`release`."""
        ...


@dataclass(slots=True)
class _Unreserved:
    """A call admitted by a check only (``reserve=False`` or ``gate=False``): billed after."""

    meter: Meter
    customer: CustomerRef
    features: TokenFeatures
    call_id: str

    def settle(self, usage: TokenUsage | None) -> TokenSettlement | None:
        if usage is not None:  # keyed by the call: a repeat is billed once
            self.meter.track_tokens(
                self.customer.customer_id,
                usage,
                call_id=self.call_id,
                features=self.features,
                entity_id=self.customer.entity_id,
            )
        return None

    async def asettle(self, usage: TokenUsage | None) -> TokenSettlement | None:
        if usage is not None:
            await self.meter.atrack_tokens(
                self.customer.customer_id,
                usage,
                call_id=self.call_id,
                features=self.features,
                entity_id=self.customer.entity_id,
            )
        return None

    def release(self, reason: str = "the call failed") -> TokenSettlement | None:
        return None

    async def arelease(self, reason: str = "the call failed") -> TokenSettlement | None:
        return None


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
