"""The I/O of a guarded call, a track and a recovery, written once for sync and async callers.

Each flow is a generator (the shape of httpx's auth flow): it decides, in plain Python,
what to do next, and yields an :class:`Effect` (check the backend, reserve, close a hold,
queue a track) instead of doing it. A driver performs the effect and sends its result back
in, or throws its exception in, until the flow returns. :func:`run` performs effects in
the caller's thread; :func:`arun` awaits a backend's native async method when it has one
and runs every other effect (the SQLite ledger, the outbox, the hold journal: blocking
local I/O) in a worker thread, so an event loop never waits on a file lock.

The decisions themselves are the pure functions of :mod:`agent_meter.engine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from agent_meter import engine
from agent_meter.backends.base import (
    DeferredSettles,
    DenialRecorder,
    FullBackend,
    KeyedReserves,
    LockingBackend,
    ReservingBackend,
)
from agent_meter.delivery import Deliverer
from agent_meter.engine import (
    Admission,
    CheckRequest,
    FinalizeRequest,
    Hold,
    MeteredCall,
    TrackRequest,
    VoidReserve,
)
from agent_meter.errors import (
    AgentMeterError,
    BackendError,
    BackendUnavailable,
    ConfigError,
    UsageLimitExceeded,
)
from agent_meter.hooks import Admitted, Denied, Hooks, ReserveInDoubt, SettleFailed, Unverified
from agent_meter.outbox import Outbox, Queued
from agent_meter.owner import current_owner, owner_is_alive
from agent_meter.pricing import Pricing
from agent_meter.results import CheckResult, TrackResult

__all__ = ["Effect", "Flow", "Flows", "Recovery", "arun", "run"]

logger = logging.getLogger("agent_meter")

T = TypeVar("T")


class Effect:
    """One piece of I/O a flow asks its driver to perform.

    Attributes:
        call: Performs it, blocking the caller's thread.
        acall: Its native async twin (a backend's ``acheck``), or None for blocking local
            work that the async driver runs in a worker thread.
        args: The arguments of either.
        shield: The async driver lets it finish even when the caller is cancelled (a
            reservation: the flow must know whether it was made, to give it back).
    """

    __slots__ = ("acall", "args", "call", "shield")

    def __init__(
        self,
        call: Callable[..., Any],
        acall: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
        *,
        shield: bool = False,
    ) -> None:
        self.call = call
        self.acall = acall
        self.args = args
        self.shield = shield

    def __repr__(self) -> str:
        return f"Effect({getattr(self.call, '__qualname__', self.call)!r})"


def local(call: Callable[..., Any], *args: Any) -> Effect:
    """Blocking local work (a file, a lock): a worker thread under the async driver."""
    return Effect(call, None, args)


def remote(call: Callable[..., Any], acall: Callable[..., Awaitable[Any]], *args: Any) -> Effect:
    """A backend call with a native async twin."""
    return Effect(call, acall, args)


Flow = Generator[Effect, Any, T]
"""A flow: yields effects, receives their results, returns its answer."""


def run(flow: Flow[T]) -> T:
    """Drive ``flow`` to its end in this thread."""
    try:
        effect = next(flow)
        while True:
            try:
                result = effect.call(*effect.args)
            except BaseException as exc:  # noqa: BLE001 - thrown into the flow, which decides
                effect = flow.throw(exc)
            else:
                effect = flow.send(result)
    except StopIteration as stop:
        answer: T = stop.value
        return answer


async def arun(flow: Flow[T]) -> T:
    """Drive ``flow`` to its end without ever blocking the event loop."""
    try:
        effect = next(flow)
        while True:
            try:
                if effect.acall is not None:
                    awaitable = effect.acall(*effect.args)
                else:
                    awaitable = asyncio.to_thread(effect.call, *effect.args)
                result = await (_shielded(awaitable) if effect.shield else awaitable)
            except BaseException as exc:  # noqa: BLE001 - thrown into the flow, which decides
                effect = flow.throw(exc)
            else:
                effect = flow.send(result)
    except StopIteration as stop:
        answer: T = stop.value
        return answer


class Cancelled(asyncio.CancelledError):
    """The caller was cancelled while a shielded effect ran; the effect ran to its end.

    Attributes:
        outcome: What the effect returned (None when it raised).
        error: What it raised, if it did.
    """

    def __init__(self, outcome: object, error: BaseException | None) -> None:
        super().__init__()
        self.outcome = outcome
        self.error = error


def shielded(call: Callable[..., Any], acall: Callable[..., Awaitable[Any]], *args: Any) -> Effect:
    """A reservation, which the async driver lets finish even when its caller is cancelled.

    It then throws :class:`Cancelled` (with the outcome) into the flow, which gives it back.
    """
    return Effect(call, acall, args, shield=True)


async def _shielded(awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the caller is cancelled meanwhile, let it finish first.

    The cancellation is raised once it has finished, as :class:`Cancelled` carrying what
    it returned or raised, so the flow can undo what it did (a reservation made in a
    worker thread or already on the wire goes on after its awaiter is cancelled).
    """
    task = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            await asyncio.wait({task})  # not cancellable by the same cancel
        if task.cancelled():
            raise
        error = task.exception()
        raise Cancelled(None if error else task.result(), error) from None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What :meth:`Meter.recover <agent_meter.Meter.recover>` did.

    Attributes:
        refunded: Reservations of dead processes given back.
        uncertain: Reservations whose check was sent by a process that died before the
            answer (remote backends only). With keyed reserves (Autumn) each is voided
            through the outbox: refunded once if the backend received it.
        delivered: Queued tracks delivered.
        pending: Tracks still waiting in the outbox.
    """

    refunded: int
    uncertain: int
    delivered: int
    pending: int


def queued(request: Queued) -> TrackResult:
    """The answer for a track (or a lock's finalize) kept in the outbox."""
    return TrackResult(
        request.customer_id,
        request.feature_id,
        request.value,
        request.idempotency_key,
        queued=True,
    )


class Flows:
    """The flows of one meter, over its backend, outbox and deliverer.

    Args:
        backend: The billing backend.
        outbox: Where undelivered tracks (and, for remote backends, holds) wait.
        deliverer: Delivers the outbox in the background.
        inline: The backend is local: deliver tracks to it now instead of queueing them.
        unverified_limit: Calls per customer that may run unverified while the backend
            is unreachable (see :func:`agent_meter.engine.admit_unverified`).
        hooks: Receive an event for each decision (see :mod:`agent_meter.hooks`).
        pricing: The feature catalogue, when known (prices a count before it is billed).
    """

    def __init__(
        self,
        backend: FullBackend,
        outbox: Outbox,
        deliverer: Deliverer,
        *,
        inline: bool,
        unverified_limit: int,
        hooks: Hooks,
        pricing: Pricing | None = None,
    ) -> None:
        self.backend = backend
        self.pricing = pricing
        self.holder = backend if isinstance(backend, ReservingBackend) else None
        self.locker = backend if isinstance(backend, LockingBackend) else None
        self.keyed = isinstance(backend, KeyedReserves) and backend.keyed_reserves
        self.denials = backend if isinstance(backend, DenialRecorder) else None
        self.outbox = outbox
        self.deliverer = deliverer
        self.inline = inline
        self.unverified_limit = unverified_limit
        self.hooks = hooks
        # Customers in an outage (calls ran unverified, counted in the outbox for every
        # process sharing it), whose next verified admission may end it.
        self._unverified: set[str] = outbox.unverified_customers()
        # Settlements whose bookkeeping failed: retried by the next call, flush and close.
        self._unsettled: list[tuple[Admission, engine.Settlement]] = []
        # Guarded calls between admission and settlement: close() lets them settle first.
        self._in_flight = 0
        # entered()/left() run on every call: they take the lock itself (a C call), not
        # the Condition's Python wrapper around it
        self._idle_lock = threading.Lock()
        self._idle = threading.Condition(self._idle_lock)
        self._when_idle: Callable[[], None] | None = None
        self.closing = False
        # Customers whose next check must wait for their queue (see _raises_balance_view),
        # and customers with anything queued: a track goes after all of it (Autumn caps a
        # track at 0, so one that overtakes a refund is lost). Seeded with what earlier
        # processes left in the outbox.
        self._behind: set[str] = set(outbox.pending_customers())
        self._queued_customers: set[str] = set(self._behind)

    # -- effects -------------------------------------------------------------------------

    def _check(self, request: CheckRequest) -> Effect:
        return remote(self.backend.check, self.backend.acheck, request)

    def _send(self, request: TrackRequest) -> Effect:
        return remote(self.backend.track, self.backend.atrack, request)

    def queue(self, requests: Sequence[Queued], close_hold: str | None = None) -> list[TrackResult]:
        """Keep tracks in the durable outbox and wake the deliverer (blocking)."""
        self.outbox.put(requests, now=time.time(), close_hold=close_hold)
        for request in requests:
            self._behind.add(request.customer_id)
            if _raises_balance_view(request):
                self._queued_customers.add(request.customer_id)
        if not self.closing:  # after close() the queue waits for the next meter
            self.deliverer.wake()
        return [queued(request) for request in requests]

    def drain_first(self, customer_id: str) -> None:
        """Deliver this customer's queue before a check or a track that must come after it.

        Raises:
            BackendUnavailable: Some of it is still undelivered.
        """
        if customer_id not in self._behind and customer_id not in self._queued_customers:
            return
        if not self.deliverer.drain(customer_id):
            msg = f"usage of {customer_id!r} queued earlier could not be delivered first"
            raise BackendUnavailable(msg)
        self._queued_customers.discard(customer_id)
        self._behind.discard(customer_id)
        if self.outbox.pending(customer_id):  # another thread queued meanwhile: keep it marked
            self._queued_customers.add(customer_id)
            self._behind.add(customer_id)

    def _after_queue(self, request: TrackRequest) -> Flow[bool]:
        """Deliver the customer's queue before ``request``; False: it could not be."""
        if request.customer_id not in self._behind:
            return True
        try:
            yield local(self.drain_first, request.customer_id)
        except BackendUnavailable:
            return False
        return True

    # -- calls in flight, and settlements to write again -----------------------------------

    def entered(self) -> None:
        """A guarded call begins: it is settled before close() closes the files.

        Raises:
            ConfigError: The meter is closed.
        """
        with self._idle_lock:
            if self.closing:
                msg = "this meter is closed: meter.close() was called; open a new Meter"
                raise ConfigError(msg)
            self._in_flight += 1

    def left(self) -> None:
        """A guarded call is settled (or was refused); the last one after close() closes."""
        with self._idle_lock:
            self._in_flight -= 1
            if self._in_flight or not self.closing:  # nobody waits before close()
                return
            self._idle.notify_all()
            then, self._when_idle = self._when_idle, None
        if then is not None:
            then()

    def wait_idle(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for the calls in flight; how many still run."""
        with self._idle:
            self._idle.wait_for(lambda: not self._in_flight, max(timeout, 0))
            return self._in_flight

    def defer_until_idle(self, then: Callable[[], None]) -> bool:
        """Run ``then`` when the last call in flight settles; False if none is in flight."""
        with self._idle:
            if not self._in_flight:
                return False
            self._when_idle = then
            return True

    def settle_later(
        self,
        call: MeteredCall,
        admission: Admission,
        settlement: engine.Settlement,
        failure: Exception,
        *,
        succeeded: bool,
        retry: bool = True,
    ) -> None:
        """The bookkeeping of a settled call failed: say so, and write it again later.

        The caller still gets the block's own result or exception. Settling is
        idempotent (a closed hold is not closed twice, a key is queued once), so the
        whole settlement is simply run again by :meth:`retry_unsettled` (unless
        ``retry`` is False: a rejection for good).
        """
        if retry:
            with self._idle:
                self._unsettled.append((admission, settlement))
        self.hooks.emit(
            SettleFailed(call, succeeded, f"{type(failure).__name__}: {failure}", time.time())
        )

    def retry_unsettled(self) -> int:
        """Write again the settlements that failed; returns how many still fail."""
        with self._idle:
            unsettled, self._unsettled = self._unsettled, []
        failed = []
        for admission, settlement in unsettled:
            try:
                run(self.settle(admission, settlement))
            except Exception as exc:  # noqa: BLE001 - kept for the next try, and logged
                logger.warning("agent_meter: a settlement failed again, kept for later: %s", exc)
                failed.append((admission, settlement))
        with self._idle:
            self._unsettled.extend(failed)
        return len(failed)

    @property
    def unsettled(self) -> int:
        """Settlements waiting to be written again."""
        return len(self._unsettled)

    def _record_denial(self, call: MeteredCall) -> None:
        """Keep the refusal in the ledger for reports; never let that hide the refusal."""
        if self.denials is None:
            return
        try:
            self.denials.record_denial(
                call.customer_id, call.feature_id, call.units, call.entity_id
            )
        except AgentMeterError as exc:
            logger.warning("agent_meter: could not record a denial of %s: %s", call.feature_id, exc)

    # -- the flows -----------------------------------------------------------------------

    def check(self, call: MeteredCall) -> Flow[CheckResult]:
        """Ask whether ``call`` may run, deducting nothing; queued usage is delivered first."""
        if call.customer_id in self._queued_customers:
            yield local(self.drain_first, call.customer_id)
        request = CheckRequest(
            call.customer_id, call.feature_id, call.units, entity_id=call.entity_id
        )
        result: CheckResult = yield self._check(request)
        return result

    def admit(self, call: MeteredCall) -> Flow[Admission]:
        """Admit ``call`` (reserving under ``reserve``) or refuse it.

        Raises:
            UsageLimitExceeded: The customer may not use the feature.
            BackendError: The check failed and the fail policy refuses the call.
        """
        request = engine.admission(call)
        hold = None
        if self._unsettled:
            yield local(self.retry_unsettled)
        try:
            if call.customer_id in self._queued_customers:
                yield local(self.drain_first, call.customer_id)
            if request.send_event:
                hold = self._hold_for(call)
                result = yield from self._reserve(hold, request)
            else:
                result = yield self._check(request)
        except BackendError as exc:
            return (yield from self._admit_unverified(call, exc))
        try:
            admitted = engine.admit(call, result, hold)
        except UsageLimitExceeded as refusal:
            self.hooks.emit(Denied(call, "limit", str(refusal), time.time()))
            if self.denials is not None:
                yield local(self._record_denial, call)
            raise
        if call.customer_id in self._unverified:
            yield local(self._end_outage, call.customer_id)
        if self.hooks.hears(logging.DEBUG):
            self.hooks.emit(Admitted(call, admitted.reserved, admitted.replay, time.time()))
        return admitted

    def _hold_for(self, call: MeteredCall) -> Hold:
        # An embedded ledger keeps one hold per call (it spots replays); a remote backend
        # keeps keys and lock ids past the call, so each admission is its own attempt.
        attempt = None if self.holder is not None else secrets.token_hex(4)
        return engine.hold_for(call, current_owner(), time.time(), attempt)

    def _reserve(self, hold: Hold, request: CheckRequest) -> Flow[CheckResult]:
        if (holder := self.holder) is not None:
            if hold.lock and (locker := self.locker) is not None:
                call, acall = locker.lock, locker.alock
            else:
                call, acall = holder.reserve, holder.areserve
            try:
                reserved: CheckResult = yield Effect(call, acall, (hold,), shield=True)
            except asyncio.CancelledError:
                # The async caller was cancelled while reserving; the driver let the
                # reservation finish: give it back (nothing happens if none was made).
                yield local(holder.release, hold.key, hold.refund())
                raise
            return reserved
        return (yield from self._reserve_remote(hold, request))

    def _reserve_remote(self, hold: Hold, request: CheckRequest) -> Flow[CheckResult]:
        # A remote backend: journal the hold before the check, so that a crash between
        # the deduction and the answer is found by recover().
        try:
            yield Effect(self.outbox.open_hold, None, (hold,), shield=True)
        except asyncio.CancelledError:
            yield local(self.outbox.close_hold, hold.key)  # nothing was sent
            raise
        try:
            if hold.lock:
                locker = self.locker
                if locker is None:  # the meter refuses 'lock' for such a backend
                    msg = f"strategy 'lock' needs a backend with locks, not {self.backend!r}"
                    raise BackendError(msg)
                result: CheckResult = yield shielded(locker.lock, locker.alock, hold)
            else:
                if self.keyed:  # a reserve whose answer was lost can be retried, once
                    request = dataclasses.replace(request, idempotency_key=hold.key)
                result = yield shielded(self.backend.check, self.backend.acheck, request)
        except asyncio.CancelledError as cancel:
            # Cancelled on the wire: the request ran to its end; give back what it took.
            yield from self._give_back(hold, cancel)
            raise
        except BackendUnavailable as exc:
            yield from self._unanswered(hold, exc)
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                yield local(self.outbox.close_hold, hold.key)
            raise
        if result.deducted:
            yield local(self.outbox.mark_held, hold.key)
        else:
            yield local(self.outbox.close_hold, hold.key)
        return result

    def _give_back(self, hold: Hold, cancel: asyncio.CancelledError) -> Flow[None]:
        """Undo the reservation of a caller cancelled on the wire, closing its journal entry.

        A lock is released by id, made or not (a release of a lock never made finds
        nothing); a reserve is refunded when its answer says it deducted, and kept for
        reconciliation when that answer is unknown (it may have landed).
        """
        outcome = getattr(cancel, "outcome", None)
        error = getattr(cancel, "error", None)
        if hold.lock:
            yield local(self.queue, (hold.finalize(succeeded=False),), hold.key)
        elif isinstance(outcome, CheckResult):
            if outcome.deducted:
                yield local(self.queue, (hold.refund(),), hold.key)
            else:
                yield local(self.outbox.close_hold, hold.key)
        elif isinstance(error, BackendUnavailable) and not error.maybe_applied:
            yield local(self.outbox.close_hold, hold.key)
        else:  # the answer was lost, or the request itself was cancelled
            key = error.reserve_key if isinstance(error, BackendUnavailable) else None
            yield from self._in_doubt(hold, f"cancelled while reserving ({error})", key)

    def _unanswered(self, hold: Hold, exc: BackendUnavailable) -> Flow[NoReturn]:
        """Settle the journal's hold of a reservation the backend did not answer; raise."""
        if not exc.maybe_applied:
            yield local(self.outbox.close_hold, hold.key)
            raise exc
        if hold.lock:
            # A lock that may stand is released by id (a release of a lock never made
            # finds nothing): then nothing stands, and the call may run unverified like
            # any other.
            yield local(self.queue, (hold.finalize(succeeded=False),), hold.key)
            msg = f"{exc}; its lock is released"
            raise BackendUnavailable(msg, maybe_applied=False) from exc
        # A v1 reserve may have deducted: its call does not run, and it is voided.
        if (yield from self._in_doubt(hold, str(exc), exc.reserve_key)):
            msg = f"{exc}; it is voided once the billing service answers"
            raise BackendUnavailable(msg, maybe_applied=True) from exc
        raise exc

    def _in_doubt(self, hold: Hold, error: str, key: str | None = None) -> Flow[bool]:
        """Keep a reserve whose answer was lost for reconciliation; never close it silently.

        Its call is refused, so it must not stay billed. A keyed reserve is voided through
        the outbox (:class:`~agent_meter.engine.VoidReserve`, queued in the commit that
        closes its hold): refunded once if the backend received it, its key spent if not.
        An unkeyed one cannot be told apart: the event is all that is left of it.

        Returns:
            True when the void is queued.
        """
        void = hold.void(key)
        if self.keyed:
            yield local(self.queue, (void,), hold.key)
        else:
            yield local(self.outbox.close_hold, hold.key)
        self.hooks.emit(_in_doubt_event(void, error, reconciled=self.keyed))
        return self.keyed

    def _admit_unverified(self, call: MeteredCall, error: BackendError) -> Flow[Admission]:
        """Run ``call`` unverified if the policy and the customer's cap allow, else refuse.

        The cap counts a customer's unverified calls in the outbox, across every process
        sharing it, for the whole outage: a backend that answers once in between (a flap)
        gives no new allowance. See :meth:`_end_outage` for when the outage is over.
        """
        limit = self.unverified_limit
        count, granted = limit, False
        if engine.may_run_unverified(call, error):
            try:
                count, granted = yield local(
                    self.outbox.count_unverified, call.customer_id, limit, time.time()
                )
            except AgentMeterError as exc:  # the count cannot be kept: run nothing free
                refusal = BackendUnavailable(
                    f"{call.feature_id} is unavailable: the billing service is unreachable "
                    f"and the unverified calls of {call.customer_id!r} cannot be counted "
                    f"({exc}); no credits were used. Cause: {error}"
                )
                self.hooks.emit(Denied(call, "backend_error", str(refusal), time.time()))
                raise refusal from error
            self._unverified.add(call.customer_id)
        now = time.time()
        if not granted:
            try:
                engine.admit_unverified(call, error, unverified=count, limit=limit)
            except BackendError as refused:
                self.hooks.emit(Denied(call, "backend_error", str(refused), now))
                raise
        self.hooks.emit(Unverified(call, count + 1, limit, str(error), now))
        return Admission(reserved=0.0, verified=False)

    def _end_outage(self, customer_id: str) -> None:
        """A verified check admitted a call: the outage is over once the queue is delivered.

        Over means every track queued for the customer was delivered (its unverified usage
        is billed) and a verified check admitted a call afterwards. A denial, or a success
        while the queue still waits, leaves the count as it is.
        """
        try:
            over = self.outbox.end_unverified(customer_id)
        except AgentMeterError as exc:
            logger.warning("agent_meter: could not end the outage of %r: %s", customer_id, exc)
            return
        if over:
            self._unverified.discard(customer_id)

    def settle(
        self, admission: Admission, settlement: engine.Settlement
    ) -> Flow[list[TrackResult]]:
        """Close the call's hold (with its refund) and record its tracks; their answers."""
        hold = admission.hold
        if hold is not None and settlement.finalize is not None:
            yield from self._settle_lock(hold, settlement.finalize)
        elif hold is not None:
            if (holder := self.holder) is not None:
                try:
                    yield remote(holder.release, holder.arelease, hold.key, settlement.refund)
                except BackendError as exc:
                    yield from self._release_failed(hold, settlement.refund, exc)
            elif settlement.refund is not None:
                yield local(self.queue, (settlement.refund,), hold.key)
            else:
                yield local(self.outbox.close_hold, hold.key)
        if settlement.tracks:
            return (yield from self.deliver(settlement.tracks))
        return []

    def _settle_lock(self, hold: Hold, finalize: FinalizeRequest) -> Flow[None]:
        """Confirm or release a lock: in the ledger's commit (embedded), else via the outbox.

        On Autumn the finalize leaves the caller's path: it waits durably in the outbox,
        closing the journal's hold in the same commit, and is delivered in the background.
        """
        if self.holder is not None and (locker := self.locker) is not None:
            try:
                yield remote(locker.finalize, locker.afinalize, finalize)
            except BackendError:
                yield local(self.queue, (finalize,))  # the hold stays until it lands
            return
        yield local(self.queue, (finalize,), hold.key)

    def _release_failed(
        self, hold: Hold, refund: TrackRequest | None, exc: BackendError
    ) -> Flow[None]:
        if refund is not None:
            # The hold's own settlement waits in the outbox: delivered, it closes the hold
            # and refunds in one commit, at the price the hold deducted (a refund track
            # would be priced at the day's rate). Until then recover() leaves the hold to it.
            kept = hold.units + refund.value  # the failed call's refund leaves 0
            yield local(self.queue, (hold.finalize(succeeded=kept > 0, units=kept),))
            return
        # The call succeeded and its caller is told it is billed: whatever happens to the
        # bookkeeping, recover() must never refund it. The outbox (another file) keeps
        # that word; recover() then closes the hold without a refund. If the outbox fails
        # too, the guard keeps the settlement and writes it again later.
        yield local(self.outbox.mark_settled, hold.key, time.time())
        logger.warning(
            "agent_meter: could not close the hold of %s (%s) after its success (%s); it is "
            "recorded as billed in the outbox and closed, never refunded, by recover()",
            hold.feature_id,
            hold.customer_id,
            exc,
        )

    def track(self, request: TrackRequest) -> Flow[TrackResult]:
        """Send one track after the customer's queue; else keep it in the outbox behind it."""
        if (yield from self._after_queue(request)):
            try:
                result: TrackResult = yield self._send(request)
            except BackendUnavailable:
                pass
            else:
                return result
        kept: list[TrackResult] = yield local(self.queue, (request,))
        return kept[0]

    def deliver(self, requests: Sequence[TrackRequest]) -> Flow[list[TrackResult]]:
        """Deliver now to a local backend, else through the outbox; never lose one."""
        if not self.inline:
            kept: list[TrackResult] = yield local(self.queue, requests)
            return kept
        results: list[TrackResult] = []
        for index, request in enumerate(requests):
            if (yield from self._after_queue(request)):
                try:
                    results.append((yield self._send(request)))
                except BackendError:
                    pass
                else:
                    continue
            rest: list[TrackResult] = yield local(self.queue, requests[index:])
            return results + rest
        return results

    def _close_settled(self, holder: Any) -> Flow[None]:
        """Close the holds of successes that could not be closed then: never refunded."""
        settled: set[str] = yield local(self.outbox.settled_keys)
        if not settled:
            return
        for hold in (yield local(holder.holds)):
            if hold.key in settled:
                yield remote(holder.release, holder.arelease, hold.key, None)
        for key in settled:
            yield local(self.outbox.forget_settled, key)

    def recover(self) -> Flow[Recovery]:
        """Refund the reservations of processes that died, and deliver the outbox."""
        refunded = uncertain = 0
        if (holder := self.holder) is not None:
            if isinstance(holder, DeferredSettles):  # before listing holds: never refunded
                yield local(holder.close_settled)
            yield from self._close_settled(holder)
            holds: list[Hold] = yield local(_dead_unsettled, holder.holds, self.outbox)
            for hold in holds:
                if (yield remote(holder.release, holder.arelease, hold.key, hold.refund())):
                    refunded += 1
        else:
            journal: list[tuple[Hold, str]] = yield local(_dead_journal, self.outbox)
            for hold, state in journal:
                if hold.lock:
                    # a lock is released by id whether or not its answer came back: a
                    # release of a lock that was never made finds nothing
                    if (yield local(self._release_dead, hold)):
                        refunded += 1
                elif state == "held":
                    if (yield local(self._refund_dead, hold)):
                        refunded += 1
                elif (yield local(self._void_dead, hold)):
                    uncertain += 1
                    reason = "its process died before the answer"
                    event = _in_doubt_event(hold.void(), reason, reconciled=self.keyed)
                    self.hooks.emit(event)
        delivered, pending = yield local(self._deliver_outbox)
        return Recovery(refunded, uncertain, delivered, pending)

    def _refund_dead(self, hold: Hold) -> bool:
        # put() queues the refund only if this recovery closed the hold: of several racing
        # recoveries, exactly one refunds
        if self.outbox.put([hold.refund()], now=time.time(), close_hold=hold.key):
            self._queued_customers.add(hold.customer_id)
            return True
        return False

    def _void_dead(self, hold: Hold) -> bool:
        # a keyed reserve sent by a dead process is voided (the hold closed in the same
        # commit, so of racing recoveries one queues it); an unkeyed one is only closed
        if self.keyed:
            return self.outbox.put([hold.void()], now=time.time(), close_hold=hold.key)
        return self.outbox.close_hold(hold.key)

    def _release_dead(self, hold: Hold) -> bool:
        release = hold.finalize(succeeded=False)
        return self.outbox.put([release], now=time.time(), close_hold=hold.key)

    def _deliver_outbox(self) -> tuple[int, int]:
        before = self.deliverer.delivered
        self.deliverer.run_once(ignore_backoff=True)
        return self.deliverer.delivered - before, self.outbox.pending()


def _in_doubt_event(void: VoidReserve, error: str, *, reconciled: bool) -> ReserveInDoubt:
    return ReserveInDoubt(
        void.customer_id,
        void.feature_id,
        void.units,
        void.idempotency_key,
        reconciled,
        error,
        time.time(),
    )


def _raises_balance_view(request: Queued) -> bool:
    """Whether the customer's next check must wait for ``request`` to be delivered.

    A track must be seen by the next check; the void of a reserve in doubt only gives back.
    A lock's confirm of the held amount changes
    nothing, and a release only gives back: a check that runs first sees less than there
    is, never more, so neither puts a round trip on the next call's path. A confirm above
    the hold does charge more, so it is delivered first.
    """
    if isinstance(request, VoidReserve):
        return False
    if isinstance(request, FinalizeRequest):
        return request.value > request.held
    return True


def _dead_unsettled(holds: Callable[[], list[Hold]], outbox: Outbox) -> list[Hold]:
    """Holds of dead processes, but those whose settlement waits in the outbox.

    A hold whose confirm or release could not be written at the time is closed by that
    queued settlement when it is delivered: refunding it too would refund a success.
    """
    dead = [hold for hold in holds() if not owner_is_alive(hold.owner)]
    if not dead:
        return dead
    queued = outbox.keys()
    return [hold for hold in dead if hold.key not in queued]


def _dead_journal(outbox: Outbox) -> list[tuple[Hold, str]]:
    return [(hold, state) for hold, state in outbox.holds() if not owner_is_alive(hold.owner)]
