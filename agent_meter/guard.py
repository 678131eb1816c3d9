"""Guards: the context managers that wrap a call in check → work → track.

:meth:`Meter.guard <agent_meter.Meter.guard>` returns a :class:`Guard` (``with``) and
:meth:`Meter.aguard <agent_meter.Meter.aguard>` an :class:`AsyncGuard` (``async with``);
both yield a :class:`GuardedCall`, through which the block reports the real count
(:meth:`GuardedCall.bill`) or a failure that raised nothing (:meth:`GuardedCall.fail`).
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

from agent_meter import engine
from agent_meter.engine import Admission, MeteredCall
from agent_meter.results import CheckResult, TrackResult
from agent_meter.validation import check_units

if TYPE_CHECKING:
    from agent_meter.meter import Meter

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

    __slots__ = ("_actual", "_failure", "admission", "billed", "call", "uncharged")

    def __init__(self, call: MeteredCall) -> None:
        self.call = call
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
        """Bill ``units`` instead of the estimate (the real count, known after the work)."""
        self._actual = check_units(
            units, feature_id=self.call.feature_id, customer_id=self.call.customer_id
        )

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
    """Context manager returned by :meth:`Meter.guard`."""

    __slots__ = ("_meter", "handle")

    def __init__(self, meter: Meter, call: MeteredCall) -> None:
        self._meter = meter
        self.handle = GuardedCall(call)

    def __enter__(self) -> GuardedCall:
        self.handle.admission = self._meter._admit(self.handle.call)
        return self.handle

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle = self.handle
        handle._settled(self._meter._settle(handle.admission, handle._settlement(exc_type)))  # type: ignore[arg-type]


class AsyncGuard:
    """Async context manager returned by :meth:`Meter.aguard`."""

    __slots__ = ("_meter", "handle")

    def __init__(self, meter: Meter, call: MeteredCall) -> None:
        self._meter = meter
        self.handle = GuardedCall(call)

    async def __aenter__(self) -> GuardedCall:
        self.handle.admission = await self._meter._aadmit(self.handle.call)
        return self.handle

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        handle = self.handle
        handle._settled(await self._meter._asettle(handle.admission, handle._settlement(exc_type)))  # type: ignore[arg-type]
