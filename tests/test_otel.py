"""The OpenTelemetry hook: one span per guarded call, counters that add up to the ledger."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_meter import Meter, UsageLimitExceeded
from agent_meter.otel import SPAN_NAME, OpenTelemetryHook
from agent_meter.testing import MemoryBackend


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


@pytest.fixture
def meter(
    memory_backend: MemoryBackend, exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> Meter:
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    meter = Meter(memory_backend)
    meter.add_hook(OpenTelemetryHook(tracing, MeterProvider(metric_readers=[reader])))
    return meter


def counters(reader: InMemoryMetricReader) -> dict[str, float]:
    totals: dict[str, float] = {}
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points: Any = metric.data.data_points
                totals[metric.name] = sum(point.value for point in points)
    return totals


async def test_one_span_per_guarded_call_with_the_documented_attributes(
    meter: Meter, memory_backend: MemoryBackend, exporter: InMemorySpanExporter
) -> None:
    with meter.guard("cus_1", "web_search", 2, call_id="a"):
        pass
    with pytest.raises(RuntimeError):
        async with meter.aguard("cus_1", "code_exec", strategy="check_then_track"):
            raise RuntimeError
    memory_backend.deny(feature_id="web_search")
    with pytest.raises(UsageLimitExceeded), meter.guard("cus_1", "web_search"):
        pass
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == [SPAN_NAME] * 3
    attributes = [dict(span.attributes or {}) for span in spans]
    keys = {"agent_meter.customer_id", "agent_meter.feature_id", "agent_meter.units"}
    keys |= {"agent_meter.outcome", "agent_meter.strategy"}
    assert all(keys <= set(found) for found in attributes)
    assert [(a["agent_meter.outcome"], a["agent_meter.strategy"]) for a in attributes] == [
        ("billed", "reserve"),
        ("refunded", "check_then_track"),
        ("denied", "reserve"),
    ]
    assert attributes[0]["agent_meter.units"] == 2
    assert attributes[0]["agent_meter.customer_id"] == "cus_1"
    assert all(span.end_time is not None and span.start_time is not None for span in spans)


async def test_counters_add_up_to_the_ledger(
    meter: Meter, memory_backend: MemoryBackend, reader: InMemoryMetricReader
) -> None:
    for n in range(12):
        try:
            async with meter.aguard("cus_1", "web_search", 1 + n % 3, call_id=f"c{n}") as call:
                if n % 4 == 0:
                    raise RuntimeError("the tool failed")
                if n % 5 == 0:
                    call.bill(4)
        except RuntimeError:
            pass
    memory_backend.set_balance("cus_1", "credits", 1)
    with pytest.raises(UsageLimitExceeded), meter.guard("cus_1", "web_search", 3):
        pass
    totals = counters(reader)
    events = memory_backend.events("cus_1")
    net = sum(e.value for e in events if e.kind in ("reserve", "track"))  # refunds negative
    refunded = -sum(e.value for e in events if e.kind == "track" and e.value < 0)
    assert refunded > 0
    assert totals["agent_meter.units.billed"] == net
    assert totals["agent_meter.units.refunded"] == refunded
    assert totals["agent_meter.units.denied"] == sum(e.value for e in events if e.kind == "denied")
    assert totals["agent_meter.units.denied"] == 3
