"""The meter: check → work → track around any call, for one backend.

:class:`Meter` drives the pure decisions of :mod:`agent_meter.engine` against a backend,
synchronously (:meth:`Meter.guard`) or asynchronously (:meth:`Meter.aguard`). Every
integration (LangChain tools, callbacks, middleware, OpenAI) is a thin adapter over it.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from agent_meter import engine
from agent_meter.backends.base import (
    CatalogueBackend,
    DefaultsToLocks,
    DeferredSettles,
    FullBackend,
    KeyedReserves,
    LedgerFile,
    LocalBackend,
    LockingBackend,
    RemoteBackend,
)
from agent_meter.context import CustomerRef
from agent_meter.delivery import Deliverer
from agent_meter.engine import (
    Admission,
    FailPolicy,
    FinalizeRequest,
    MeteredCall,
    Strategy,
    TrackRequest,
    VoidReserve,
)
from agent_meter.errors import AgentMeterError, ConfigError, InvalidUsage
from agent_meter.flow import Flows, Recovery, arun, run
from agent_meter.guard import AsyncGuard, Guard, GuardedCall
from agent_meter.hooks import Hook, Hooks, LockGone, LoggingHook, SetAside
from agent_meter.keys import new_call_id
from agent_meter.outbox import Outbox, Queued
from agent_meter.owner import owner_is_alive
from agent_meter.pricing import FeatureType, Pricing
from agent_meter.results import CheckResult, TrackResult
from agent_meter.scope import CustomerScope
from agent_meter.tokens import TokenFeatures, TokenUsage
from agent_meter.validation import (
    check_customer_id,
    check_entity_id,
    check_feature_id,
    check_key,
    check_properties,
    check_units,
)
from agent_meter.verification import verify

if TYPE_CHECKING:
    # Types only: at run time the core never imports an integration (see _integration).
    from langchain_core.tools import BaseTool

    from agent_meter.langchain.callbacks import MeteringCallbackHandler
    from agent_meter.langchain.tools import MeteredTool, OnDenied, Units

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["AsyncGuard", "CustomerScope", "Guard", "GuardedCall", "Meter", "Recovery"]

logger = logging.getLogger("agent_meter")


_open_meters: weakref.WeakSet[Meter] = weakref.WeakSet()
_EXIT_FLUSH_SECONDS = 2.0
_GATE: Strategy = "check_then_track"  # the LLM gate checks and never deducts


@atexit.register
def _deliver_at_exit() -> None:
    """A normal exit delivers what it can and says so when usage is left undelivered."""
    for meter in list(_open_meters):
        meter._exit()


def _integration(name: str) -> Any:
    """The integration module ``agent_meter.<name>``, imported on first use.

    Dependencies point inward (integrations -> meter -> backends -> core values): the
    meter's conveniences reach an integration by name, never by an import statement, and
    the import-linter contract in pyproject.toml checks that no core module imports one.
    A missing extra raises :class:`~agent_meter.errors.MissingExtra` naming it.
    """
    return importlib.import_module(f"agent_meter.{name}")


def _is_local(backend: object) -> bool:
    return isinstance(backend, LocalBackend) and bool(backend.is_local)


def default_outbox_path(backend: object) -> Path | None:
    """Where a meter keeps undelivered usage when no ``outbox`` is given.

    Next to the ledger file for :class:`~agent_meter.SQLiteBackend` (``usage.db`` ->
    ``usage.outbox.db``); in memory for a backend whose ledger is in memory; else
    ``$AGENT_METER_OUTBOX``, or ``$XDG_STATE_HOME/agent_meter/outbox-<id>.db`` where
    ``<id>`` names the backend (an Autumn server and key), so that usage queued for one
    account is never delivered to another.
    """
    if isinstance(backend, LedgerFile):
        ledger = backend.path
        return ledger.with_name(f"{ledger.stem}.outbox{ledger.suffix or '.db'}")
    if _is_local(backend):
        return None
    configured = os.environ.get("AGENT_METER_OUTBOX")
    if configured:
        return Path(configured)
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    name = backend.outbox_id if isinstance(backend, RemoteBackend) else ""
    name = name or type(backend).__name__.lower()
    return Path(state) / "agent_meter" / f"outbox-{name}.db"


_ID_TYPES = (str, type(None))
"""The types of ids that may be looked up among those validated before (hashable ones)."""


class Meter:
    """Guards calls against a billing backend: check → work → track.

    Args:
        backend: Implements :class:`~agent_meter.backends.Backend` and its async twin
            (every backend shipped does).
        strategy: ``"lock"`` (hold the units under a unique lock id, then confirm the
            real count or release exactly; the default on Autumn), ``"reserve"`` (deduct
            atomically up front, refund on failure; the default on the embedded ledgers,
            where it is the same thing in one commit) or ``"check_then_track"`` (Autumn's
            literal pattern). ``lock`` and ``reserve`` never overspend under concurrency;
            on Autumn, a ``reserve`` refund is dropped above the plan's grant (Autumn caps
            negative tracks there) while a lock's release is exact.
        on_backend_error: ``"deny"`` refuses a call whose check the backend cannot answer;
            ``"allow"`` runs it and bills it afterwards.
        pricing: The feature catalogue, when the backend does not carry one; lets the
            meter refuse unknown features and know which features are boolean.
        outbox: The file where usage the backend has not acknowledged waits (see
            :func:`default_outbox_path` for the default).
        unverified_limit: Under ``on_backend_error="allow"``, how many calls per customer
            may run while the backend is unreachable before the meter fails closed. It
            is counted per outage in the outbox, across every process sharing it; the
            outage is over for a customer once its queued usage is delivered and a
            verified check admits one of its calls (a flap or a refusal is not enough).
        hooks: Receive an event for each billing decision (:mod:`agent_meter.hooks`);
            default: one :class:`~agent_meter.hooks.LoggingHook`. Add more with
            :meth:`add_hook`.
        recover_on_start: Refund dead processes' reservations and deliver the outbox in
            the background when the meter starts (else call :meth:`recover` yourself).

    Usage that could not be delivered (the backend is down; a remote backend always,
    off the caller's path) waits in a durable outbox and is delivered by a background
    thread with back-off; :meth:`flush` waits for it and :meth:`close` flushes. A new
    meter on the same outbox delivers what an earlier process left.

    Example:
        >>> meter = Meter(SQLiteBackend("usage.db", pricing=pricing))
        >>> with meter.guard("cus_1", "code_exec", call_id="call_42"):
        ...     run_code()          # returns: billed; raises: refunded and re-raised
    """

    def __init__(
        self,
        backend: FullBackend,
        *,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy = "deny",
        pricing: Pricing | None = None,
        outbox: str | Path | None = None,
        unverified_limit: int = 10,
        recover_on_start: bool = True,
        hooks: Iterable[Hook] | None = None,
    ) -> None:
        if strategy is None:
            strategy = "lock" if isinstance(backend, DefaultsToLocks) else "reserve"
        if strategy not in engine.STRATEGIES:
            msg = f"strategy must be one of {engine.STRATEGIES}, not {strategy!r}"
            raise ConfigError(msg)
        if strategy == "lock" and not isinstance(backend, LockingBackend):
            msg = f"strategy 'lock' needs a backend with locks; {backend!r} has none"
            raise ConfigError(msg)
        if on_backend_error not in engine.FAIL_POLICIES:
            msg = (
                f"on_backend_error must be one of {engine.FAIL_POLICIES}, not {on_backend_error!r}"
            )
            raise ConfigError(msg)
        if not all(callable(getattr(backend, name, None)) for name in ("check", "track")):
            msg = (
                "Meter needs a backend with check() and track() (SQLiteBackend, "
                f"AutumnBackend, testing.MemoryBackend), got {backend!r}"
            )
            raise ConfigError(msg)
        self.backend = backend
        self.strategy: Strategy = strategy
        self.on_backend_error: FailPolicy = on_backend_error
        if pricing is None and isinstance(backend, CatalogueBackend):
            pricing = backend.pricing
        self.pricing = pricing
        self.outbox = Outbox(outbox if outbox is not None else default_outbox_path(backend))
        self.hooks = Hooks([LoggingHook()] if hooks is None else hooks)
        self.deliverer = Deliverer(self.outbox, self._deliver_one, on_set_aside=self._set_aside)
        self._flows = Flows(
            backend,
            self.outbox,
            self.deliverer,
            inline=_is_local(backend),
            unverified_limit=unverified_limit,
            hooks=self.hooks,
            pricing=pricing,
        )
        # (customer, feature, entity) already validated -> whether the feature is boolean:
        # the ids of the next call of the same kind need no second look
        self._checked: dict[tuple[str, str, str | None], bool] = {}
        self._closed = False
        _open_meters.add(self)
        if recover_on_start:
            self._recover_in_background()

    def _deliver_one(self, request: Queued) -> object:
        """What the deliverer sends: a track, a lock's finalize, or a reserve's void."""
        if isinstance(request, FinalizeRequest):
            return self._finalize(request)
        if isinstance(request, VoidReserve):
            return self._void(request)
        # looked up on each delivery: the backend's method may be replaced (tests do)
        return self.backend.track(request)

    def _finalize(self, request: FinalizeRequest) -> bool:
        locker = self.backend
        if not isinstance(locker, LockingBackend):
            msg = f"{self.backend!r} has no locks: cannot finalize {request.lock_id!r}"
            raise ConfigError(msg)
        done = locker.finalize(request)
        if not done and request.action == "confirm":
            # Only an admitted call is confirmed, so its lock was made: Autumn released it
            # at its expiry and charged nothing. The call is settled, unbilled; a lock
            # finalizes once, so retrying would only find nothing again.
            self.hooks.emit(LockGone(request, time.time()))
        elif not done:
            # a release of a lock never made (denied, failed open) or already released
            logger.info("agent_meter: lock %s was already settled", request.lock_id)
        return done

    def _void(self, request: VoidReserve) -> bool:
        """Refund a reserve in doubt if the backend received it; spend its key if not."""
        backend = self.backend
        if not isinstance(backend, KeyedReserves) or not backend.keyed_reserves:
            msg = f"{backend!r} cannot tell whether reserve {request.idempotency_key!r} landed"
            raise ConfigError(msg)
        key = request.idempotency_key
        if not request.absent:
            received = backend.reserve_received(request)
            if received:
                # it may have deducted (a 409 cannot say more), and its call was refused
                backend.track(request.refund())
                logger.info("agent_meter: reserve %s reached the backend: refunded", key)
                return True
            if received is None:  # answered anyway: that answer spent the key
                logger.info("agent_meter: reserve %s never reached the backend", key)
                return False
            # not received: recorded first, so that a later question, after this void
            # spends the key, is never taken for the reserve having arrived
            self.outbox.mark_void_absent(key)
        backend.spend_reserve_key(request)
        logger.info("agent_meter: reserve %s never reached the backend: key spent", key)
        return False

    @property
    def unverified_limit(self) -> int:
        """Calls per customer that may run unverified while the backend is unreachable."""
        return self._flows.unverified_limit

    @unverified_limit.setter
    def unverified_limit(self, limit: int) -> None:
        self._flows.unverified_limit = limit

    def _recover_in_background(self) -> None:
        """Start recovery in a thread, only when there is something to recover."""
        if self.outbox.pending():
            self.deliverer.wake()
        holder = self._flows.holder
        holds = holder.holds() if holder is not None else [hold for hold, _ in self.outbox.holds()]
        settled = isinstance(holder, DeferredSettles) and holder.has_settled_to_close()
        if settled or any(not owner_is_alive(hold.owner) for hold in holds):
            threading.Thread(
                target=self._recover_quietly, name="agent_meter-recover", daemon=True
            ).start()

    def _recover_quietly(self) -> None:
        try:
            report = self.recover()
        except Exception:  # a background thread has no caller to raise to
            logger.exception("agent_meter: recovery on start failed; call meter.recover()")
            return
        logger.info("agent_meter: recovery on start: %s", report)

    def __repr__(self) -> str:
        return (
            f"Meter({self.backend!r}, strategy={self.strategy!r}, "
            f"on_backend_error={self.on_backend_error!r})"
        )

    # -- building calls ------------------------------------------------------------------

    def feature_type(self, feature_id: str) -> FeatureType | None:
        """The type of ``feature_id`` when the catalogue is known, else None.

        Raises:
            ConfigError: The catalogue is known and does not declare ``feature_id``.
        """
        if self.pricing is None:
            return None
        kind = self.pricing.feature_type(feature_id)
        if kind is None:
            known = ", ".join(sorted(self.pricing.features))
            msg = f"unknown feature {feature_id!r}: the pricing declares {known}"
            raise ConfigError(msg)
        return kind

    def metered_call(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        call_id: str | None = None,
        entity_id: str | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
    ) -> MeteredCall:
        """Validate the parts of a guarded call and assemble them (no I/O).

        Raises:
            InvalidUsage: A malformed id or units.
            ConfigError: An unknown feature, strategy or policy, or the meter is closed.
        """
        if self._closed:
            self._refuse_closed()
        gate_only = self._gate_only(customer_id, feature_id, entity_id)
        units = check_units(units, feature_id=feature_id, customer_id=customer_id)
        if call_id is not None:
            call_id = check_key("call_id", call_id, feature_id=feature_id)
        strategy = strategy or self.strategy
        policy = on_backend_error or self.on_backend_error
        if strategy not in engine.STRATEGIES or policy not in engine.FAIL_POLICIES:
            msg = f"unknown strategy {strategy!r} or on_backend_error {policy!r}"
            raise ConfigError(msg)
        if strategy == "lock" and not isinstance(self.backend, LockingBackend):
            msg = f"strategy 'lock' needs a backend with locks; {self.backend!r} has none"
            raise ConfigError(msg)
        return MeteredCall(
            customer_id=customer_id,
            feature_id=feature_id,
            units=units,
            call_id=call_id or new_call_id(),
            entity_id=entity_id,
            strategy=strategy,
            on_backend_error=policy,
            gate_only=gate_only,
        )

    def _gate_only(self, customer_id: str, feature_id: str, entity_id: str | None) -> bool:
        """Validate the ids of a call (once per kind); whether its feature is boolean."""
        ids = (customer_id, feature_id, entity_id)
        if type(customer_id) is str and type(feature_id) is str and type(entity_id) in _ID_TYPES:
            known = self._checked.get(ids)
            if known is not None:
                return known
        check_customer_id(customer_id)
        check_feature_id(feature_id)
        check_entity_id(entity_id)
        gate_only = self.feature_type(feature_id) is FeatureType.BOOLEAN
        if len(self._checked) >= 4096:  # bounded: many customers just check again
            self._checked.clear()
        self._checked[ids] = gate_only
        return gate_only

    def _refuse_closed(self) -> NoReturn:
        msg = f"this meter is closed ({self!r}): meter.close() was called; open a new Meter"
        raise ConfigError(msg)

    def _track_request(  # noqa: PLR0917 - private, mirrors track()'s parameters in order
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        idempotency_key: str | None,
        entity_id: str | None,
        properties: Mapping[str, Any] | None,
    ) -> TrackRequest:
        if self._closed:
            self._refuse_closed()
        customer_id = check_customer_id(customer_id)
        feature_id = check_feature_id(feature_id)
        entity_id = check_entity_id(entity_id)
        value = check_units(
            value, feature_id=feature_id, customer_id=customer_id, allow_negative=True
        )
        if self.feature_type(feature_id) is FeatureType.BOOLEAN:
            msg = f"{feature_id!r} is a boolean feature: it is checked, never tracked"
            raise InvalidUsage(msg)
        if idempotency_key is not None:
            idempotency_key = check_key("idempotency_key", idempotency_key, feature_id=feature_id)
        properties = check_properties(properties, feature_id=feature_id)
        call = MeteredCall(
            customer_id, feature_id, value, idempotency_key or new_call_id(), entity_id
        )
        return TrackRequest(
            customer_id, feature_id, value, call.key("track"), entity_id, properties
        )

    # -- check and track -------------------------------------------------------------------

    def check(
        self, customer_id: str, feature_id: str, units: float = 1, *, entity_id: str | None = None
    ) -> CheckResult:
        """Ask whether ``customer_id`` may use ``units`` of ``feature_id``; deducts nothing.

        The answer counts every earlier track of this customer from this process: queued
        ones are delivered first.
        """
        call = self.metered_call(customer_id, feature_id, units, entity_id=entity_id)
        return run(self._flows.check(call))

    async def acheck(
        self, customer_id: str, feature_id: str, units: float = 1, *, entity_id: str | None = None
    ) -> CheckResult:
        """Async :meth:`check`."""
        call = self.metered_call(customer_id, feature_id, units, entity_id=entity_id)
        return await arun(self._flows.check(call))

    def track(
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        *,
        idempotency_key: str | None = None,
        entity_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> TrackResult:
        """Record ``value`` units of usage (a batch: 1,830 tokens is one track).

        Args:
            customer_id: Who pays.
            feature_id: The metered feature (never the credit pool: the backend converts).
            value: Units used; negative refunds.
            idempotency_key: Names this usage: the same key for the same customer and
                feature is recorded once, however often it is sent. Scoped to the customer
                and feature before it reaches the backend. Generated when omitted.
            entity_id: Sub-scope of the customer.
            properties: Free-form details stored with the event.

        Returns:
            The backend's answer; ``queued=True`` when the backend was unreachable and the
            track waits in the outbox (it is delivered later, with the same key).
        """
        request = self._track_request(
            customer_id, feature_id, value, idempotency_key, entity_id, properties
        )
        return run(self._flows.track(request))

    async def atrack(
        self,
        customer_id: str,
        feature_id: str,
        value: float,
        *,
        idempotency_key: str | None = None,
        entity_id: str | None = None,
        properties: Mapping[str, Any] | None = None,
    ) -> TrackResult:
        """Async :meth:`track`."""
        request = self._track_request(
            customer_id, feature_id, value, idempotency_key, entity_id, properties
        )
        return await arun(self._flows.track(request))

    def _settle(self, admission: Admission, settlement: engine.Settlement) -> list[TrackResult]:
        """Close the hold (with its refund) and record the tracks; returns their answers."""
        return run(self._flows.settle(admission, settlement))

    async def _asettle(
        self, admission: Admission, settlement: engine.Settlement
    ) -> list[TrackResult]:
        """Async :meth:`_settle`."""
        return await arun(self._flows.settle(admission, settlement))

    def flush(self, timeout: float | None = None) -> int:
        """Wait until the queued usage is delivered, or ``timeout`` seconds have passed.

        Returns:
            How many tracks are still undelivered (they stay in the outbox).

        Raises:
            AgentMeterError: A track the backend rejected for good since the last flush
                (``ConfigError`` for an unknown feature); it is set aside in the outbox.
        """
        if self._flows.unsettled:
            self._flows.retry_unsettled()
        return self.deliverer.flush(timeout)

    async def aflush(self, timeout: float | None = None) -> int:
        """Async :meth:`flush` (delivery runs in a worker thread)."""
        return await asyncio.to_thread(self.flush, timeout)

    def recover(self) -> Recovery:
        """Refund the reservations of processes that died, and deliver the outbox.

        A reservation whose owner process is gone was never settled: its work's outcome
        is unknown and its result never reached the agent, so it is refunded (once, under
        its refund key). Reservations of live processes are never touched, so this is safe
        to call while other processes use the same files.
        """
        return run(self._flows.recover())

    async def arecover(self) -> Recovery:
        """Async :meth:`recover` (the ledger and outbox work runs in worker threads)."""
        return await arun(self._flows.recover())

    # -- guards ----------------------------------------------------------------------------

    def guard(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        call_id: str | None = None,
        entity_id: str | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
    ) -> Guard:
        """Guard a block: admitted or refused on entry, billed only if it succeeds.

        Args:
            customer_id: Who pays (from trusted server-side context).
            feature_id: The metered (or boolean) feature the block uses.
            units: Units the block uses (a batch: 20 URLs is 20); an estimate when the
                block reports the real count with :meth:`GuardedCall.bill`.
            call_id: Names the call in idempotency keys (a tool_call_id); generated when
                omitted.
            entity_id: Sub-scope of the customer.
            strategy: Overrides the meter's strategy for this call.
            on_backend_error: Overrides the meter's fail policy for this call.

        Raises:
            UsageLimitExceeded: On entry, when the customer may not use the feature.
            BackendError: On entry, when the check failed and the policy is ``deny``.

        Example:
            >>> with meter.guard("cus_1", "web_search", units=len(urls)) as call:
            ...     pages = fetch(urls)
        """
        return Guard(
            self._flows,
            self.metered_call(
                customer_id,
                feature_id,
                units,
                call_id=call_id,
                entity_id=entity_id,
                strategy=strategy,
                on_backend_error=on_backend_error,
            ),
        )

    def aguard(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        call_id: str | None = None,
        entity_id: str | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
    ) -> Guard:
        """:meth:`guard`, named for ``async with`` (the same :class:`Guard` is returned)."""
        return Guard(
            self._flows,
            self.metered_call(
                customer_id,
                feature_id,
                units,
                call_id=call_id,
                entity_id=entity_id,
                strategy=strategy,
                on_backend_error=on_backend_error,
            ),
        )

    def gate(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        entity_id: str | None = None,
        call_id: str | None = None,
    ) -> Admission:
        """Admit or refuse a use without reserving (the LLM gate): check, never deduct.

        Args:
            customer_id: Who pays.
            feature_id: The feature to check.
            units: Units the balance must cover.
            entity_id: Sub-scope of the customer.
            call_id: Names the call in the hooks' events (generated when omitted).

        Raises:
            UsageLimitExceeded: The customer has less than ``units`` left.
            BackendError: The check failed and the fail policy is ``deny``.
        """
        call = self.metered_call(
            customer_id, feature_id, units, call_id=call_id, entity_id=entity_id, strategy=_GATE
        )
        return run(self._flows.admit(call))

    async def agate(
        self,
        customer_id: str,
        feature_id: str,
        units: float = 1,
        *,
        entity_id: str | None = None,
        call_id: str | None = None,
    ) -> Admission:
        """Async :meth:`gate`."""
        call = self.metered_call(
            customer_id, feature_id, units, call_id=call_id, entity_id=entity_id, strategy=_GATE
        )
        return await arun(self._flows.admit(call))

    def _token_requests(
        self,
        customer_id: str,
        usage: TokenUsage,
        call_id: str,
        features: TokenFeatures,
        entity_id: str | None,
    ) -> list[TrackRequest]:
        properties = {"model": usage.model} if usage.model else None
        return [
            self._track_request(customer_id, feature_id, tokens, call_id, entity_id, properties)
            for feature_id, tokens in features.values(usage)
        ]

    def track_tokens(
        self,
        customer_id: str,
        usage: TokenUsage,
        *,
        call_id: str,
        features: TokenFeatures | None = None,
        entity_id: str | None = None,
    ) -> list[TrackResult]:
        """Bill one LLM call's tokens as batch values, keyed by ``call_id`` (the run id).

        The same ``call_id`` is billed once however often it is reported.
        """
        requests = self._token_requests(
            customer_id, usage, call_id, features or TokenFeatures(), entity_id
        )
        return run(self._flows.deliver(requests))

    async def atrack_tokens(
        self,
        customer_id: str,
        usage: TokenUsage,
        *,
        call_id: str,
        features: TokenFeatures | None = None,
        entity_id: str | None = None,
    ) -> list[TrackResult]:
        """Async :meth:`track_tokens`."""
        requests = self._token_requests(
            customer_id, usage, call_id, features or TokenFeatures(), entity_id
        )
        return await arun(self._flows.deliver(requests))

    # -- integrations (thin adapters, imported on use) -----------------------------------

    def wrap_tool(
        self,
        tool: BaseTool,
        feature_id: str,
        units: Units = 1,
        *,
        units_from_result: Callable[[Any], float] | None = None,
        on_denied: OnDenied = "message",
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
        customer_id: str | None = None,
        entity_id: str | None = None,
    ) -> MeteredTool:
        """Wrap a LangChain tool so every call is checked and only successes are billed.

        See :func:`agent_meter.langchain.tools.wrap_tool` for the arguments.
        """
        wrap: Callable[..., MeteredTool] = _integration("langchain.tools").wrap_tool
        return wrap(
            self,
            tool,
            feature_id,
            units,
            units_from_result=units_from_result,
            on_denied=on_denied,
            strategy=strategy,
            on_backend_error=on_backend_error,
            customer_id=customer_id,
            entity_id=entity_id,
        )

    def wrap_tools(
        self,
        tools: Sequence[BaseTool],
        features: Mapping[str, str],
        *,
        units: Units = 1,
        units_from_result: Callable[[Any], float] | None = None,
        on_denied: OnDenied = "message",
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
        customer_id: str | None = None,
        entity_id: str | None = None,
    ) -> list[MeteredTool]:
        """Wrap several LangChain tools; ``features`` maps each tool name to its feature.

        See :func:`agent_meter.langchain.tools.wrap_tools` for the arguments.
        """
        wrap: Callable[..., list[MeteredTool]] = _integration("langchain.tools").wrap_tools
        return wrap(
            self,
            tools,
            features,
            units=units,
            units_from_result=units_from_result,
            on_denied=on_denied,
            strategy=strategy,
            on_backend_error=on_backend_error,
            customer_id=customer_id,
            entity_id=entity_id,
        )

    def metered(
        self,
        feature_id: str,
        units: Units = 1,
        *,
        units_from_result: Callable[[Any], float] | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
        customer_id: str | None = None,
        entity_id: str | None = None,
    ) -> Callable[[F], F]:
        """Decorate a plain sync or async function so each call is guarded.

        See :func:`agent_meter.langchain.tools.metered` for the arguments.
        """
        decorator: Callable[..., Callable[[F], F]] = _integration("langchain.tools").metered
        return decorator(
            self,
            feature_id,
            units,
            units_from_result=units_from_result,
            strategy=strategy,
            on_backend_error=on_backend_error,
            customer_id=customer_id,
            entity_id=entity_id,
        )

    def callback_handler(
        self,
        feature_id: str | None = "llm_tokens",
        input_feature_id: str | None = None,
        output_feature_id: str | None = None,
        **options: Any,
    ) -> MeteringCallbackHandler:
        """A LangChain callback handler that meters (and gates) an agent's LLM tokens.

        See :class:`agent_meter.langchain.callbacks.MeteringCallbackHandler` for the options.
        """
        handler: Callable[..., MeteringCallbackHandler] = _integration(
            "langchain.callbacks"
        ).MeteringCallbackHandler
        return handler(
            self,
            feature_id=feature_id,
            input_feature_id=input_feature_id,
            output_feature_id=output_feature_id,
            **options,
        )

    def verify(self, features: Iterable[str] | None = None) -> None:
        """Confirm at start-up that each metered feature exists where it is billed.

        Raises:
            ConfigError: Every problem found, in one message.
        """
        verify(self, features)

    # -- instrumentation -------------------------------------------------------------------

    def add_hook(self, hook: Hook) -> None:
        """Pass every billing decision of this meter to ``hook`` (see :mod:`agent_meter.hooks`).

        A hook that raises is logged and ignored: it never changes a bill.
        """
        self.hooks.add(hook)

    def remove_hook(self, hook: Hook) -> None:
        """Stop passing events to ``hook`` (the default :class:`LoggingHook` too).

        Raises:
            ValueError: ``hook`` is not registered.
        """
        self.hooks.remove(hook)

    def _set_aside(self, request: Queued, error: str) -> None:
        self.hooks.emit(SetAside(request, error))

    def customer(self, customer_id: str, entity_id: str | None = None) -> CustomerScope:
        """Bind a customer for code that has no LangChain config to carry one.

        Use the result as a context manager (integrations inside the block bill this
        customer) or call its ``check``/``track``/``guard`` methods directly.
        """
        return CustomerScope(self, CustomerRef.of(customer_id, entity_id))

    # -- lifecycle -----------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Let running calls settle, deliver what is queued (up to ``timeout`` s), then close.

        New calls are refused from the start. Guarded calls still running their block
        settle first; one still running at the deadline settles when it ends, and the
        ledger and outbox are closed after it. Usage still undelivered stays in the
        outbox, says so in a log line, and is delivered by the next meter opened on it.
        """
        if self._closed:
            return
        deadline = self._begin_closing(timeout)
        try:
            self._flows.wait_idle(deadline - time.monotonic())
            self._flush_before_closing(deadline - time.monotonic())
        finally:
            # a delivery still hanging on the backend is abandoned at the deadline: its
            # track stays in the outbox, delivered (once, by its key) by the next meter
            self.deliverer.stop(timeout=deadline - time.monotonic())
            if not self._flows.defer_until_idle(self._close_files):
                self._close_files()

    async def aclose(self, timeout: float = 10.0) -> None:
        """Async :meth:`close`."""
        if self._closed:
            return
        deadline = self._begin_closing(timeout)
        try:
            await asyncio.to_thread(self._flows.wait_idle, deadline - time.monotonic())
            await asyncio.to_thread(self._flush_before_closing, deadline - time.monotonic())
        finally:
            self.deliverer.stop(timeout=deadline - time.monotonic())
            if not self._flows.defer_until_idle(self._close_files):
                self.outbox.close()
                await self.backend.aclose()

    def _begin_closing(self, timeout: float) -> float:
        """Refuse new calls from now on; returns the deadline of closing."""
        self._closed = True
        self._flows.closing = True
        _open_meters.discard(self)
        return time.monotonic() + timeout

    def _close_files(self) -> None:
        """Close the outbox and the backend (after the last call in flight settled)."""
        self.outbox.close()
        self.backend.close()

    def _flush_before_closing(self, timeout: float) -> None:
        try:
            remaining = self.flush(max(timeout, 0.0))
        except AgentMeterError as exc:
            logger.error("agent_meter: usage rejected by the backend, set aside: %s", exc)
            remaining = self.outbox.pending()
        if remaining:
            logger.warning(
                "agent_meter: %d tracks not delivered yet; they wait in %r and are delivered "
                "by the next meter that opens it",
                remaining,
                self.outbox,
            )

    def _exit(self) -> None:
        """At interpreter exit: a short flush, and a log line for what is left."""
        if self._closed:
            return
        deadline = time.monotonic() + _EXIT_FLUSH_SECONDS
        try:
            if self.outbox.pending() or self._flows.unsettled:
                self._flush_before_closing(timeout=_EXIT_FLUSH_SECONDS)
        except Exception:  # interpreter shutdown: report, never raise
            logger.exception("agent_meter: delivering at exit failed")
        self.deliverer.stop(timeout=deadline - time.monotonic())

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> Meter:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
