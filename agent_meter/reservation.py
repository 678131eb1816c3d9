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
- :meth:`TokenReservation.release` when the call failed, or ended without reporting its
  usage (logged): the whole reservation is given back.

When a call used more than its reservation and the balance cannot pay the excess, the
backend charges what is left (a balance never goes below 0) and the rest is reported:
a warning in the ``agent_meter`` log and :attr:`TokenSettlement.uncharged`, never
dropped silently.

With split pricing (features of their own for input and output tokens) each side is
reserved and settled on its own feature: input tokens against the prompt's estimate,
output tokens against the completion limit.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent_meter.estimate import TokenEstimate
from agent_meter.guard import Guard, GuardedCall
from agent_meter.tokens import TokenFeatures, TokenUsage

if TYPE_CHECKING:
    from agent_meter.context import CustomerRef
    from agent_meter.meter import Meter

__all__ = ["TokenReservation", "TokenSettlement", "areserve_tokens", "reserve_tokens"]

logger = logging.getLogger("agent_meter")

_NO_USAGE = "the call reported no token usage"


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
    ) -> None:
        self._guards = guards
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

    def _close(self, usage: TokenUsage | None, reason: str) -> TokenSettlement:
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
        if usage is None:
            logger.info(
                "agent_meter: LLM call %s of %s released (%d tokens): %s",
                self.call_id,
                self.customer.customer_id,
                self.reserved,
                reason,
            )
        elif unpaid is None and usage.total_tokens > self.reserved:
            logger.warning(
                "agent_meter: LLM call %s of %s used %d tokens, %d reserved; the excess was "
                "charged, and the backend does not say whether the balance could pay it",
                self.call_id,
                self.customer.customer_id,
                usage.total_tokens,
                self.reserved,
            )
        elif unpaid:
            logger.warning(
                "agent_meter: LLM call %s of %s used %d tokens, %d reserved; the balance "
                "could not pay %s of them (it was charged what was left)",
                self.call_id,
                self.customer.customer_id,
                usage.total_tokens,
                self.reserved,
                f"{unpaid:g}",
            )
        return settlement

    def _finish(self, usage: TokenUsage | None, reason: str) -> TokenSettlement:
        try:
            for guard in self._guards:
                guard.__exit__(None, None, None)  # settles as the handle says: bill or fail
        finally:
            settlement = self._close(usage, reason)
        return settlement

    async def _afinish(self, usage: TokenUsage | None, reason: str) -> TokenSettlement:
        try:
            for guard in self._guards:
                await guard.__aexit__(None, None, None)
        finally:
            settlement = self._close(usage, reason)
        return settlement

    def settle(self, usage: TokenUsage | None) -> TokenSettlement | None:
        """Bill ``usage``: give back or charge the difference to the reservation.

        ``None`` (the call reported no usage) releases the reservation, with a log line.

        Returns:
            The settlement, or None when the reservation was closed before (nothing done).
        """
        if not self._claim(usage, _NO_USAGE):
            return None
        return self._finish(usage, _NO_USAGE)

    async def asettle(self, usage: TokenUsage | None) -> TokenSettlement | None:
        """Async :meth:`settle`."""
        if not self._claim(usage, _NO_USAGE):
            return None
        return await self._afinish(usage, _NO_USAGE)

    def release(self, reason: str = "the call failed") -> TokenSettlement | None:
        """Give the whole reservation back (the call failed).

        Returns:
            The settlement, or None when the reservation was closed before (nothing done).
        """
        if not self._claim(None, reason):
            return None
        return self._finish(None, reason)

    async def arelease(self, reason: str = "the call failed") -> TokenSettlement | None:
        """Async :meth:`release`."""
        if not self._claim(None, reason):
            return None
        return await self._afinish(None, reason)


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
    return TokenReservation(guards, customer, features=features, call_id=call_id, estimate=estimate)


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
    return TokenReservation(guards, customer, features=features, call_id=call_id, estimate=estimate)
