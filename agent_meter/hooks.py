"""Instrumentation hooks: every billing decision as an event, passed to the hooks you register.

Each decision the meter takes becomes one frozen event value: a call :class:`Admitted`,
:class:`Denied` or run :class:`Unverified`; once it is over, :class:`Billed` or
:class:`Refunded`; a track the backend rejected for good :class:`SetAside`; tokens that
could not be billed :class:`UnbilledTokens`; a reserve whose answer was lost
:class:`ReserveInDoubt`; a lock gone before its confirm :class:`LockGone`. A hook is any
callable taking an event (:class:`Hook`); register it with
:meth:`Meter.add_hook <agent_meter.Meter.add_hook>`. :class:`LoggingHook` is installed by
default and writes the log lines agent_meter always wrote; :mod:`agent_meter.otel` has an
OpenTelemetry hook.

A hook that raises is logged and otherwise ignored: instrumentation never changes a bill.

Example:
    >>> seen = []
    >>> meter.add_hook(seen.append)
    >>> with meter.guard("cus_1", "web_search"):
    ...     pass
    >>> [type(event).__name__ for event in seen]
    ['Admitted', 'Billed']
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from agent_meter.engine import FinalizeRequest, MeteredCall, TrackRequest, VoidReserve

__all__ = [
    "Admitted",
    "Billed",
    "Denied",
    "Event",
    "Hook",
    "Hooks",
    "LockGone",
    "LoggingHook",
    "Refunded",
    "ReserveInDoubt",
    "SetAside",
    "SettleFailed",
    "UnbilledTokens",
    "Unverified",
]

logger = logging.getLogger("agent_meter")


@dataclass(frozen=True, slots=True)
class Admitted:
    """A call was let through by the backend.

    Attributes:
        call: The call (customer, feature, units, strategy, call id).
        reserved: Units deducted up front (0 under ``check_then_track``).
        replay: The call was reserved before (a replayed tool call): not billed again.
        at: Unix time of the admission.
    """

    call: MeteredCall
    reserved: float
    replay: bool
    at: float


@dataclass(frozen=True, slots=True)
class Denied:
    """A call was refused: the customer may not use the feature, or billing failed.

    Attributes:
        call: The call.
        reason: ``"limit"`` (no balance left) or ``"backend_error"`` (the check could not
            be answered and the fail policy refuses).
        error: The refusal's message.
        at: Unix time of the refusal.
    """

    call: MeteredCall
    reason: str
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class Unverified:
    """The backend could not be asked and the fail policy let the call run anyway.

    Attributes:
        call: The call.
        count: Calls of this customer let through unverified in a row, this one included.
        limit: The cap after which the meter fails closed.
        error: Why the check failed.
        at: Unix time of the decision.
    """

    call: MeteredCall
    count: int
    limit: int
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class Billed:
    """A guarded call succeeded: ``units`` stay billed.

    Attributes:
        call: The call.
        units: Units billed (the real count when the block reported one), less what
            the balance could not pay beyond the reservation.
        started_at: Unix time the call was admitted.
        at: Unix time it was settled.
    """

    call: MeteredCall
    units: float
    started_at: float
    at: float


@dataclass(frozen=True, slots=True)
class Refunded:
    """A guarded call failed: what it reserved was given back (nothing stays billed).

    Attributes:
        call: The call.
        units: Units given back (0 when nothing had been reserved).
        started_at: Unix time the call was admitted.
        at: Unix time it was settled.
        reason: Why, when the call reported its failure instead of raising (an error
            result, an LLM call that failed or reported no usage); None when it raised.
    """

    call: MeteredCall
    units: float
    started_at: float
    at: float
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class SetAside:
    """The backend rejected a queued track for good; it is kept aside in the outbox.

    Attributes:
        request: The track (or a lock's finalize, strategy ``lock``, or the void of a
            reserve in doubt).
        error: Why the backend rejected it.
    """

    request: TrackRequest | FinalizeRequest | VoidReserve
    error: str


@dataclass(frozen=True, slots=True)
class SettleFailed:
    """A call's outcome could not be recorded at the time; it is retried, never lost.

    The caller got the block's own result or exception all the same. What could not be
    written is written later (by the next call, ``flush()`` or ``close()``); a success
    stays billed.

    Attributes:
        call: The call.
        succeeded: The block succeeded (it stays billed) or failed (it is refunded).
        error: What failed in the bookkeeping.
        at: Unix time of the failure.
    """

    call: MeteredCall
    succeeded: bool
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class UnbilledTokens:
    """An LLM call's tokens could not be billed, or may not have been.

    Attributes:
        customer_id: Who should have paid.
        call_id: The LLM call (a run id, a response id).
        tokens: Tokens left unbilled: what the balance could not pay beyond the
            reservation, or what the backend could not record; 0 when the model reported
            no usage (nothing is known to bill); None when the backend does not say
            whether it could pay the excess (a lock confirmed above what it held).
        reason: Why.
    """

    customer_id: str
    call_id: str
    tokens: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class ReserveInDoubt:
    """A reserving check's answer was lost: whether it deducted is unknown.

    Its call was refused (or its process died asking), so it must not stay billed. With
    keyed reserves (Autumn) it waits in the outbox until the backend answers again: if the
    backend received the reserve it is refunded under a key derived from the reserve's
    own, so it counts once; if not, the reserve's key is spent so it can never land.

    Attributes:
        customer_id: Who may have been charged.
        feature_id: The feature reserved.
        units: Units the reserve asked for.
        key: The idempotency key the reserve was last sent under.
        reconciled: True when it is recorded for reconciliation (keyed reserves); False
            when the backend cannot tell, and only this event and the log keep it.
        error: Why the answer was lost.
        at: Unix time.
    """

    customer_id: str
    feature_id: str
    units: float
    key: str
    reconciled: bool
    error: str
    at: float


@dataclass(frozen=True, slots=True)
class LockGone:
    """A lock's confirm found nothing held under its id: the call stays unbilled.

    Autumn releases a lock at its ``expires_at``; a confirm arriving later answers
    ``Lock not found``, and nothing is charged. The meter takes the call as settled and
    unbilled: the confirm is not retried. (A confirm whose earlier attempt landed with its
    answer lost gets the same answer; Autumn's reply cannot tell the two apart.)

    Attributes:
        request: The confirm.
        at: Unix time.
    """

    request: FinalizeRequest
    at: float


Event = (
    Admitted
    | Denied
    | Unverified
    | Billed
    | Refunded
    | SetAside
    | SettleFailed
    | UnbilledTokens
    | ReserveInDoubt
    | LockGone
)
"""Every event a hook receives."""


class Hook(Protocol):
    """Receives every event (check its type for the ones it cares about)."""

    def __call__(self, event: Event, /) -> None:
        """Handle ``event``; should return quickly and never raise."""
        ...


class LoggingHook:
    """The default hook: the log lines agent_meter writes (logger ``agent_meter``).

    Warnings and errors for what needs attention (a call run unverified, a track set
    aside, tokens not billed or not metered); an info line for a call refunded with a
    reason (an error result, a failed LLM call); debug lines for the rest.
    """

    def __call__(self, event: Event) -> None:
        """Log ``event``."""
        if isinstance(event, Unverified):
            call = event.call
            logger.warning(
                "agent_meter: %s for %s runs unverified (%d of %d): %s",
                call.feature_id,
                call.customer_id,
                event.count,
                event.limit,
                event.error,
            )
        elif isinstance(event, SetAside):
            request = event.request
            logger.error(
                "agent_meter: track %s (%s x %s for %s) rejected for good and set aside: %s",
                request.idempotency_key,
                request.value,
                request.feature_id,
                request.customer_id,
                event.error,
            )
        elif isinstance(event, SettleFailed):
            outcome = "billed" if event.succeeded else "refunded"
            logger.error(
                "agent_meter: settling %s (%s) failed, retried later: %s",
                event.call,
                outcome,
                event.error,
            )
        elif isinstance(event, UnbilledTokens):
            self._unbilled(event)
        elif isinstance(event, ReserveInDoubt):
            logger.warning(
                "agent_meter: the reserve %s (%s x %s for %s) lost its answer (%s); %s",
                event.key,
                event.units,
                event.feature_id,
                event.customer_id,
                event.error,
                "it is voided once the backend answers (refunded if it landed)"
                if event.reconciled
                else "the backend cannot tell whether it deducted: reconcile it by hand",
            )
        elif isinstance(event, LockGone):
            request = event.request
            logger.warning(
                "agent_meter: lock %s (%s x %s for %s) was gone when its confirm arrived "
                "(expired and released): the call stays unbilled",
                request.lock_id,
                request.value,
                request.feature_id,
                request.customer_id,
            )
        elif isinstance(event, Refunded) and event.reason is not None:
            call = event.call
            logger.info(
                "agent_meter: %s call %s of %s refunded (%s units): %s",
                call.feature_id,
                call.call_id,
                call.customer_id,
                f"{event.units:g}",
                event.reason,
            )
        elif logger.isEnabledFor(logging.DEBUG):
            logger.debug("agent_meter: %s", event)

    @staticmethod
    def _unbilled(event: UnbilledTokens) -> None:
        if event.tokens is None:  # maybe paid: worth a look, not an alarm
            logger.warning(
                "agent_meter: tokens of %s for %s may not be billed: %s",
                event.call_id,
                event.customer_id,
                event.reason,
            )
        elif event.tokens == 0:  # nothing reported to bill: a setting to fix
            logger.warning(
                "agent_meter: LLM call %s of %s not metered: %s",
                event.call_id,
                event.customer_id,
                event.reason,
            )
        else:  # tokens used and not paid for
            logger.error(
                "agent_meter: tokens of %s (%d) for %s not billed: %s",
                event.call_id,
                event.tokens,
                event.customer_id,
                event.reason,
            )

    def __repr__(self) -> str:
        return "LoggingHook()"


class Hooks:
    """The hooks of one meter; :meth:`emit` passes an event to each, in order."""

    __slots__ = ("_hooks", "_others")

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self._hooks: tuple[Hook, ...] = ()
        self._others = False
        self._set(tuple(hooks))

    def _set(self, hooks: tuple[Hook, ...]) -> None:
        self._hooks = hooks
        self._others = any(type(hook) is not LoggingHook for hook in hooks)

    def hears(self, level: int = logging.DEBUG) -> bool:
        """Whether an event the logging hook writes at ``level`` reaches anyone.

        Routine events (admitted, billed, refunded) are written at debug level: when the
        logging hook is the only one and that level is off, a guarded call need not build
        them.
        """
        return self._others or (bool(self._hooks) and logger.isEnabledFor(level))

    def add(self, hook: Hook) -> None:
        """Register ``hook`` (after the others)."""
        self._set((*self._hooks, hook))

    def remove(self, hook: Hook) -> None:
        """Unregister ``hook``.

        Raises:
            ValueError: It is not registered.
        """
        hooks = list(self._hooks)
        hooks.remove(hook)
        self._set(tuple(hooks))

    def __iter__(self) -> Iterator[Hook]:
        return iter(self._hooks)

    def __bool__(self) -> bool:
        return bool(self._hooks)

    def emit(self, event: Event) -> None:
        """Pass ``event`` to every hook; a hook that raises is logged, never propagated."""
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:  # instrumentation must never change a bill
                logger.exception("agent_meter: hook %r failed on %s", hook, type(event).__name__)
