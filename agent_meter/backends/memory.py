"""The in-memory backend: the SQLite ledger's semantics without a file, recording every call.

Re-exported from :mod:`agent_meter.testing`, where tests usually import it.

Example:
    >>> from agent_meter.testing import MemoryBackend
    >>> backend = MemoryBackend(pricing=pricing)
    >>> backend.set_balance("cus_1", "credits", 1)
    >>> backend.fail(method="track", times=1)        # the next track raises BackendUnavailable
    >>> backend.deny(feature_id="web_search")        # checks of web_search answer allowed=False
    >>> [call.method for call in backend.calls]
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from agent_meter import ledger
from agent_meter.backends.locks_on_holds import LocksOnHolds
from agent_meter.engine import CheckRequest, Hold, TrackRequest
from agent_meter.errors import BackendUnavailable, CustomerNotFound
from agent_meter.ledger import Balance
from agent_meter.pricing import Pricing
from agent_meter.results import CheckResult, TrackResult, UsageEvent
from agent_meter.validation import check_customer_id

__all__ = ["MemoryBackend", "RecordedCall"]


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One call a :class:`MemoryBackend` received.

    Attributes:
        method: ``"check"`` or ``"track"`` (async calls are recorded under the same name).
        customer_id: The customer.
        feature_id: The feature.
        kwargs: Every other argument, as passed.
    """

    method: str
    customer_id: str
    feature_id: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Fault:
    error: Callable[[], Exception]
    method: str | None
    feature_id: str | None
    remaining: int | None


class MemoryBackend(LocksOnHolds):
    """The backend contract in memory, with the same semantics as SQLiteBackend.

    Thread-safe; its async methods run inline (no I/O to wait for). Besides the protocol
    it records every call in :attr:`calls`, can be told to :meth:`deny` checks or to
    :meth:`fail` calls, and offers the embedded backends' admin and report methods.

    Args:
        pricing: Features, credit systems and plans.
        clock: Returns the current Unix time.
    """

    is_local = True
    """The ledger is in this process's reach: the meter settles calls inline."""

    def __init__(self, *, pricing: Pricing, clock: Callable[[], float] = time.time) -> None:
        self._pricing = pricing
        self._clock = clock
        self._lock = threading.Lock()
        self._balances: dict[tuple[str, str], Balance] = {}
        self._customers: set[str] = set()
        self._keys: set[str] = set()
        self._events: list[UsageEvent] = []
        self._denied: list[tuple[str | None, str | None]] = []
        self._faults: list[_Fault] = []
        self._holds: dict[str, Hold] = {}
        # what each open hold deducted (nano) and in which period: what its refund gives
        self._held: dict[str, tuple[int, str, float | None]] = {}
        self._reserved: set[str] = set()
        self.calls: list[RecordedCall] = []
        """Every check and track received, in order (also those that failed)."""

    def __repr__(self) -> str:
        return f"MemoryBackend(customers={len(self._customers)}, events={len(self._events)})"

    @property
    def pricing(self) -> Pricing:
        """The pricing this ledger bills by."""
        return self._pricing

    # -- steering, for tests -------------------------------------------------------------

    def deny(self, *, feature_id: str | None = None, customer_id: str | None = None) -> None:
        """Answer ``allowed=False`` to matching checks from now on (None matches all)."""
        with self._lock:
            self._denied.append((feature_id, customer_id))

    def fail(
        self,
        error: Exception | Callable[[], Exception] | None = None,
        *,
        method: str | None = None,
        times: int | None = None,
        feature_id: str | None = None,
    ) -> None:
        """Make calls raise ``error`` (default: BackendUnavailable).

        Args:
            error: An exception, or a factory of exceptions.
            method: ``"check"`` (reservations included) or ``"track"`` (refunds included);
                None fails both.
            times: Fail this many calls, then behave again; None fails until :meth:`heal`.
            feature_id: Fail only calls about this feature; None fails all.
        """
        if error is None:
            factory: Callable[[], Exception] = lambda: BackendUnavailable(  # noqa: E731
                "MemoryBackend told to fail"
            )
        elif isinstance(error, Exception):
            factory = lambda: error  # noqa: E731
        else:
            factory = error
        with self._lock:
            self._faults.append(_Fault(factory, method, feature_id, times))

    def heal(self) -> None:
        """Forget every :meth:`deny` and :meth:`fail`."""
        with self._lock:
            self._denied.clear()
            self._faults.clear()

    def _record(self, method: str, customer_id: str, feature_id: str, **kwargs: Any) -> None:
        self.calls.append(RecordedCall(method, customer_id, feature_id, kwargs))
        for fault in self._faults:
            if fault.method not in (None, method) or fault.remaining == 0:
                continue
            if fault.feature_id not in (None, feature_id):
                continue
            if fault.remaining is not None:
                fault.remaining -= 1
            raise fault.error()

    def _is_denied(self, customer_id: str, feature_id: str) -> bool:
        return bool(self._denied) and any(
            feature in (None, feature_id) and customer in (None, customer_id)
            for feature, customer in self._denied
        )

    # -- the protocol ----------------------------------------------------------------------

    def _stored(self, customer_id: str, balance_id: str, now: float) -> Balance | None:
        if customer_id not in self._customers:
            self._customers.add(customer_id)
            for balance in ledger.initial_balances(self._pricing, now):
                self._balances[customer_id, balance.balance_id] = balance
        return self._balances.get((customer_id, balance_id))

    def check(self, request: CheckRequest) -> CheckResult:
        """Answer a check; with ``send_event=True``, deduct atomically when allowed."""
        customer_id, feature_id = request.customer_id, request.feature_id
        units, send_event, entity_id = (
            request.required_balance,
            request.send_event,
            request.entity_id,
        )
        with self._lock:
            self._record(
                "check",
                customer_id,
                feature_id,
                required_balance=units,
                send_event=send_event,
                entity_id=entity_id,
            )
            return self._check(customer_id, feature_id, units, entity_id, send_event)

    def _check(
        self,
        customer_id: str,
        feature_id: str,
        units: float,
        entity_id: str | None,
        send_event: bool,
        *,
        priced: ledger.Charge | None = None,
        key: str | None = None,
    ) -> CheckResult:
        """A check under the lock; records the reservation it makes (under ``key``)."""
        if priced is not None:  # a hold, built by the meter from a validated call
            charge = priced
        else:
            customer_id, entity_id, charge = ledger.price_request(
                self._pricing, customer_id, feature_id, units, entity_id=entity_id
            )
        now = ledger.checked_now(self._clock())
        stored = self._stored(customer_id, charge.balance_id, now)
        if self._is_denied(customer_id, feature_id):
            result, _ = ledger.plan_check(customer_id, charge, stored, now, send_event=False)
            return replace(result, allowed=False, deducted=False)
        result, after = ledger.plan_check(
            customer_id, charge, stored, now, send_event=send_event, entity_id=entity_id
        )
        if after is not None:
            self._balances[customer_id, charge.balance_id] = after
        if result.deducted and charge.amount:
            credits = ledger.from_nano(charge.amount)
            self._events.append(
                UsageEvent(
                    now,
                    customer_id,
                    entity_id,
                    feature_id,
                    charge.balance_id,
                    "reserve",
                    charge.value,
                    credits,
                    -credits,
                    key,
                )
            )
        return result

    def track(self, request: TrackRequest) -> TrackResult:
        """Record usage: capped at 0, refunded when negative, once per idempotency key."""
        customer_id, feature_id, value = request.customer_id, request.feature_id, request.value
        idempotency_key, entity_id = request.idempotency_key, request.entity_id
        with self._lock:
            self._record(
                "track",
                customer_id,
                feature_id,
                value=value,
                idempotency_key=idempotency_key,
                entity_id=entity_id,
                properties=request.properties,
            )
            return self._track(customer_id, feature_id, value, idempotency_key, entity_id)

    def _track(
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        idempotency_key: str,
        entity_id: str | None,
    ) -> TrackResult:
        """A track under the lock."""
        customer_id, entity_id, charge = ledger.price_request(
            self._pricing,
            customer_id,
            feature_id,
            value,
            entity_id=entity_id,
            track=True,
            idempotency_key=idempotency_key,
        )
        if idempotency_key in self._keys:
            stood = next(
                (e.value for e in self._events if e.idempotency_key == idempotency_key),
                charge.value,
            )
            return ledger.duplicate_track(
                customer_id, feature_id, charge.value, stood, idempotency_key
            )
        now = ledger.checked_now(self._clock())
        stored = self._stored(customer_id, charge.balance_id, now)
        after, applied = ledger.plan_track(charge, stored, now)
        if after is not None:
            self._balances[customer_id, charge.balance_id] = after
        self._keys.add(idempotency_key)
        self._events.append(
            UsageEvent(
                now,
                customer_id,
                entity_id,
                feature_id,
                charge.balance_id,
                "track",
                charge.value,
                ledger.from_nano(charge.amount),
                ledger.from_nano(applied),
                idempotency_key,
            )
        )
        return TrackResult(
            customer_id,
            feature_id,
            charge.value,
            idempotency_key,
            uncharged=ledger.uncharged(charge, stored, applied),
        )

    def record_denial(
        self, customer_id: str, feature_id: str, units: float, entity_id: str | None = None
    ) -> None:
        """Keep a refused call in the ledger (kind ``denied``, nothing applied), for reports."""
        with self._lock:
            charge = ledger.charge_for(self._pricing, customer_id, feature_id, units)
            self._events.append(
                UsageEvent(
                    ledger.checked_now(self._clock()),
                    customer_id,
                    entity_id,
                    feature_id,
                    charge.balance_id,
                    "denied",
                    charge.value,
                    ledger.from_nano(charge.amount),
                    0.0,
                    None,
                )
            )

    # -- reservations held by a process ------------------------------------------------------

    def reserve(self, hold: Hold) -> CheckResult:
        """Check and deduct ``hold.units`` atomically, recording the hold with it."""
        with self._lock:
            self._record(
                "check",
                hold.customer_id,
                hold.feature_id,
                required_balance=hold.units,
                send_event=True,
                entity_id=hold.entity_id,
            )
            if hold.key in self._reserved:  # a replayed call: reserved once, never twice
                charge = ledger.charge_for(
                    self._pricing, hold.customer_id, hold.feature_id, hold.units
                )
                now = ledger.checked_now(self._clock())
                stored = self._stored(hold.customer_id, charge.balance_id, now)
                return ledger.replay_answer(
                    hold.customer_id, charge, stored, now, entity_id=hold.entity_id
                )
            charge = ledger.charge_for(self._pricing, hold.customer_id, hold.feature_id, hold.units)
            result = self._check(
                hold.customer_id,
                hold.feature_id,
                hold.units,
                hold.entity_id,
                True,
                priced=charge,
                key=hold.key,  # as the SQLite ledger records it
            )
            if result.deducted:
                self._holds[hold.key] = hold
                balance = self._balances.get((hold.customer_id, charge.balance_id))
                period = None if balance is None else balance.next_reset_at
                self._held[hold.key] = (charge.amount, charge.balance_id, period)
                self._reserved.add(hold.key)
            return result

    def release(self, key: str, refund: TrackRequest | None = None) -> bool:
        """Close a hold, refunding in the same step when ``refund`` is given."""
        with self._lock:
            if refund is not None:
                self._record(
                    "track",
                    refund.customer_id,
                    refund.feature_id,
                    value=refund.value,
                    idempotency_key=refund.idempotency_key,
                    entity_id=refund.entity_id,
                    properties=None,
                )
            hold = self._holds.pop(key, None)
            if hold is None:
                return False
            amount, balance_id, period = self._held.pop(key)
            if refund is not None:
                if refund.idempotency_key == hold.refund_key:
                    # the call failed: its key is retired (see ledger.retired_hold_key)
                    self._reserved.discard(key)
                if refund.value > 0:  # a lock confirmed above its hold: charged on top
                    self._track(
                        refund.customer_id,
                        refund.feature_id,
                        refund.value,
                        refund.idempotency_key,
                        refund.entity_id,
                    )
                else:
                    share = ledger.refund_share(amount, hold.units, -refund.value)
                    self._refund(refund, share, balance_id, period)
            return True

    def _refund(
        self, refund: TrackRequest, amount: int, balance_id: str, period: float | None
    ) -> None:
        """Give back what a hold deducted, at its price, in its own period only (locked)."""
        customer_id, entity_id, charge = ledger.price_request(
            self._pricing,
            refund.customer_id,
            refund.feature_id,
            refund.value,
            entity_id=refund.entity_id,
            track=True,
            idempotency_key=refund.idempotency_key,
        )
        if refund.idempotency_key in self._keys:
            return
        now = ledger.checked_now(self._clock())
        stored = self._stored(customer_id, balance_id, now)
        after, applied = ledger.plan_refund(amount, period, stored, now)
        if after is not None:
            self._balances[customer_id, balance_id] = after
        self._keys.add(refund.idempotency_key)
        self._events.append(
            UsageEvent(
                now,
                customer_id,
                entity_id,
                charge.feature_id,
                balance_id,
                "track",
                charge.value,
                -ledger.from_nano(amount),
                ledger.from_nano(applied),
                refund.idempotency_key,
            )
        )

    def holds(self) -> list[Hold]:
        """Every open hold, oldest first."""
        with self._lock:
            return sorted(self._holds.values(), key=lambda hold: hold.created_at)

    async def areserve(self, hold: Hold) -> CheckResult:
        """Async :meth:`reserve` (runs inline)."""
        return self.reserve(hold)

    async def arelease(self, key: str, refund: TrackRequest | None = None) -> bool:
        """Async :meth:`release` (runs inline)."""
        return self.release(key, refund)

    def close(self) -> None:
        """Nothing to release; present for the protocol."""

    async def acheck(self, request: CheckRequest) -> CheckResult:
        """Async :meth:`check` (runs inline: nothing to wait for)."""
        return self.check(request)

    async def atrack(self, request: TrackRequest) -> TrackResult:
        """Async :meth:`track` (runs inline: nothing to wait for)."""
        return self.track(request)

    async def aclose(self) -> None:
        """Nothing to release; present for the protocol."""

    # -- administration and reports ------------------------------------------------------

    def set_balance(self, customer_id: str, balance_id: str, value: float | bool) -> None:
        """Set a customer's balance of a credit system or a feature (admin)."""
        customer_id = check_customer_id(customer_id)
        kind, nano = ledger.admin_balance(self._pricing, customer_id, balance_id, value)
        with self._lock:
            now = ledger.checked_now(self._clock())
            current = self._stored(customer_id, balance_id, now)
            if current is None:
                current = Balance(balance_id, kind, 0, 0, "never", None)
            current = ledger.roll_forward(current, now)
            self._balances[customer_id, balance_id] = replace(current, kind=kind, balance=nano)

    def balances(self, customer_id: str) -> dict[str, float | bool]:
        """A customer's balances by pool or feature id (booleans as True/False)."""
        customer_id = check_customer_id(customer_id)
        with self._lock:
            if customer_id not in self._customers:
                raise CustomerNotFound(customer_id, "memory")
            now = ledger.checked_now(self._clock())
            rows = [
                ledger.roll_forward(balance, now)
                for (customer, _), balance in self._balances.items()
                if customer == customer_id
            ]
        return {b.balance_id: ledger.readable(b) for b in sorted(rows, key=lambda b: b.balance_id)}

    def customers(self) -> list[str]:
        """Every customer the ledger has seen, sorted."""
        with self._lock:
            return sorted(self._customers)

    def events(
        self,
        customer_id: str | None = None,
        *,
        since: float | None = None,
        feature_id: str | None = None,
    ) -> list[UsageEvent]:
        """The ledger's events in order, optionally for one customer, feature or period."""
        with self._lock:
            return [
                event
                for event in self._events
                if customer_id in (None, event.customer_id)
                and feature_id in (None, event.feature_id)
                and (since is None or event.at >= since)
            ]
