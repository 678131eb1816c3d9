"""Autumn's lock → finalize on an embedded ledger, written once for both of them.

A lock is a reservation held under the lock id; finalizing closes its hold, releasing it
exactly or confirming it at the real value (:func:`agent_meter.ledger.lock_adjustment`).
"""

from __future__ import annotations

from typing import Protocol

from agent_meter.engine import FinalizeRequest, Hold, TrackRequest
from agent_meter.ledger import lock_adjustment
from agent_meter.results import CheckResult

__all__ = ["LocksOnHolds"]


class _Holding(Protocol):
    def reserve(self, hold: Hold) -> CheckResult: ...

    def release(self, key: str, refund: TrackRequest | None = None) -> bool: ...

    async def areserve(self, hold: Hold) -> CheckResult: ...

    async def arelease(self, key: str, refund: TrackRequest | None = None) -> bool: ...


class LocksOnHolds:
    """Lock and finalize for a backend that keeps reservations as holds."""

    def lock(self: _Holding, hold: Hold) -> CheckResult:
        """Autumn's lock: a reservation held under the lock id ``hold.key``."""
        return self.reserve(hold)

    def finalize(self: _Holding, request: FinalizeRequest) -> bool:
        """Confirm or release a lock, closing its hold in the same step.

        Release returns the hold exactly and a confirm with ``override_value`` charges that
        value instead, above or below the hold; neither is capped at the grant, as on Autumn.

        Returns:
            False when no lock is held under the id (finalized before, or never made).
        """
        return self.release(request.lock_id, lock_adjustment(request))

    async def alock(self: _Holding, hold: Hold) -> CheckResult:
        """Async :meth:`lock`."""
        return await self.areserve(hold)

    async def afinalize(self: _Holding, request: FinalizeRequest) -> bool:
        """Async :meth:`finalize`."""
        return await self.arelease(request.lock_id, lock_adjustment(request))
