"""The credit an LLM call holds while it runs: reserved before, settled to real usage after.

An LLM call's size is unknown until the provider answers, so checking only that "some
balance is left" lets a call run past the balance, and lets concurrent calls of one
customer each pass the check and overspend together. Instead, before the call,
:func:`reserve_tokens` reserves its estimate (:mod:`agent_meter.estimate`) through the
meter's guards, exactly as a tool call is reserved (on the embedded ledgers an atomic
deduction with a hold; on Autumn the meter's reserving strategy). Then, once:

- :meth:`TokenReservation.settle` with the usage the provider reported: the part of the
  reservation not used is given back with the closing of the hold (one commit on the
  embedded ledgers), and tokens used beyond it are charged, all under keys derived from
  the call id, so settling twice bills once;
- :meth:`TokenReservation.release` when the call failed, or :meth:`~TokenReservation.settle`
  with None when it ended without reporting its usage: the whole reservation is given back.

Each outcome reaches the meter's hooks (:mod:`agent_meter.hooks`): the guards report
:class:`~agent_meter.hooks.Billed` (what stayed billed) or
:class:`~agent_meter.hooks.Refunded` (with the reason); a call that reported no usage is
also :class:`~agent_meter.hooks.UnbilledTokens` with 0 tokens. When a call used more than
its reservation and the balance cannot pay the excess, the backend charges what is left (a
balance never goes below 0) and the rest is :class:`~agent_meter.hooks.UnbilledTokens`
and :attr:`TokenSettlement.uncharged`, never dropped silently (the default
:class:`~agent_meter.hooks.LoggingHook` logs it).

With split pricing (features of their own for input and output tokens) each side is
reserved and settled on its own feature: input tokens against the prompt's estimate,
output tokens against the completion limit.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent_meter.estimate import TokenEstimate
from agent_meter.guard import Guard, GuardedCall
from agent_meter.hooks import Hooks, UnbilledTokens
from agent_meter.tokens import TokenFeatures, TokenUsage

if TYPE_CHECKING:
    from agent_meter.context import CustomerRef
    from agent_meter.meter import Meter

__all__ = [
    "NO_USAGE",
    "TokenReservation",
    "TokenSettlement",
    "areserve_tokens",
    "reserve_tokens",
]

NO_USAGE = "the call reported no token usage"
"""Why a call settled without usage is not metered, when its adapter does not say more."""


@dataclass(frozen=True, slots=True)
class TokenSettlement:
    """How one LLM call's reservation was closed.

    Attributes:
        call_id: The call.
        reserved: Tokens reserved before the call.
        used: Tokens the provider reported (None: released without usage).
        uncharged: Tokens used that the balance could not pay (0 when all was paid;
            None when the backend does not say, e.g. Autumn answers tracks later).
    """

    call_id: str
    reserved: int
    used: int | None
    uncharged: float | None


def _unanswered(handle: GuardedCall) -> bool:
    """Whether a lock was confirmed above what it held (its shortfall is then unknown).

    A finalize does not say what the balance paid, on Autumn nor on the embedded ledgers.
    """
    admission = handle.admission
    hold = None if admission is None else admission.hold
    return hold is not None and hold.lock and (handle.billed or 0.0) > hold.units


def _unbilled(
    settlement: TokenSettlement, reason: str, *, unmetered: bool
) -> tuple[int | None, str] | None:
    """The tokens of a closed reservation left unbilled (see UnbilledTokens), and why."""
    used, reserved, unpaid = settlement.used, settlement.reserved, settlement.uncharged
    if used is None:
        return (0, reason) if unmetered else None  # a failed call used nothing to bill
    if unpaid is None:
        if used <= reserved:
            return None
        return None, (
            f"LLM call used {used} tokens, {reserved} reserved; the excess was charged, and "
            "the backend does not say whether the balance could pay it"
        )
    if unpaid > 0:
        return math.ceil(unpaid), (
            f"LLM call used {used} tokens, {reserved} reserved; the balance could not pay "
            f"{unpaid:g} of them (it was charged what was left)"
        )
    return None


def _parts(features: TokenFeatures, estimate: TokenEstimate) -> list[tuple[str, int]]:
    """(feature, tokens) to reserve: one per billed feature."""
    if features.input is not None and features.output is not None:
        return [(features.input, estimate.input_tokens), (features.output, estimate.output_tokens)]
    return [(features.gate_feature, estimate.total_tokens)]


def _actuals(features: TokenFeatures, usage: TokenUsage) -> list[int]:
    """The real tokens of each part of :func:`_parts`, in the same order."""
    if features.split:
        return [usage.input_tokens, usage.output_tokens]
    return [usage.total_tokens]


class TokenReservation:
    """The credit one LLM call holds until :meth:`settle` or :meth:`release` (once).

    Made by :func:`reserve_tokens` / :func:`areserve_tokens`; either may be closed by the
    sync or the async methods. Thread-safe: the first of several racing settles or
    releases closes it, the others do nothing.

    Attributes:
        customer: Who pays.
        features: Where the tokens are billed.
        call_id: Names the call in idempotency keys.
        estimate: What was reserved.
        settlement: How it was closed, once it is.
    """

    __slots__ = (
        "_guards",
        "_handles",
        "_hooks",
        "_lock",
        "_open",
        "call_id",
        "customer",
        "estimate",
        "features",
        "settlement",
    )

    def __init__(
        self,
        guards: list[Guard],
        customer: CustomerRef,
        *,
        features: TokenFeatures,
        call_id: str,
        estimate: TokenEstimate,
        hooks: Hooks | None = None,
    ) -> None:
        self._guards = guards
        self._hooks = hooks or Hooks()
        self.customer = customer
        self.features = features
        self.call_id = call_id
        self.estimate = estimate
        self.settlement: TokenSettlement | None = None
        self._handles: list[GuardedCall] = [guard.handle for guard in guards]
        self._lock = threading.Lock()
        self._open = True

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<TokenReservation {self.call_id} {self.reserved} tokens, {state}>"

    @property
    def reserved(self) -> int:
        """Tokens reserved."""
        return int(sum(handle.call.units for handle in self._handles))

    @property
    def closed(self) -> bool:
        """Whether it was settled or released."""
        return not self._open

    def _claim(self, usage: TokenUsage | None, reason: str) -> bool:
        """Take the right to close it (once), and tell each guard the call's outcome."""
        with self._lock:
            if not self._open:
                return False
            self._open = False
        if usage is None:
            for handle in self._handles:
                handle.fail(reason)
        else:
            for handle, tokens in zip(self._handles, _actuals(self.features, usage), strict=True):
                handle.bill(tokens)
        return True

    def _close(self, usage: TokenUsage | None, reason: str, *, unmetered: bool) -> TokenSettlement:
        unpaid: float | None = 0.0
        for handle in self._handles:
            unpaid = (
                None
                if unpaid is None or handle.uncharged is None or _unanswered(handle)
                else unpaid + handle.uncharged
            )
        used = None if usage is None else usage.total_tokens
        settlement = TokenSettlement(self.call_id, self.reserved, used, unpaid)
        self.settlement = settlement
        unbilled = _unbilled(settlement, reason, unmetered=unmetered)
        if unbilled is not None:
            tokens, why = unbilled
            self._hooks.emit(UnbilledTokens(self.customer.customer_id, self.call_id, tokens, why))
        return settlement

    def _finish(self, usage: TokenUsage | None, reason: str, *, unmetered: bool) -> TokenSettlement:
        try:
            for guard in self._guards:
                guard.__exit__(None, None, None)  # settles as the handle says: bill or fail
        finally:
            settlement = self._close(usage, reason, unmetered=unmetered)
        return settlement

    async def _afinish(
        self, usage: TokenUsage | None, reason: str, *, unmetered: bool
    ) -> TokenSettlement:
        try:
            for guard in self._guards:
                await guard.__aexit__(None, None, None)
        finally:
            settlement = self._close(usage, reason, unmetered=unmetered)
        return settlement

    def settle(self, usage: TokenUsage | None, reason: str = NO_USAGE) -> TokenSettlement | None:
        """Bill ``usage``: give back or charge the difference to the reservation.

        ``None`` (the call reported no usage) releases the reservation and reports the
        call as not metered (:class:`~agent_meter.hooks.UnbilledTokens`, 0 tokens).

        Args:
            usage: The tokens the provider reported, or None.
            reason: Why there is no usage (``usage`` None), for the hooks.

        Returns:
            The settlement, or None when the reservation was closed before (nothing done).
        """
        if not self._claim(usage, reason):
            return None
        return self._finish(usage, reason, unmetered=True)

    async def asettle(
        self, usage: TokenUsage | None, reason: str = NO_USAGE
    ) -> TokenSettlement | None:
        """Async :meth:`settle`."""
        if not self._claim(usage, reason):
            return None
        return await self._afinish(usage, reason, unmetered=True)

    def release(self, reason: str = "the call failed") -> TokenSettlement | None:
        """Give the whole reservation back (the call failed).

        Returns:
            The settlement, or None when the reservation was closed before (nothing done).
        """
        if not self._claim(None, reason):
            return None
        return self._finish(None, reason, unmetered=False)

    async def arelease(self, reason: str = "the call failed") -> TokenSettlement | None:
        """Async :meth:`release`."""
        if not self._claim(None, reason):
            return None
        return await self._afinish(None, reason, unmetered=False)


def reserve_tokens(
    meter: Meter,
    customer: CustomerRef,
    features: TokenFeatures,
    estimate: TokenEstimate,
    *,
    call_id: str,
) -> TokenReservation:
    """Reserve ``estimate`` for one LLM call of ``customer``, before it starts.

    Raises:
        UsageLimitExceeded: The customer cannot pay the estimate; nothing is held.
        BackendError: The reservation could not be made and the fail policy is ``deny``.
    """
    guards: list[Guard] = []
    try:
        for feature, tokens in _parts(features, estimate):
            guard = meter.guard(
                customer.customer_id,
                feature,
                tokens,
                call_id=call_id,
                entity_id=customer.entity_id,
            )
            guard.__enter__()
            guards.append(guard)
    except BaseException:
        for guard in guards:  # the input side was held when the output side was refused
            guard.handle.fail("refused")
            guard.__exit__(None, None, None)
        raise
    return TokenReservation(
        guards, customer, features=features, call_id=call_id, estimate=estimate, hooks=meter.hooks
    )


async def areserve_tokens(
    meter: Meter,
    customer: CustomerRef,
    features: TokenFeatures,
    estimate: TokenEstimate,
    *,
    call_id: str,
) -> TokenReservation:
    """Async :func:`reserve_tokens`."""
    guards: list[Guard] = []
    try:
        for feature, tokens in _parts(features, estimate):
            guard = meter.aguard(
                customer.customer_id,
                feature,
                tokens,
                call_id=call_id,
                entity_id=customer.entity_id,
            )
            await guard.__aenter__()
            guards.append(guard)
    except BaseException:
        for guard in guards:
            guard.handle.fail("refused")
            await guard.__aexit__(None, None, None)
        raise
    return TokenReservation(
        guards, customer, features=features, call_id=call_id, estimate=estimate, hooks=meter.hooks
    )
