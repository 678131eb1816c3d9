"""agent_meter: a billing guard in front of every tool an LLM agent can call.

Check → work → track against a billing backend (Autumn in production, an embedded SQLite
ledger by default), per customer, so that an agent never runs a tool its customer has no
credit for and bills exactly what succeeded.
"""

from typing import TYPE_CHECKING, Any

from agent_meter.backends.base import AsyncBackend, Backend
from agent_meter.backends.sqlite import SQLiteBackend
from agent_meter.context import CustomerRef
from agent_meter.engine import FailPolicy, Strategy
from agent_meter.errors import (
    AgentMeterError,
    BackendError,
    BackendUnavailable,
    ConfigError,
    CustomerNotFound,
    InvalidUsage,
    UsageLimitExceeded,
)
from agent_meter.meter import GuardedCall, Meter
from agent_meter.pricing import FeatureType, Plan, Pricing
from agent_meter.results import CheckResult, TrackResult, UsageEvent
from agent_meter.tokens import TokenFeatures, TokenUsage

if TYPE_CHECKING:
    from agent_meter.backends.autumn import AutumnBackend

__all__ = [
    "AgentMeterError",
    "AsyncBackend",
    "AutumnBackend",
    "Backend",
    "BackendError",
    "BackendUnavailable",
    "CheckResult",
    "ConfigError",
    "CustomerNotFound",
    "CustomerRef",
    "FailPolicy",
    "FeatureType",
    "GuardedCall",
    "InvalidUsage",
    "Meter",
    "Plan",
    "Pricing",
    "SQLiteBackend",
    "Strategy",
    "TokenFeatures",
    "TokenUsage",
    "TrackResult",
    "UsageEvent",
    "UsageLimitExceeded",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # autumn-py brings requests and aiohttp: import it only for those who use Autumn.
    if name == "AutumnBackend":
        from agent_meter.backends.autumn import AutumnBackend  # noqa: PLC0415

        return AutumnBackend
    msg = f"module {__name__!r} has no attribute {name!r}"
    raise AttributeError(msg)
