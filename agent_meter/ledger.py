"""The Autumn rules the embedded backends follow, as pure functions over small values.

Amounts are kept as integers in billionths of a unit ("nano"), so that 100 credits minus
1.83 is 98.17 exactly and sums in SQL are exact. :class:`~agent_meter.backends.sqlite.
SQLiteBackend` and :class:`~agent_meter.testing.MemoryBackend` store :class:`Balance`
rows their own way and ask these functions what a check or a track does to them.
"""

from __future__ import annotations

import calendar
import datetime as dt
import logging
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_EVEN, Decimal

from agent_meter.engine import FinalizeRequest, TrackRequest
from agent_meter.errors import ConfigError, InvalidUsage
from agent_meter.pricing import UNLIMITED, FeatureType, Pricing
from agent_meter.results import CheckResult, TrackResult
from agent_meter.validation import (
    check_customer_id,
    check_entity_id,
    check_feature_id,
    check_units,
)

logger = logging.getLogger("agent_meter")

__all__ = [
    "SCALE",
    "Balance",
    "Charge",
    "admin_balance",
    "apply_track",
    "charge_for",
    "checked_now",
    "decide_check",
    "deducted_result",
    "duplicate_track",
    "from_nano",
    "initial_balances",
    "lock_adjustment",
    "plan_check",
    "plan_refund",
    "plan_track",
    "price_request",
    "readable",
    "refund_share",
    "replay_answer",
    "retired_hold_key",
    "roll_forward",
    "to_nano",
    "uncharged",
]

SCALE = 10**9
_SCALE_DECIMAL = Decimal(SCALE)
_MAX_AMOUNT = 2**62  # fits SQLite's 64-bit integers with room for sums

AMOUNT = "amount"
BOOLEAN = "boolean"
UNLIMITED_KIND = "unlimited"


def to_nano(amount: Decimal | float) -> int:
    """Convert an amount of units to integer billionths, rounding half to even."""
    if not isinstance(amount, Decimal):
        amount = Decimal(repr(float(amount)))
    return int((amount * _SCALE_DECIMAL).to_integral_value(ROUND_HALF_EVEN))


_LATEST = 253_402_300_799.0  # 9999-12-31T23:59:59Z: the last time a reset can be dated


def checked_now(now: float) -> float:
    """``now`` if a ledger can date resets from it, else ConfigError (a broken clock).

    Raises:
        ConfigError: ``now`` is not a finite Unix time between 1970 and the year 9999.
    """
    if isinstance(now, bool) or not isinstance(now, (int, float)) or not 0 <= now <= _LATEST:
        msg = f"the ledger's clock says {now!r}, which is not a Unix time a ledger can date"
        raise ConfigError(msg)
    return float(now)


def from_nano(nano: int) -> float:
    """Convert integer billionths back to a float (95170000000 -> 95.17)."""
    return nano / SCALE


@dataclass(frozen=True, slots=True)
class Charge:
    """What a use of a feature costs, in the units of the balance it draws from.

    Attributes:
        feature_id: The feature used.
        balance_id: The balance that pays: the credit system, else the feature.
        boolean: The feature is access-only.
        value: Units of the feature.
        amount: Cost in billionths of a ``balance_id`` unit (0 for boolean features).
    """

    feature_id: str
    balance_id: str
    boolean: bool
    value: float
    amount: int


def charge_for(pricing: Pricing, customer_id: str, feature_id: str, value: float) -> Charge:
    """Price ``value`` units of ``feature_id`` under ``pricing``.

    Raises:
        ConfigError: The feature is not in the pricing.
    """
    rate = pricing.rate_table.get(feature_id)
    if rate is None:
        msg = (
            f"unknown feature {feature_id!r} (customer {customer_id!r}): it is not declared "
            "in the pricing"
        )
        raise ConfigError(msg)
    if rate.boolean:
        return Charge(feature_id, feature_id, True, value, 0)
    if value.is_integer():
        amount = int(value) * rate.nano_per_unit
    else:
        amount = to_nano(Decimal(repr(value)) * rate.per_unit)
    if abs(amount) >= _MAX_AMOUNT:
        msg = (
            f"{value!r} units of {feature_id!r} (customer {customer_id!r}) is more than "
            f"a ledger can hold"
        )
        raise InvalidUsage(msg)
    return Charge(feature_id, rate.balance_id, False, value, amount)


@dataclass(frozen=True, slots=True)
class Balance:
    """One balance of one customer: a credit pool, a metered feature, or an access flag.

    Attributes:
        balance_id: The pool or feature id.
        kind: ``"amount"``, ``"boolean"`` or ``"unlimited"``.
        included: What the plans grant per interval (nano; 1 or 0 for boolean).
        balance: What is left (nano; 1 or 0 for boolean).
        interval: When ``balance`` resets to ``included``.
        next_reset_at: The next reset, as a Unix time, or None.
    """

    balance_id: str
    kind: str
    included: int
    balance: int
    interval: str
    next_reset_at: float | None

    def with_balance(self, balance: int) -> Balance:
        """This balance holding ``balance`` instead (faster than ``dataclasses.replace``)."""
        return Balance(
            self.balance_id, self.kind, self.included, balance, self.interval, self.next_reset_at
        )


def readable(balance: Balance) -> float | bool:
    """A balance as people read it: credits as a float, access as a bool, inf if unlimited."""
    if balance.kind == BOOLEAN:
        return balance.balance > 0
    if balance.kind == UNLIMITED_KIND:
        return float("inf")
    return from_nano(balance.balance)


def next_reset(interval: str, after: float) -> float | None:
    """The Unix time one ``interval`` after ``after`` (calendar months and years)."""
    if interval == "never":
        return None
    if interval == "day":
        return after + 86_400
    if interval == "week":
        return after + 7 * 86_400
    start = dt.datetime.fromtimestamp(after, tz=dt.timezone.utc)
    months = 1 if interval == "month" else 12
    month_index = start.month - 1 + months
    year, month = start.year + month_index // 12, month_index % 12 + 1
    if year > dt.MAXYEAR:  # past the last date a calendar can name: no further reset
        return None
    day = min(start.day, calendar.monthrange(year, month)[1])
    return start.replace(year=year, month=month, day=day).timestamp()


def initial_balances(pricing: Pricing, now: float) -> list[Balance]:
    """The balances a new customer starts with: the sum of the auto-enabled plans' grants."""
    merged: dict[str, Balance] = {}
    for _plan_id, plan in pricing.auto_plans():
        for key, amount in plan.grants.items():
            reset_at = next_reset(plan.interval, now)
            if amount == UNLIMITED:
                new = Balance(key, UNLIMITED_KIND, 0, 0, plan.interval, reset_at)
            elif isinstance(amount, bool):
                flag = int(amount)
                new = Balance(key, BOOLEAN, flag, flag, plan.interval, reset_at)
            else:
                nano = to_nano(float(amount))
                new = Balance(key, AMOUNT, nano, nano, plan.interval, reset_at)
            old = merged.get(key)
            if old is not None:
                new = _merge(old, new)
            merged[key] = new
    return list(merged.values())


def _merge(old: Balance, new: Balance) -> Balance:
    if UNLIMITED_KIND in (old.kind, new.kind):
        return replace(old, kind=UNLIMITED_KIND)
    if old.kind == BOOLEAN:
        flag = max(old.balance, new.balance)
        return replace(old, included=flag, balance=flag)
    return replace(old, included=old.included + new.included, balance=old.balance + new.balance)


def roll_forward(balance: Balance, now: float) -> Balance:
    """Apply the resets due by ``now``: the balance returns to what the plans include."""
    if balance.next_reset_at is None or now < balance.next_reset_at:
        return balance
    reset_at: float | None = balance.next_reset_at
    while reset_at is not None and now >= reset_at:
        reset_at = next_reset(balance.interval, reset_at)
    return replace(balance, balance=balance.included, next_reset_at=reset_at)


def decide_check(
    customer_id: str,
    charge: Charge,
    balance: Balance | None,
    *,
    send_event: bool,
    entity_id: str | None = None,
) -> tuple[CheckResult, Balance | None]:
    """Answer a check and say what it changes.

    Returns:
        The answer, and the balance to store when the check deducted (else None).
    """
    if charge.boolean:
        granted = balance is not None and (balance.kind == UNLIMITED_KIND or balance.balance > 0)
        result = CheckResult(
            allowed=granted,
            customer_id=customer_id,
            feature_id=charge.feature_id,
            required=1.0,
            balance=0.0 if granted else None,
            balance_feature_id=charge.balance_id,
            included_usage=0.0 if granted else None,  # as Autumn answers a granted flag
            usage=0.0 if granted else None,
            unlimited=balance is not None and balance.kind == UNLIMITED_KIND,
            entity_id=entity_id,
        )
        return result, None
    required = from_nano(charge.amount)
    if balance is None:
        denied = CheckResult(
            allowed=False,
            customer_id=customer_id,
            feature_id=charge.feature_id,
            required=required,
            balance=0.0,
            balance_feature_id=charge.balance_id,
            entity_id=entity_id,
        )
        return denied, None
    if balance.kind == UNLIMITED_KIND:
        result = CheckResult(
            allowed=True,
            customer_id=customer_id,
            feature_id=charge.feature_id,
            required=required,
            balance_feature_id=charge.balance_id,
            unlimited=True,
            entity_id=entity_id,
            deducted=send_event,
        )
        return result, None
    allowed = balance.balance >= charge.amount
    after = balance
    if allowed and send_event and charge.amount:
        after = balance.with_balance(balance.balance - charge.amount)
    result = CheckResult(
        allowed=allowed,
        customer_id=customer_id,
        feature_id=charge.feature_id,
        required=required,
        balance=from_nano(after.balance),
        balance_feature_id=charge.balance_id,
        included_usage=from_nano(after.included),
        usage=from_nano(max(after.included - after.balance, 0)),
        entity_id=entity_id,
        deducted=allowed and send_event,
    )
    return result, (after if after is not balance else None)


def deducted_result(
    customer_id: str, charge: Charge, included: int, balance: int, entity_id: str | None
) -> CheckResult:
    """The answer to a check that deducted ``charge``, leaving ``balance`` (nano)."""
    return CheckResult(  # from_nano written out: this runs on every reservation
        allowed=True,
        customer_id=customer_id,
        feature_id=charge.feature_id,
        required=charge.amount / SCALE,
        balance=balance / SCALE,
        balance_feature_id=charge.balance_id,
        included_usage=included / SCALE,
        usage=max(included - balance, 0) / SCALE,
        entity_id=entity_id,
        deducted=True,
    )


def apply_track(charge: Charge, balance: Balance | None) -> Balance | None:
    """The balance after tracking ``charge``: capped at 0, refunded when negative.

    Returns None when nothing changes (no such balance, unlimited, or a zero value).

    Raises:
        InvalidUsage: The feature is boolean: access is gated, never tracked.
    """
    if charge.boolean:
        msg = f"{charge.feature_id!r} is a boolean feature: it is checked, never tracked"
        raise InvalidUsage(msg)
    if balance is None or balance.kind != AMOUNT or charge.amount == 0:
        return None
    return balance.with_balance(max(balance.balance - charge.amount, 0))


def plan_check(
    customer_id: str,
    charge: Charge,
    stored: Balance | None,
    now: float,
    *,
    send_event: bool,
    entity_id: str | None = None,
) -> tuple[CheckResult, Balance | None]:
    """A check from a stored balance: apply due resets, then decide.

    Returns:
        The answer, and the balance to write back (None when nothing changed).
    """
    rolled = None if stored is None else roll_forward(stored, now)
    result, after = decide_check(
        customer_id, charge, rolled, send_event=send_event, entity_id=entity_id
    )
    if after is None and rolled is not stored:
        after = rolled
    return result, after


def replay_answer(
    customer_id: str,
    charge: Charge,
    stored: Balance | None,
    now: float,
    *,
    entity_id: str | None = None,
) -> CheckResult:
    """The answer to a reservation of a call that holds its reservation already.

    The call was reserved (and, if it ended, succeeded) before: it runs again without a
    second charge, whatever the balance is now, even 0. Both embedded backends answer a
    replay with this, so they agree.
    """
    result, _ = plan_check(customer_id, charge, stored, now, send_event=False, entity_id=entity_id)
    return replace(result, allowed=True, deducted=False, replayed=True)


def retired_hold_key(refund_key: str) -> str:
    """The key a hold keeps in the ledger once it is refunded (its call failed).

    A call's hold key is what makes a replay free; a call that failed was refunded and
    never paid, so its key is retired (renamed after the attempt, whose refund key is
    unique: ``...:<call>.r<attempt>:hold``) and a retry under the same call id is
    reserved, and billed, as a new attempt. Only the refund under the hold's own refund
    key retires it: giving back the unused part of a reservation (a success that used
    less than its estimate) leaves the call reserved.
    """
    return f"{refund_key.removesuffix(':refund')}:hold"


def plan_track(charge: Charge, stored: Balance | None, now: float) -> tuple[Balance | None, int]:
    """A track from a stored balance: apply due resets, then deduct (capped) or refund.

    Returns:
        The balance to write back (None when nothing changed) and the change applied to
        it in nano (negative for a deduction).
    """
    rolled = None if stored is None else roll_forward(stored, now)
    after = apply_track(charge, rolled)
    if after is None or rolled is None:
        return (rolled if rolled is not stored else None), 0
    return after, after.balance - rolled.balance


def refund_share(deducted: int, reserved_units: float, refund_units: float) -> int:
    """What a refund of ``refund_units`` of a reservation gives back, in nano.

    Priced at the reservation's own rate (``deducted`` for ``reserved_units``), never at
    today's: the whole reservation gives back exactly what it deducted, a part of it
    (the unused rest of an estimate) its share of that, and never more than the whole.
    """
    if refund_units >= reserved_units or reserved_units <= 0:
        return deducted
    share = Decimal(deducted) * Decimal(repr(refund_units)) / Decimal(repr(reserved_units))
    return min(deducted, max(int(share.to_integral_value(ROUND_HALF_EVEN)), 0))


def plan_refund(
    amount: int,
    period: float | None,
    stored: Balance | None,
    now: float,
    *,
    period_unknown: bool = False,
) -> tuple[Balance | None, int]:
    """Give back a reservation's deduction: exactly ``amount`` nano, in its own period only.

    A hold remembers what it deducted, so a price change between the reservation and its
    refund changes nothing. A reservation spans a reset when the balance has been reset
    since it was taken (``period``, the balance's ``next_reset_at`` then, is no longer the
    current one). The reset already restored the whole grant, and the reserved credits
    belonged to a period that has ended, so such a refund gives nothing back: a refund
    never creates credits the customer was not granted. Within its period a refund is
    exact, above the grant too (a top-up keeps its refunds).

    Args:
        amount: What the reservation deducted (nano, positive).
        period: ``next_reset_at`` of the balance when the reservation was taken.
        stored: The balance now, as stored.
        now: Unix time.
        period_unknown: The reservation predates recorded periods (a ledger written by an
            older version): the refund is applied, but never lifts the balance above the
            grant unless it already was.

    Returns:
        The balance to write back (None when nothing changed) and the change applied.
    """
    rolled = None if stored is None else roll_forward(stored, now)
    unchanged = rolled if rolled is not stored else None
    if rolled is None or rolled.kind != AMOUNT or amount <= 0:
        return unchanged, 0
    if period_unknown:
        target = min(rolled.balance + amount, max(rolled.balance, rolled.included))
        if target == rolled.balance:
            return unchanged, 0
        return rolled.with_balance(target), target - rolled.balance
    if rolled.next_reset_at != period:
        return unchanged, 0
    return rolled.with_balance(rolled.balance + amount), amount


def uncharged(charge: Charge, stored: Balance | None, applied: int) -> float:
    """Units of a track the balance could not pay: it was capped at 0, or there was none.

    Args:
        charge: The track's charge.
        stored: The balance it drew from, before the track (None when the customer has
            none for it).
        applied: What the track changed on the balance (nano; negative for a deduction).
    """
    if charge.amount <= 0 or (stored is not None and stored.kind != AMOUNT):
        return 0.0
    unpaid = charge.amount + applied  # applied is minus what was deducted
    if unpaid <= 0:
        return 0.0
    return charge.value * unpaid / charge.amount


def admin_balance(
    pricing: Pricing, customer_id: str, balance_id: str, value: float | bool
) -> tuple[str, int]:
    """Validate a balance set by an administrator and return its (kind, nano amount).

    Raises:
        ConfigError: ``balance_id`` is unknown, or is a feature that draws from a pool.
        InvalidUsage: ``value`` does not fit the balance.
    """
    if balance_id in pricing.credit_systems:
        is_boolean = False
    else:
        kind = pricing.feature_type(balance_id)
        if kind is None:
            msg = f"unknown balance {balance_id!r}: neither a feature nor a credit system"
            raise ConfigError(msg)
        pool = pricing.pool_of(balance_id)
        if pool is not None:
            msg = f"{balance_id!r} draws from {pool[0]!r}: set the balance of {pool[0]!r}"
            raise ConfigError(msg)
        is_boolean = kind is FeatureType.BOOLEAN
    if is_boolean:
        if not isinstance(value, bool):
            msg = f"{balance_id!r} is boolean: set it to True or False, not {value!r}"
            raise InvalidUsage(msg)
        return BOOLEAN, int(value)
    units = check_units(value, feature_id=balance_id, customer_id=customer_id)
    nano = to_nano(units)
    if nano >= _MAX_AMOUNT:
        msg = (
            f"a balance of {value!r} {balance_id!r} (customer {customer_id!r}) is more than a "
            f"ledger holds ({_MAX_AMOUNT // SCALE})"
        )
        raise InvalidUsage(msg)
    return AMOUNT, nano


def price_request(
    pricing: Pricing,
    customer_id: object,
    feature_id: object,
    value: object,
    *,
    entity_id: object = None,
    track: bool = False,
    idempotency_key: object = None,
) -> tuple[str, str | None, Charge]:
    """Validate a check, or a track (``track=True``, with its key), and price it.

    Returns:
        The customer id, the entity id and the :class:`Charge`.

    Raises:
        InvalidUsage: An id, the value or the key is malformed, or a track names a
            boolean feature.
        ConfigError: The feature is not in the pricing.
    """
    customer = check_customer_id(customer_id)
    feature = check_feature_id(feature_id)
    entity = check_entity_id(entity_id)
    is_track = track
    units = check_units(value, feature_id=feature, customer_id=customer, allow_negative=is_track)
    if is_track and (not isinstance(idempotency_key, str) or not idempotency_key.strip()):
        msg = f"track of {feature!r} for {customer!r} needs a non-empty idempotency_key"
        raise InvalidUsage(msg)
    charge = charge_for(pricing, customer, feature, units)
    if is_track and charge.boolean:
        apply_track(charge, None)  # raises InvalidUsage: boolean features are gated only
    return customer, entity, charge


def duplicate_track(
    customer_id: str, feature_id: str, sent: float, stood: float, idempotency_key: str
) -> TrackResult:
    """The answer to a track whose key was recorded before: the value that stands.

    A key names one use: sent again with another value, the new value is not applied.
    The result says which value stands, and a warning says the two differ.
    """
    if sent != stood:
        logger.warning(
            "agent_meter: idempotency key %r was recorded before with %s units of %r "
            "(customer %r); the new value %s was not applied",
            idempotency_key,
            f"{stood:g}",
            feature_id,
            customer_id,
            f"{sent:g}",
        )
    return TrackResult(
        customer_id, feature_id, stood, idempotency_key, duplicate=True, uncharged=0.0
    )


def lock_adjustment(request: FinalizeRequest) -> TrackRequest | None:
    """The track an embedded ledger applies, with closing the hold, to finalize a lock.

    Autumn's semantics (facts 11 and 17 of the cassettes' README): release returns the
    hold exactly, a confirm with ``override_value`` charges that value instead of the
    hold (the difference is returned or charged), and neither is capped at the grant.
    """
    delta = request.value - request.held
    if delta == 0:
        return None
    return TrackRequest(
        request.customer_id,
        request.feature_id,
        delta,
        f"{request.lock_id}:{request.action}",
        request.entity_id,
    )
