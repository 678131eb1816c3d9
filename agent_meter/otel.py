"""OpenTelemetry for agent_meter: a span per guarded call, counters of billed units.

Needs the ``otel`` extra (``pip install 'agent-meter[otel]'``: ``opentelemetry-api``);
configure an SDK (exporters) as for any other library.

Example:
    >>> from agent_meter.otel import OpenTelemetryHook
    >>> meter.add_hook(OpenTelemetryHook())

Each guarded call that ends (billed or refunded) or is refused becomes one span named
``agent_meter.guard`` (from its admission to its settlement) with the attributes
``agent_meter.customer_id``, ``agent_meter.feature_id``, ``agent_meter.units``,
``agent_meter.outcome`` (``billed``, ``refunded``, ``denied``) and
``agent_meter.strategy``. Three counters add the units: ``agent_meter.units.billed``,
``agent_meter.units.refunded`` and ``agent_meter.units.denied`` (attributes: customer and
feature), so billed follows what the ledger charged, LLM calls included (their tokens
billed beyond the reservation count what the balance really paid). A fourth,
``agent_meter.tokens.unbilled`` (attribute: customer), adds the tokens of LLM calls the
balance could not pay or the meter could not record.
"""

from __future__ import annotations

from agent_meter.extras import require

require("otel", "opentelemetry", integration="agent_meter.otel")

from opentelemetry import metrics, trace  # noqa: E402 - after the extra check
from opentelemetry.util.types import AttributeValue  # noqa: E402

from agent_meter.engine import MeteredCall  # noqa: E402
from agent_meter.hooks import Billed, Denied, Event, Refunded, UnbilledTokens  # noqa: E402

__all__ = ["SPAN_NAME", "OpenTelemetryHook"]

SPAN_NAME = "agent_meter.guard"


def _nanos(unix: float) -> int:
    return int(unix * 1_000_000_000)


class OpenTelemetryHook:
    """A hook (:mod:`agent_meter.hooks`) that reports to OpenTelemetry.

    Args:
        tracer_provider: Where spans go; the global provider when omitted.
        meter_provider: Where counters go; the global provider when omitted.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("agent_meter", tracer_provider=tracer_provider)
        instruments = metrics.get_meter("agent_meter", meter_provider=meter_provider)
        self._billed = instruments.create_counter(
            "agent_meter.units.billed", unit="{unit}", description="Units billed by guarded calls"
        )
        self._refunded = instruments.create_counter(
            "agent_meter.units.refunded",
            unit="{unit}",
            description="Units given back by guarded calls that failed",
        )
        self._denied = instruments.create_counter(
            "agent_meter.units.denied",
            unit="{unit}",
            description="Units of guarded calls that were refused",
        )
        self._unbilled = instruments.create_counter(
            "agent_meter.tokens.unbilled",
            unit="{token}",
            description="Tokens of LLM calls that the balance could not pay or that were lost",
        )

    def __repr__(self) -> str:
        return "OpenTelemetryHook()"

    def __call__(self, event: Event) -> None:
        """Turn a call's end or refusal into a span and counter increments."""
        if isinstance(event, Billed):
            self._span(event.call, "billed", event.units, event.started_at, event.at)
            self._billed.add(event.units, _counted(event.call))
        elif isinstance(event, Refunded):
            self._span(event.call, "refunded", event.units, event.started_at, event.at)
            self._refunded.add(event.units, _counted(event.call))
        elif isinstance(event, Denied):
            self._span(event.call, "denied", event.call.units, event.at, event.at, event.reason)
            self._denied.add(event.call.units, _counted(event.call))
        elif isinstance(event, UnbilledTokens) and event.tokens:
            self._unbilled.add(event.tokens, {"agent_meter.customer_id": event.customer_id})

    def _span(  # noqa: PLR0917 - private; one call site per outcome
        self,
        call: MeteredCall,
        outcome: str,
        units: float,
        start: float,
        end: float,
        reason: str | None = None,
    ) -> None:
        attributes: dict[str, AttributeValue] = {
            "agent_meter.customer_id": call.customer_id,
            "agent_meter.feature_id": call.feature_id,
            "agent_meter.units": units,
            "agent_meter.outcome": outcome,
            "agent_meter.strategy": call.strategy,
            "agent_meter.call_id": call.call_id,
        }
        if call.entity_id is not None:
            attributes["agent_meter.entity_id"] = call.entity_id
        if reason is not None:
            attributes["agent_meter.denied_reason"] = reason
        span = self._tracer.start_span(SPAN_NAME, attributes=attributes, start_time=_nanos(start))
        span.end(end_time=_nanos(end))


def _counted(call: MeteredCall) -> dict[str, AttributeValue]:
    return {"agent_meter.customer_id": call.customer_id, "agent_meter.feature_id": call.feature_id}
