"""Who pays for the current call: trusted server-side context, never the model's arguments."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from agent_meter.errors import AgentMeterError
from agent_meter.validation import check_customer_id, check_entity_id

__all__ = [
    "CustomerRef",
    "bind_customer",
    "current_customer",
    "customer_from_config",
    "unbind_customer",
]


@dataclass(frozen=True, slots=True)
class CustomerRef:
    """A customer and, optionally, one of its entities (a seat, a workspace)."""

    customer_id: str
    entity_id: str | None = None

    @classmethod
    def of(cls, customer_id: object, entity_id: object = None) -> CustomerRef:
        """Validate and build a reference (raises InvalidUsage on a malformed id)."""
        return cls(check_customer_id(customer_id), check_entity_id(entity_id))


_current: ContextVar[CustomerRef | None] = ContextVar("agent_meter_customer", default=None)


def current_customer() -> CustomerRef | None:
    """The customer bound by the innermost ``meter.customer(...)`` block, if any."""
    return _current.get()


def bind_customer(ref: CustomerRef) -> Token[CustomerRef | None]:
    """Bind ``ref`` for the current context; pass the token to ``unbind_customer``."""
    return _current.set(ref)


def unbind_customer(token: Token[CustomerRef | None]) -> None:
    """Undo a :func:`bind_customer`."""
    _current.reset(token)


NO_CUSTOMER_HELP = (
    "no customer for this call: pass config={'configurable': {'customer_id': ...}} "
    "to invoke(), or run it inside `with meter.customer('cus_...'):`"
)


def customer_from_config(config: Mapping[str, Any] | None) -> CustomerRef:
    """Find who pays for a LangChain run: its config, then ``meter.customer(...)``.

    Looks in ``config["configurable"]`` and then ``config["metadata"]`` for
    ``customer_id`` (and ``entity_id``), then at the customer bound by
    ``meter.customer(...)``. Tool arguments are never consulted.

    Raises:
        AgentMeterError: No customer anywhere; the message says how to pass one.
        InvalidUsage: The customer id found is malformed.
    """
    if config:
        for section in ("configurable", "metadata"):
            values = config.get(section) or {}
            if values.get("customer_id") is not None:
                return CustomerRef.of(values["customer_id"], values.get("entity_id"))
    bound = _current.get()
    if bound is not None:
        return bound
    raise AgentMeterError(NO_CUSTOMER_HELP)
