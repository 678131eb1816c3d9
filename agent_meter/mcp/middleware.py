"""A FastMCP middleware that puts every ``tools/call`` through the meter.

:class:`MeteringMiddleware` is for the author of an MCP server who charges its callers per
tool call. Each call of a priced tool runs inside :meth:`Meter.aguard
<agent_meter.Meter.aguard>`:

- **who pays** comes from the request's authenticated context through a resolver the
  server author supplies (by default the verified access token's client id, see
  :func:`~agent_meter.mcp.from_access_token`), never from the tool's arguments; a call
  with no paying customer is refused;
- **a refusal** (no credit, no customer, a billing service that could not answer) does not
  run the tool: the client receives a tool result with ``isError: true`` whose text is the
  one every agent_meter adapter uses ("web_search is unavailable: 0 credits left, 1
  needed");
- **a failure** (the tool raises, or returns a result with ``isError: true``) is refunded;
  a success stays billed;
- listing tools, reading resources and prompts are never metered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.tools import ToolResult

from agent_meter.engine import FAIL_POLICIES, STRATEGIES, FailPolicy, Strategy
from agent_meter.errors import BackendError, ConfigError, UsageLimitExceeded
from agent_meter.guard import GuardedCall
from agent_meter.integration import (
    Units,
    check_features,
    check_units_option,
    count_units,
    refusal_text,
)
from agent_meter.mcp.customers import CustomerResolver, from_access_token, resolve_customer
from agent_meter.meter import Meter

__all__ = ["MeteringMiddleware", "Units", "UnitsFromResult"]

logger = logging.getLogger("agent_meter")

UnitsFromResult: TypeAlias = Callable[[ToolResult], float]
"""The real count of a call, from the tool's result (billed instead of the estimate)."""


def _error_result(text: str) -> ToolResult:
    """A tool result the client reads as a failure (``isError: true``)."""
    return ToolResult(content=text, is_error=True)


def _bill_actual(call: GuardedCall, count: UnitsFromResult, result: ToolResult, name: str) -> None:
    """Bill the real count of a call that succeeded."""
    try:
        call.bill(count(result))
    except Exception:
        # The work succeeded: losing its result over a counting bug would be worse than
        # billing the estimate that was reserved for it (as the LangChain adapter does).
        logger.exception(
            "agent_meter: units_from_result of MCP tool %s failed; billing the estimate %s",
            name,
            call.call.units,
        )


def _no_customer_text(feature_id: str) -> str:
    return (
        f"{feature_id} is unavailable: this request is not linked to a paying customer "
        "(authenticate first), so the tool was not run and nothing was charged"
    )


def _per_tool(option: object, name: str, default: object) -> Any:
    if isinstance(option, Mapping):
        return option.get(name, default)
    return default if option is None else option


class MeteringMiddleware(Middleware):
    """Meter every tool call of a FastMCP server: checked first, only successes billed.

    Args:
        meter: The meter that guards each call.
        features: Tool name to feature id. ``None`` marks a free tool (never metered).
        default_feature: The feature of tools missing from ``features``. Without it such a
            call is refused (a tool nobody priced would otherwise run for free).
        customer: Who pays: a function (sync or async) of fastmcp's ``MiddlewareContext``
            returning a customer id, a ``(customer_id, entity_id)`` pair, a
            :class:`~agent_meter.CustomerRef` or ``None`` (the call is refused). Defaults
            to the verified access token's client id (:func:`from_access_token`).
        units: Units per call: a number, a function of the call's arguments, or a mapping
            of tool name to either (tools not in it use 1).
        units_from_result: A function of the tool's ``ToolResult`` giving the real count
            (then ``units`` is the estimate reserved up front), or a mapping of tool name
            to such functions.
        strategy: Overrides the meter's strategy for these calls.
        on_backend_error: Overrides the meter's fail policy for these calls.

    Raises:
        ConfigError: An unknown feature, strategy or policy, or a malformed option.

    Example:
        >>> mcp = FastMCP("search", auth=verifier)
        >>> mcp.add_middleware(MeteringMiddleware(meter, features={"search": "web_search"}))
    """

    def __init__(
        self,
        meter: Meter,
        features: Mapping[str, str | None],
        *,
        default_feature: str | None = None,
        customer: CustomerResolver | None = None,
        units: Units | Mapping[str, Units] = 1,
        units_from_result: UnitsFromResult | Mapping[str, UnitsFromResult] | None = None,
        strategy: Strategy | None = None,
        on_backend_error: FailPolicy | None = None,
    ) -> None:
        if not isinstance(meter, Meter):
            msg = f"MeteringMiddleware needs a Meter, not {type(meter).__name__}"
            raise ConfigError(msg)
        if not isinstance(features, Mapping):
            msg = "features must map tool names to feature ids ({'search': 'web_search'})"
            raise ConfigError(msg)
        priced = {name: feature for name, feature in features.items() if feature is not None}
        check_features(meter, priced, default_feature)
        if customer is not None and not callable(customer):
            msg = "customer must be a function of the MiddlewareContext"
            raise ConfigError(msg)
        for name, value in (units if isinstance(units, Mapping) else {"every tool": units}).items():
            check_units_option(value, name)
        counters = (
            units_from_result.values()
            if isinstance(units_from_result, Mapping)
            else [units_from_result]
        )
        if any(count is not None and not callable(count) for count in counters):
            msg = "units_from_result must be a function of the tool's result"
            raise ConfigError(msg)
        if strategy is not None and strategy not in STRATEGIES:
            msg = f"strategy must be one of {STRATEGIES}, not {strategy!r}"
            raise ConfigError(msg)
        if on_backend_error is not None and on_backend_error not in FAIL_POLICIES:
            msg = f"on_backend_error must be one of {FAIL_POLICIES}, not {on_backend_error!r}"
            raise ConfigError(msg)
        self.meter = meter
        self.features = dict(features)
        self.default_feature = default_feature
        self.customer: CustomerResolver = customer or from_access_token()
        self.units = units
        self.units_from_result = units_from_result
        self.strategy = strategy
        self.on_backend_error = on_backend_error

    def __repr__(self) -> str:
        return f"MeteringMiddleware({self.meter!r}, features={self.features!r})"

    async def on_call_tool(
        self,
        context: MiddlewareContext[Any],
        call_next: CallNext[Any, ToolResult],
    ) -> ToolResult:
        """Run one tool call inside the meter's guard (see the class docstring)."""
        name = context.message.name
        if name in self.features:
            feature_id = self.features[name]
            if feature_id is None:  # declared free by the server author
                return await call_next(context)
        elif self.default_feature is not None:
            feature_id = self.default_feature
        else:
            logger.error("agent_meter: MCP tool %r has no feature; the call was refused", name)
            return _error_result(
                f"{name} is unavailable: it has no price on this server, so it was not run "
                "and nothing was charged"
            )
        try:
            ref = await resolve_customer(self.customer, context)
        except Exception:  # the resolver is the server author's code: fail closed
            logger.exception("agent_meter: the customer resolver failed for MCP tool %r", name)
            ref = None
        if ref is None:
            return _error_result(_no_customer_text(feature_id))
        arguments = dict(context.message.arguments or {})
        units = _per_tool(self.units, name, 1)
        try:
            count = count_units(units, arguments)
            guard = self.meter.aguard(
                ref.customer_id,
                feature_id,
                count,
                entity_id=ref.entity_id,
                strategy=self.strategy,
                on_backend_error=self.on_backend_error,
            )
        except Exception as error:  # noqa: BLE001 - a units function given arguments it cannot count
            logger.warning("agent_meter: could not count the units of MCP tool %r: %r", name, error)
            return _error_result(
                f"{name} was not run: its arguments are invalid ({type(error).__name__}: "
                f"{error}); nothing was charged"
            )
        counter = _per_tool(self.units_from_result, name, None)
        entered = False
        try:
            async with guard as call:
                entered = True
                result = await call_next(context)
                if isinstance(result, ToolResult) and result.is_error:
                    call.fail("the tool returned isError")
                elif counter is not None and isinstance(result, ToolResult):
                    _bill_actual(call, counter, result, name)
        except (UsageLimitExceeded, BackendError) as error:
            if entered:  # raised by the tool itself (a nested metered call): not ours
                raise
            return _error_result(refusal_text(error, feature_id))
        return result
