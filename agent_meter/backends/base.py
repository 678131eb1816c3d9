"""The backend protocols: what the meter asks of a billing service.

A backend receives request values (:class:`~agent_meter.engine.CheckRequest`,
:class:`~agent_meter.engine.TrackRequest`, :class:`~agent_meter.engine.Hold`) and answers
with result values. What only some backends can do is declared here as a capability
Protocol, and the meter asks ``isinstance(backend, Capability)`` once, when it starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from agent_meter.engine import CheckRequest, FinalizeRequest, Hold, TrackRequest, VoidReserve
from agent_meter.pricing import Pricing
from agent_meter.results import Catalogue, CheckResult, TrackResult

__all__ = [
    "AsyncBackend",
    "Backend",
    "CatalogueBackend",
    "DefaultsToLocks",
    "DeferredSettles",
    "DenialRecorder",
    "FullBackend",
    "KeyedReserves",
    "LedgerFile",
    "LocalBackend",
    "LockingBackend",
    "RemoteBackend",
    "RemoteCatalogue",
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

    def check(self, request: CheckRequest) -> CheckResult:
        """May ``request.customer_id`` use ``request.required_balance`` units?"""
        ...

    def track(self, request: TrackRequest) -> TrackResult:
        """Record that ``request.customer_id`` used ``request.value`` units."""
        ...

    def close(self) -> None:
        """Release connections; the backend may not be used afterwards."""
        ...


@runtime_checkable
class AsyncBackend(Protocol):
    """The async twin of :class:`Backend`, with the same semantics."""

    async def acheck(self, request: CheckRequest) -> CheckResult:
        """Async :meth:`Backend.check`."""
        ...

    async def atrack(self, request: TrackRequest) -> TrackResult:
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


# -- optional capabilities -----------------------------------------------------------------


@runtime_checkable
class CatalogueBackend(Protocol):
    """A backend that knows its feature catalogue up front (the embedded ones)."""

    @property
    def pricing(self) -> Pricing:
        """The features, credit systems and plans the backend bills by."""
        ...


@runtime_checkable
class LocalBackend(Protocol):
    """A backend whose ledger is in this process's reach (the embedded ones).

    The meter settles its calls inline instead of through the outbox.
    """

    is_local: bool
    """True: the ledger answers without a network round trip."""


@runtime_checkable
class LedgerFile(Protocol):
    """A backend that keeps its ledger in a file (the meter's outbox goes next to it)."""

    @property
    def path(self) -> Path:
        """The ledger file."""
        ...


@runtime_checkable
class RemoteBackend(Protocol):
    """A billing service over the network (Autumn)."""

    service_name: str
    """How messages name the service (``"Autumn"``)."""

    @property
    def outbox_id(self) -> str:
        """Names the account the backend bills (a server and key), for the outbox file."""
        ...


@runtime_checkable
class RemoteCatalogue(Protocol):
    """A backend that can list the features it bills (one request, at start-up)."""

    def catalogue(self) -> Catalogue:
        """Every feature the billing service knows, credit systems included."""
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
class DeferredSettles(Protocol):
    """A ledger that closes a success's hold in its next commit, not one of its own.

    It keeps the success durably meanwhile (see
    :mod:`agent_meter.backends.settle_journal`); ``recover()`` asks it first to close the
    holds that ended processes recorded as settled, so that none of them is refunded.
    """

    def has_settled_to_close(self) -> bool:
        """Whether processes that ended left successes whose holds are still open."""
        ...

    def close_settled(self) -> int:
        """Close the holds recorded as settled and not yet closed; how many were closed."""
        ...


@runtime_checkable
class DefaultsToLocks(Protocol):
    """A remote backend whose locks are the safest reservation: the meter's default there.

    Autumn's: a lock's release is exact where a refund is capped at the grant, and a lock
    is released by id when its answer was lost, where a v1 reserve stays in doubt.
    """

    locks_by_default: bool


@runtime_checkable
class KeyedReserves(Protocol):
    """A backend whose reserving checks take an ``idempotency_key`` (Autumn's header).

    The meter then passes each reservation's hold key: a reserve whose answer was lost is
    retried with it and deducted once, and, when its call is refused all the same, voided
    through the outbox (:class:`~agent_meter.engine.VoidReserve`).
    """

    keyed_reserves: bool

    def reserve_received(self, request: VoidReserve) -> bool | None:
        """Whether a reserve sent under ``request.idempotency_key`` reached the backend.

        Asked under the same key, deducting nothing and leaving the key free.

        Returns:
            True: it was received. False: it was not, and its key is still free. None: it
            was not, and the question spent the key (the backend answered it anyway).
        """
        ...

    def spend_reserve_key(self, request: VoidReserve) -> None:
        """Take the key of a reserve that never arrived, so that it can never land late."""
        ...


@runtime_checkable
class LockingBackend(Protocol):
    """A backend with Autumn's lock → finalize (the ``lock`` strategy).

    A lock holds units under a unique id (the hold's key); finalize confirms it (charging
    the hold, or ``override_value`` above or below it) or releases it exactly, above the
    plan's grant too. Autumn does it over its v2 API; the embedded ledgers keep the same
    semantics in one commit (:func:`agent_meter.engine.lock_adjustment`).
    """

    def lock(self, hold: Hold) -> CheckResult:
        """Hold ``hold.units`` under the lock id ``hold.key`` if the balance allows."""
        ...

    def finalize(self, request: FinalizeRequest) -> bool:
        """Confirm or release a lock; False when nothing is held under its id."""
        ...

    async def alock(self, hold: Hold) -> CheckResult:
        """Async :meth:`lock`."""
        ...

    async def afinalize(self, request: FinalizeRequest) -> bool:
        """Async :meth:`finalize`."""
        ...


@runtime_checkable
class DenialRecorder(Protocol):
    """A backend that keeps refused calls in its ledger, so reports can count them."""

    def record_denial(
        self, customer_id: str, feature_id: str, units: float, entity_id: str | None = None
    ) -> None:
        """Record that a call of ``units`` of ``feature_id`` was refused."""
        ...
