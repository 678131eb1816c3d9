"""The backend protocols: what the meter asks of a billing service."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from agent_meter.engine import Hold, TrackRequest
from agent_meter.pricing import Pricing
from agent_meter.results import CheckResult, TrackResult

__all__ = [
    "AsyncBackend",
    "Backend",
    "CatalogueBackend",
    "DenialRecorder",
    "FullBackend",
    "ReservingBackend",
]


@runtime_checkable
class Backend(Protocol):
    """A billing service, called synchronously.

    Semantics (Autumn's): a check of a metered feature that draws from a credit system
    answers about the pool, with ``required_balance`` converted; ``send_event=True``
    checks and deducts atomically; a track past the balance is capped at 0; a negative
    track refunds; a repeated ``idempotency_key`` is recorded once and reported as
    ``duplicate``; unknown customers are created on first use.
    """

    def check(
        self,
        customer_id: str,
        feature_id: str,
        *,
        required_balance: float = 1,
        send_event: bool = False,
        entity_id: str | None = None,
    ) -> CheckResult:
        """May ``customer_id`` use ``required_balance`` units of ``feature_id``?"""
        ...

    def track(
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        *,
        idempotency_key: str,
        entity_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> TrackResult:
        """Record that ``customer_id`` used ``value`` units of ``feature_id``."""
        ...

    def close(self) -> None:
        """Release connections; the backend may not be used afterwards."""
        ...


@runtime_checkable
class AsyncBackend(Protocol):
    """The async twin of :class:`Backend`, with the same semantics."""

    async def acheck(
        self,
        customer_id: str,
        feature_id: str,
        *,
        required_balance: float = 1,
        send_event: bool = False,
        entity_id: str | None = None,
    ) -> CheckResult:
        """Async :meth:`Backend.check`."""
        ...

    async def atrack(
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        *,
        idempotency_key: str,
        entity_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> TrackResult:
        """Async :meth:`Backend.track`."""
        ...

    async def aclose(self) -> None:
        """Async :meth:`Backend.close`."""
        ...


@runtime_checkable
class FullBackend(Backend, AsyncBackend, Protocol):
    """Both twins in one object: what :class:`~agent_meter.Meter` needs.

    Every backend shipped with agent_meter is one.
    """


@runtime_checkable
class CatalogueBackend(Protocol):
    """A backend that knows its feature catalogue up front (the embedded ones)."""

    @property
    def pricing(self) -> Pricing:
        """The features, credit systems and plans the backend bills by."""
        ...


@runtime_checkable
class ReservingBackend(Protocol):
    """A backend that records a reservation's hold in the same commit as the deduction.

    The embedded backends do; the meter keeps holds in its own journal for the others
    (Autumn), where a crash between the deduction and the journal leaves a window.
    """

    def reserve(self, hold: Hold) -> CheckResult:
        """Check with ``send_event=True`` for ``hold.units``; record the hold if deducted."""
        ...

    def release(self, key: str, refund: TrackRequest | None = None) -> bool:
        """Close a hold, refunding in the same commit when ``refund`` is given."""
        ...

    def holds(self) -> list[Hold]:
        """Every open hold."""
        ...

    async def areserve(self, hold: Hold) -> CheckResult:
        """Async :meth:`reserve`."""
        ...

    async def arelease(self, key: str, refund: TrackRequest | None = None) -> bool:
        """Async :meth:`release`."""
        ...


@runtime_checkable
class DenialRecorder(Protocol):
    """A backend that keeps refused calls in its ledger, so reports can count them."""

    def record_denial(
        self, customer_id: str, feature_id: str, units: float, entity_id: str | None = None
    ) -> None:
        """Record that a call of ``units`` of ``feature_id`` was refused."""
        ...
