"""Guards: the context managers that wrap a call in check → work → track.

:meth:`Meter.guard <agent_meter.Meter.guard>` and :meth:`Meter.aguard
<agent_meter.Meter.aguard>` return a :class:`Guard`, which is both a ``with`` and an
``async with`` context manager. It yields a :class:`GuardedCall`, through which the block
reports the real count (:meth:`GuardedCall.bill`) or a failure that raised nothing
(:meth:`GuardedCall.fail`).
"""

from __future__ import annotations

import logging
import time
from types import TracebackType

from agent_meter import engine
from agent_meter.engine import Admission, MeteredCall
from agent_meter.errors import ConfigError, InvalidUsage
from agent_meter.flow import Flow, Flows, arun, run
from agent_meter.hooks import Billed, Refunded
from agent_meter.ledger import charge_for
from agent_meter.pricing import Pricing
from agent_meter.results import CheckResult, TrackResult
from agent_meter.validation import check_units

__all__ = ["AsyncGuard", "Guard", "GuardedCall"]


class GuardedCall:
    """The handle a guard yields: what was admitted, and how the block reports its outcome.

    Attributes:
        call: The metered call (customer, feature, units, call id).
        admission: The go-ahead, once the guard is entered.
        billed: Units that stayed billed, once the guard has exited.
        uncharged: Of the units billed beyond the reservation, those the balance could
            not pay (the backend capped the track at 0), once the guard has exited; None
            when the backend does not say.
    """

    __slots__ = ("_actual", "_failure", "_pricing", "admission", "billed", "call", "uncharged")

    def __init__(self, call: MeteredCall, pricing: Pricing | None = None) -> None:
        self.call = call
        self._pricing = pricing
        self.admission: Admission | None = None
        self.billed: float | None = None
        self.uncharged: float | None = 0.0
        self._actual: float | None = None
        self._failure: str | None = None

    @property
    def check(self) -> CheckResult | None:
        """The backend's answer to the admitting check (None for an unverified call)."""
        return None if self.admission is None else self.admission.check

    def bill(self, units: float) -> None:
        """Bill ``units`` instead of the estimate (the real count, known after the work).

        Raises:
            InvalidUsage: ``units`` is not a count, or (the pricing known) costs more
                credits than a ledger holds; the call's bill is left as it was.
        """
        call = self.call
        actual = check_units(units, feature_id=call.feature_id, customer_id=call.customer_id)
        if self._pricing is not None and not call.gate_only:
            # priced now, so that settling never fails on a count the ledger cannot hold
            charge_for(self._pricing, call.customer_id, call.feature_id, actual)
        self._actual = actual

    def fail(self, reason: str = "failed") -> None:
        """Mark the call failed without raising (an error result): nothing stays billed."""
        self._failure = reason

    @property
    def failed(self) -> bool:
        """Whether :meth:`fail` was called."""
        return self._failure is not None

    def _settlement(self, exc_type: type[BaseException] | None) -> engine.Settlement:
        assert self.admission is not None  # noqa: S101 - set by __enter__
        succeeded = exc_type is None and self._failure is None
        requests = engine.settlement(
            self.call, self.admission, succeeded=succeeded, actual_units=self._actual
        )
        final = self._actual if self._actual is not None else self.call.units
        self.billed = final if succeeded and not self.call.gate_only else 0.0
        return requests

    def _settled(self, results: list[TrackResult]) -> None:
        unpaid: float | None = 0.0
        for result in results:
            unpaid = (
                None if unpaid is None or result.uncharged is None else unpaid + result.uncharged
            )
        self.uncharged = unpaid


class Guard:
    """The context manager of a guarded call: ``with`` and ``async with`` alike.

    Returned by :meth:`Meter.guard <agent_meter.Meter.guard>` (and
    :meth:`~agent_meter.Meter.aguard`). Entering admits the call (or raises the refusal);
    leaving settles it: billed if the block succeeded, refunded if it raised or reported a
    failure. Under ``async with`` no blocking I/O runs on the event loop.
    """

    __slots__ = ("_flows", "_started", "handle")

    def __init__(self, flows: Flows, call: MeteredCall) -> None:
        self._flows = flows
        self._started = 0.0
        self.handle = GuardedCall(call, flows.pricing)

    def __enter__(self) -> GuardedCall:
        self._started = time.time()
        flows = self._flows
        flows.entered()
        try:
            self.handle.admission = run(flows.admit(self.handle.call))
        except BaseException:
            flows.left()
            raise
        return self.handle

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            run(self._exit(exc_type))
        finally:
            self._flows.left()

    async def __aenter__(self) -> GuardedCall:
        self._started = time.time()
        flows = self._flows
        flows.entered()
        try:
            self.handle.admission = await arun(flows.admit(self.handle.call))
        except BaseException:
            flows.left()
            raise
        return self.handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await arun(self._exit(exc_type))
        finally:
            self._flows.left()

    def _exit(self, exc_type: type[BaseException] | None) -> Flow[None]:
        """Settle as the block ended; a bookkeeping failure never replaces its outcome."""
        settlement = self._settlement(exc_type)
        try:
            results = yield from self._flows.settle(*settlement)
        except Exception as failure:
            if self._settle_failed(settlement, failure, exc_type is None):
                raise
        else:
            self.handle._settled(results)
        self._report(succeeded=exc_type is None)

    def _settlement(
        self, exc_type: type[BaseException] | None
    ) -> tuple[Admission, engine.Settlement]:
        handle = self.handle
        settlement = handle._settlement(exc_type)
        assert handle.admission is not None  # noqa: S101 - set on entry
        return handle.admission, settlement

    def _settle_failed(
        self,
        settlement: tuple[Admission, engine.Settlement],
        failure: Exception,
        raised_nothing: bool,
    ) -> bool:
        """The bookkeeping failed after the block: reported, and written again later.

        Never in place of the block's own exception. A rejection for good (the backend
        does not know the feature, the input is refused) is not retried, and is raised
        when the block raised nothing: it needs fixing, and a retry cannot bill it.

        Returns:
            Whether to raise ``failure``.
        """
        handle = self.handle
        handle.uncharged = None  # unknown until the settlement is written
        admission, requests = settlement
        rejected = isinstance(failure, (ConfigError, InvalidUsage))
        self._flows.settle_later(
            handle.call,
            admission,
            requests,
            failure,
            succeeded=raised_nothing and not handle.failed,
            retry=not rejected,
        )
        return rejected and raised_nothing

    def _report(self, *, succeeded: bool) -> None:
        hooks = self._flows.hooks
        handle = self.handle
        # a refund with a reason is worth an info line; the rest are debug lines
        if not hooks.hears(logging.INFO if handle.failed else logging.DEBUG):
            return
        admission = handle.admission
        assert admission is not None  # noqa: S101 - set on entry
        if succeeded and not handle.failed:
            billed = 0.0 if admission.replay else handle.billed or 0.0
            # what the balance could not pay beyond the reservation did not stay billed
            billed -= handle.uncharged or 0.0
            hooks.emit(Billed(handle.call, billed, self._started, time.time()))
        else:
            hooks.emit(
                Refunded(
                    handle.call, admission.reserved, self._started, time.time(), handle._failure
                )
            )


AsyncGuard = Guard
"""The same class: a :class:`Guard` is also an ``async with`` context manager."""
