"""The decisions of a guarded call, as pure functions over small immutable values.

A guarded call goes: :func:`admission` (what to ask the backend) → the backend answers →
:func:`admit` (go ahead, or :class:`UsageLimitExceeded`) → the work → :func:`settlement`
(which tracks, refunds or adjustments make the bill match what succeeded). The sync and
async drivers in :mod:`agent_meter.meter` only carry these requests to a backend; every
integration (tool wrappers, callbacks, middleware, OpenAI) goes through the same drivers.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent_meter.errors import BackendError, BackendUnavailable, UsageLimitExceeded
from agent_meter.keys import idempotency_key
from agent_meter.results import CheckResult

__all__ = [
    "Admission",
    "CheckRequest",
    "FailPolicy",
    "FinalizeRequest",
    "Hold",
    "MeteredCall",
    "Settlement",
    "Strategy",
    "TrackRequest",
    "VoidReserve",
    "admission",
    "admit",
    "admit_unverified",
    "hold_for",
    "may_run_unverified",
    "settlement",
]

Strategy = Literal["reserve", "check_then_track", "lock"]
"""``reserve``: deduct atomically up front, refund on failure (strict, the default).
``check_then_track``: check, work, then track on success (Autumn's literal pattern).
``lock``: hold the units under a unique lock id, then confirm them (with the real count)
or release them exactly (Autumn's lock → finalize; the embedded ledgers do the same)."""

FailPolicy = Literal["deny", "allow"]
"""What a call does when the backend cannot answer its check: refuse it, or run it and
bill it later."""

STRATEGIES: tuple[str, ...] = ("reserve", "check_then_track", "lock")
FAIL_POLICIES: tuple[str, ...] = ("deny", "allow")


@dataclass(frozen=True, slots=True)
class MeteredCall:
    """One use of a feature that must be paid for.

    Attributes:
        customer_id: Who pays.
        feature_id: The feature used.
        units: Units expected (an estimate when the real count comes afterwards).
        call_id: Names the call in idempotency keys (a tool_call_id, a run id).
        entity_id: Sub-scope of the customer, if any.
        strategy: How the call is billed.
        on_backend_error: What to do when the check cannot be answered.
        gate_only: The feature is boolean: checked, never tracked.
    """

    customer_id: str
    feature_id: str
    units: float
    call_id: str
    entity_id: str | None = None
    strategy: Strategy = "reserve"
    on_backend_error: FailPolicy = "deny"
    gate_only: bool = False

    def key(self, purpose: str) -> str:
        """The idempotency key of this call's ``purpose`` track."""
        return idempotency_key(
            self.customer_id, self.feature_id, self.call_id, purpose, self.entity_id
        )


@dataclass(frozen=True, slots=True)
class CheckRequest:
    """A check to send to a backend: may ``customer_id`` use ``required_balance`` units?

    Attributes:
        customer_id: Who pays.
        feature_id: The feature asked about.
        required_balance: Units the call needs.
        send_event: Deduct atomically when allowed (a reservation).
        entity_id: Sub-scope of the customer, if any.
        idempotency_key: Names a reservation, for a backend that keys reserving checks
            (Autumn's ``Idempotency-Key`` header): a lost answer is retried, deducted once.
    """

    customer_id: str
    feature_id: str
    required_balance: float = 1
    send_event: bool = False
    entity_id: str | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class TrackRequest:
    """A track to send to a backend: usage, a refund (negative) or an adjustment.

    Attributes:
        customer_id: Who pays.
        feature_id: The feature used.
        value: Units used; negative refunds.
        idempotency_key: Names this usage: recorded once however often it is sent.
        entity_id: Sub-scope of the customer, if any.
        properties: Free-form details stored with the event.
    """

    customer_id: str
    feature_id: str
    value: float
    idempotency_key: str
    entity_id: str | None = None
    properties: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class FinalizeRequest:
    """Settles a lock (Autumn's ``balances.finalize``): confirm it, or release it.

    Attributes:
        lock_id: The lock (unique per attempt; a hold's key).
        customer_id: Who holds it.
        feature_id: The feature locked.
        held: Units the lock holds.
        action: ``confirm`` charges the hold (or ``override_value``); ``release`` gives
            it back exactly, above the plan's grant too.
        override_value: The real units to charge on ``confirm``, in the feature's units,
            when they differ from ``held`` (above or below it).
        entity_id: Sub-scope of the customer.
    """

    lock_id: str
    customer_id: str
    feature_id: str
    held: float
    action: Literal["confirm", "release"]
    override_value: float | None = None
    entity_id: str | None = None

    @property
    def idempotency_key(self) -> str:
        """The outbox key of this finalize: the lock id (a lock finalizes once)."""
        return self.lock_id

    @property
    def value(self) -> float:
        """Units this finalize leaves charged: 0 on release, else the override or the hold."""
        if self.action == "release":
            return 0.0
        return self.held if self.override_value is None else self.override_value


@dataclass(frozen=True, slots=True)
class VoidReserve:
    """Voids a keyed reserve whose answer was lost, so that its refused call is never billed.

    Queued in the outbox when a reserving check sent with an idempotency key (Autumn's
    ``Idempotency-Key`` header) got no answer and its call was refused, or its process
    died waiting. Once the backend answers again it is asked, under the same key and
    in a way that leaves the key free, whether the reserve was received: if it was, the
    reserve is refunded under :meth:`refund`'s key (derived from the reserve's: counted
    once); if not, that is recorded (``absent``) and the key is then spent by a check that
    deducts nothing, so the reserve can never land afterwards.

    Attributes:
        idempotency_key: The reserve's idempotency key (its hold key), which names the void
            in the outbox too: a reserve is voided once.
        customer_id: Who may have been charged.
        feature_id: The feature reserved.
        units: Units the reserve asked for.
        entity_id: Sub-scope of the customer.
        absent: The backend was asked and had not received the reserve: only its key is
            left to spend, whatever the next question answers.
    """

    idempotency_key: str
    customer_id: str
    feature_id: str
    units: float
    entity_id: str | None = None
    absent: bool = False

    @property
    def value(self) -> float:
        """Units given back if the reserve landed (none once it is known absent)."""
        return 0.0 if self.absent else -self.units

    def refund(self) -> TrackRequest:
        """The refund of the reserve, keyed after it: sent twice, it counts once."""
        return TrackRequest(
            self.customer_id,
            self.feature_id,
            -self.units,
            f"{self.idempotency_key}.void",
            self.entity_id,
        )


@dataclass(frozen=True, slots=True)
class Hold:
    """A reservation held by a process until its call is settled.

    Attributes:
        key: Names the hold (derived from the call).
        customer_id: Who was charged.
        feature_id: The feature reserved.
        units: Units reserved.
        entity_id: Sub-scope of the customer.
        refund_key: The idempotency key of the refund, should the call fail or its owner die.
        owner: ``host:pid:start`` of the process that holds it (see :mod:`agent_meter.owner`).
        created_at: Unix time the hold was opened.
        lock: The hold is a lock (strategy ``lock``): its key is the lock id, and it is
            settled by finalizing the lock rather than by a refund.
    """

    key: str
    customer_id: str
    feature_id: str
    units: float
    entity_id: str | None
    refund_key: str
    owner: str
    created_at: float
    lock: bool = False

    def refund(self) -> TrackRequest:
        """The track that gives this reservation back."""
        return TrackRequest(
            self.customer_id, self.feature_id, -self.units, self.refund_key, self.entity_id
        )

    def void(self, key: str | None = None) -> VoidReserve:
        """Voids this hold's reserve when its answer was lost (see :class:`VoidReserve`).

        Args:
            key: The key the reserve was last sent under, when not the hold's own (a
                retry after a fail-open answer goes under a fresh key).
        """
        return VoidReserve(
            key or self.key, self.customer_id, self.feature_id, self.units, self.entity_id
        )

    def finalize(self, *, succeeded: bool, units: float | None = None) -> FinalizeRequest:
        """The finalize that settles this lock: confirm (``units`` charged) or release."""
        override = None if units is None or units == self.units else units
        return FinalizeRequest(
            self.key,
            self.customer_id,
            self.feature_id,
            self.units,
            "confirm" if succeeded else "release",
            override if succeeded else None,
            self.entity_id,
        )


def hold_for(call: MeteredCall, owner: str, now: float, attempt: str | None = None) -> Hold:
    """The hold a reservation of ``call`` opens.

    The refund key names this attempt: a call that failed is refunded and may be retried
    under the same call id, and if the retry fails too its refund must count again, not be
    taken for a duplicate of the first.

    Args:
        call: The call.
        owner: The process that holds it.
        now: Unix time.
        attempt: Names this admission in the hold key too, for a backend whose keys
            outlive the call (Autumn keeps a key 24 h, org-wide, and a lock id must never
            be reused): each admission gets its own reserve key or lock id. None keeps one
            hold key per call, so that an embedded ledger spots a replayed call.
    """
    suffix = "" if attempt is None else f".{attempt}"
    purpose = "lock" if call.strategy == "lock" else "hold"
    refund_attempt = f"{call.call_id}.r{os.urandom(6).hex()}"
    return Hold(
        call.key(f"{purpose}{suffix}"),
        call.customer_id,
        call.feature_id,
        call.units,
        call.entity_id,
        idempotency_key(
            call.customer_id, call.feature_id, refund_attempt, "refund", call.entity_id
        ),
        owner,
        now,
        call.strategy == "lock",
    )


@dataclass(frozen=True, slots=True)
class Admission:
    """The go-ahead for a call.

    Attributes:
        reserved: Units already deducted by the check (0 unless strategy ``reserve``).
        verified: False when the backend could not be asked and the policy let the call
            run anyway (fail open); its usage is tracked after success.
        check: The backend's answer, when there was one.
        hold: The hold that records the reservation until the call is settled.
        replay: The call was reserved before (a replayed tool call): it is not billed again.
    """

    reserved: float
    verified: bool = True
    check: CheckResult | None = None
    hold: Hold | None = None
    replay: bool = False


def admission(call: MeteredCall) -> CheckRequest:
    """The check that admits ``call``: reserving (``send_event``) under ``reserve`` and ``lock``."""
    reserve = call.strategy != "check_then_track" and not call.gate_only and call.units > 0
    return CheckRequest(call.customer_id, call.feature_id, call.units, reserve, call.entity_id)


def admit(call: MeteredCall, result: CheckResult, hold: Hold | None = None) -> Admission:
    """Turn the backend's answer into a go-ahead.

    Raises:
        UsageLimitExceeded: The answer was a denial.
    """
    if not result.allowed:
        raise UsageLimitExceeded(
            call.customer_id,
            call.feature_id,
            balance=result.balance,
            required=result.required,
            balance_feature_id=result.balance_feature_id,
        )
    if result.replayed:
        return Admission(reserved=0.0, check=result, replay=True)
    if not result.deducted:
        return Admission(reserved=0.0, check=result)
    return Admission(reserved=call.units, check=result, hold=hold)


def may_run_unverified(call: MeteredCall, error: BackendError) -> bool:
    """Whether the fail policy lets ``call`` run unverified after ``error``, cap aside.

    Only under ``allow``, and only when the backend is unavailable and took nothing: a
    wrong key or a rejected request is not an outage, and a reservation that may stand
    would be billed twice.
    """
    return (
        call.on_backend_error == "allow"
        and isinstance(error, BackendUnavailable)
        and not error.maybe_applied
    )


def admit_unverified(
    call: MeteredCall, error: BackendError, *, unverified: int = 0, limit: int = 10
) -> Admission:
    """Decide a call whose check failed in the backend, following its fail policy.

    Fail open (``allow``) only when the backend is unavailable: a wrong key or a rejected
    request is not an outage, and letting calls through would make them free. Even then,
    at most ``limit`` unverified calls per customer run before the meter fails closed.

    Args:
        call: The call.
        error: Why the check failed.
        unverified: Calls of this customer already let through unverified.
        limit: The cap on unverified calls per customer.

    Raises:
        BackendError: The call is refused; the message says the billing service failed,
            which a reader must not confuse with a lack of credits.
    """
    is_outage = isinstance(error, BackendUnavailable)
    ambiguous = isinstance(error, BackendUnavailable) and error.maybe_applied
    if may_run_unverified(call, error) and unverified < limit:
        return Admission(reserved=0.0, verified=False)
    kind = BackendUnavailable if is_outage else BackendError
    reason = "is unreachable" if is_outage else "refused the check"
    capped = ""
    if ambiguous:
        capped = "; its reservation may have been made, so it does not run unverified"
    elif call.on_backend_error == "allow" and is_outage:
        capped = f"; {unverified} calls already ran unverified, the limit is {limit}"
    used = "a reservation may stand" if ambiguous else "no credits were used"
    msg = (
        f"{call.feature_id} is unavailable: the billing service {reason} "
        f"(customer {call.customer_id!r}){capped}; {used}. Cause: {error}"
    )
    raise kind(msg) from error


@dataclass(frozen=True, slots=True)
class Settlement:
    """What settles a call: the refund of its reservation, or the tracks of its usage.

    Attributes:
        refund: Sent with the closing of the hold: the whole reservation back (the call
            failed), or the part of it the call did not use (a negative adjustment).
        tracks: Usage to record: the whole of it, or what the call used beyond the
            estimate.
        finalize: Settles a lock: confirm (with the real count) or release.
    """

    refund: TrackRequest | None = None
    tracks: tuple[TrackRequest, ...] = ()
    finalize: FinalizeRequest | None = None


def settlement(
    call: MeteredCall,
    admitted: Admission,
    *,
    succeeded: bool,
    actual_units: float | None = None,
) -> Settlement:
    """What makes the bill match the outcome.

    Success keeps what was reserved, tracks it when nothing was (``check_then_track`` or an
    unverified call), and tracks the difference when the real count (``actual_units``)
    differs from the estimate. Failure refunds what was reserved and tracks nothing else.
    A lock is settled by its finalize instead: confirmed with the real count, or released.
    """
    if call.gate_only or admitted.replay:
        return Settlement()
    final = call.units if actual_units is None else actual_units
    hold = admitted.hold
    if hold is not None and hold.lock:
        return Settlement(finalize=hold.finalize(succeeded=succeeded, units=final))
    if not succeeded:
        refund = None
        if hold is not None:  # under the attempt's refund key (see hold_for)
            refund = hold.refund()
        elif admitted.reserved:
            refund = _track(call, -admitted.reserved, "refund")
        return Settlement(refund=refund)
    delta = final - admitted.reserved
    if delta == 0:
        return Settlement()
    if delta < 0 and admitted.hold is not None:
        # What was reserved and not used goes back with the closing of the hold, in one
        # commit on the embedded ledgers: a crash cannot leave it half done.
        return Settlement(refund=_track(call, delta, "adjust"))
    return Settlement(tracks=(_track(call, delta, "adjust" if admitted.reserved else "track"),))


def _track(call: MeteredCall, value: float, purpose: str) -> TrackRequest:
    return TrackRequest(call.customer_id, call.feature_id, value, call.key(purpose), call.entity_id)
