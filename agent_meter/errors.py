"""The one error tree of agent_meter.

Every failure agent_meter raises is an :class:`AgentMeterError`; foreign errors (sqlite3,
autumn-py, requests, aiohttp, TOML parsing) are mapped into it at the boundary where they
happen and chained with ``raise ... from``::

    AgentMeterError
    ├── UsageLimitExceeded      the customer has no credit for this use (a denial)
    ├── InvalidUsage            bad input: NaN, a negative check, an empty customer id, ...
    ├── CustomerNotFound        a report or admin call named a customer nobody has seen
    ├── ConfigError             pricing, feature catalogue or wiring is wrong
    │   └── MissingExtra        an integration was used without its extra installed
    └── BackendError            the billing backend failed or refused the request
        └── BackendUnavailable  it could not be reached (timeouts, 5xx, 429, refused)

``InvalidUsage`` is also a :class:`ValueError`, so code that validates with ``except
ValueError`` keeps working; ``MissingExtra`` is also an :class:`ImportError`.
"""

from __future__ import annotations

from agent_meter.wording import amount, number

__all__ = [
    "AgentMeterError",
    "BackendError",
    "BackendUnavailable",
    "ConfigError",
    "CustomerNotFound",
    "InvalidUsage",
    "MissingExtra",
    "UsageLimitExceeded",
]


class AgentMeterError(Exception):
    """Root of every error agent_meter raises."""


class UsageLimitExceeded(AgentMeterError):
    """The customer may not use this feature now: no balance, or no access.

    Attributes:
        customer_id: Who asked.
        feature_id: The feature that was asked for (``web_search``, not the pool).
        balance: What is left, in the units of ``balance_feature_id`` (None for a
            boolean feature).
        required: What the call needed, in the same units.
        balance_feature_id: Where the balance lives: the credit system (``credits``)
            when the feature draws from one, else the feature itself.
    """

    def __init__(
        self,
        customer_id: str,
        feature_id: str,
        *,
        balance: float | None,
        required: float,
        balance_feature_id: str | None = None,
    ) -> None:
        self.customer_id = customer_id
        self.feature_id = feature_id
        self.balance = balance
        self.required = required
        self.balance_feature_id = balance_feature_id or feature_id
        super().__init__(self.reason)

    @property
    def reason(self) -> str:
        """A sentence the model (or a person) can read: what is unavailable and why."""
        if self.balance is None:
            return f"{self.feature_id} is unavailable: not included in the customer's plan"
        left = amount(self.balance, self.balance_feature_id)
        return f"{self.feature_id} is unavailable: {left} left, {number(self.required)} needed"

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_limit,
            (
                self.customer_id,
                self.feature_id,
                self.balance,
                self.required,
                self.balance_feature_id,
            ),
        )


def _rebuild_limit(
    customer_id: str,
    feature_id: str,
    balance: float | None,
    required: float,
    balance_feature_id: str,
) -> UsageLimitExceeded:
    return UsageLimitExceeded(
        customer_id,
        feature_id,
        balance=balance,
        required=required,
        balance_feature_id=balance_feature_id,
    )


class InvalidUsage(AgentMeterError, ValueError):
    """A value, id or argument was rejected before anything was written."""


class CustomerNotFound(AgentMeterError, LookupError):
    """A report, an admin call or the backend named a customer it has never seen."""

    def __init__(self, customer_id: str, where: str = "") -> None:
        self.customer_id = customer_id
        suffix = f" in {where}" if where else ""
        super().__init__(f"unknown customer {customer_id!r}: no usage recorded{suffix}")


class ConfigError(AgentMeterError):
    """The pricing, the feature catalogue or the wiring of agent_meter is wrong."""


class MissingExtra(ConfigError, ImportError):
    """An optional integration was imported without the extra that installs it.

    Also an :class:`ImportError`, so ``except ImportError`` around an optional import
    keeps working.

    Attributes:
        extra: The extra to install (``pip install 'agent-meter[<extra>]'``).
        integration: The agent_meter module that needs it.
    """

    def __init__(self, extra: str, *, integration: str, module: str) -> None:
        self.extra = extra
        self.integration = integration
        super().__init__(
            f"{integration} needs the {extra!r} extra (module {module!r} is not installed): "
            f"pip install 'agent-meter[{extra}]'",
            name=module,
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_missing_extra, (self.extra, self.integration, self.name or ""))


def _rebuild_missing_extra(extra: str, integration: str, module: str) -> MissingExtra:
    return MissingExtra(extra, integration=integration, module=module)


class BackendError(AgentMeterError):
    """The billing backend failed or refused a request."""


class BackendUnavailable(BackendError):
    """The billing backend could not be reached or is overloaded; the call may be retried.

    Attributes:
        maybe_applied: The request may have reached the backend and taken effect (a
            reserving check whose answer was lost). Such a call is never run unverified:
            if the reservation was made, running and tracking it would bill it twice.
        reserve_key: The idempotency key of the keyed reserve left in doubt, when the
            backend knows it (a retry after a fail-open answer goes under a fresh key).
    """

    def __init__(
        self, *args: object, maybe_applied: bool = False, reserve_key: str | None = None
    ) -> None:
        super().__init__(*args)
        self.maybe_applied = maybe_applied
        self.reserve_key = reserve_key
