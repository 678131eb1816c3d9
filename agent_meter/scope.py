"""A meter bound to one customer, for code that has no LangChain config to carry one."""

from __future__ import annotations

from contextvars import Token
from typing import TYPE_CHECKING, Any

from agent_meter.context import CustomerRef, bind_customer, unbind_customer
from agent_meter.results import CheckResult, TrackResult

if TYPE_CHECKING:
    from agent_meter.guard import AsyncGuard, Guard
    from agent_meter.meter import Meter

__all__ = ["CustomerScope"]


class CustomerScope:
    """A meter bound to one customer: a context manager and a set of bound methods.

    Example:
        >>> with meter.customer("cus_1"):
        ...     agent.invoke(inputs)            # wrapped tools bill cus_1
        >>> meter.customer("cus_1").check("web_search").allowed
    """

    def __init__(self, meter: Meter, ref: CustomerRef) -> None:
        self.meter = meter
        self.ref = ref
        self._tokens: list[Token[CustomerRef | None]] = []

    def __repr__(self) -> str:
        return f"CustomerScope({self.ref.customer_id!r}, entity_id={self.ref.entity_id!r})"

    def __enter__(self) -> CustomerScope:
        self._tokens.append(bind_customer(self.ref))
        return self

    def __exit__(self, *exc_info: object) -> None:
        unbind_customer(self._tokens.pop())

    async def __aenter__(self) -> CustomerScope:
        return self.__enter__()

    async def __aexit__(self, *exc_info: object) -> None:
        self.__exit__()

    def check(self, feature_id: str, units: float = 1) -> CheckResult:
        """:meth:`Meter.check` for this customer."""
        return self.meter.check(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id
        )

    async def acheck(self, feature_id: str, units: float = 1) -> CheckResult:
        """:meth:`Meter.acheck` for this customer."""
        return await self.meter.acheck(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id
        )

    def track(self, feature_id: str, value: float, **kwargs: Any) -> TrackResult:
        """:meth:`Meter.track` for this customer."""
        return self.meter.track(
            self.ref.customer_id, feature_id, value, entity_id=self.ref.entity_id, **kwargs
        )

    async def atrack(self, feature_id: str, value: float, **kwargs: Any) -> TrackResult:
        """:meth:`Meter.atrack` for this customer."""
        return await self.meter.atrack(
            self.ref.customer_id, feature_id, value, entity_id=self.ref.entity_id, **kwargs
        )

    def guard(self, feature_id: str, units: float = 1, **kwargs: Any) -> Guard:
        """:meth:`Meter.guard` for this customer."""
        return self.meter.guard(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id, **kwargs
        )

    def aguard(self, feature_id: str, units: float = 1, **kwargs: Any) -> AsyncGuard:
        """:meth:`Meter.aguard` for this customer."""
        return self.meter.aguard(
            self.ref.customer_id, feature_id, units, entity_id=self.ref.entity_id, **kwargs
        )
