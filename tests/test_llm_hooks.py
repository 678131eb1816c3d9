"""Every decision on an LLM call is an event passed to the meter's hooks, not a log line.

The callback handler, the middleware and ``wrap_client`` admit, bill, refund and report
tokens they could not bill through :mod:`agent_meter.hooks`; the default
:class:`~agent_meter.hooks.LoggingHook` writes the lines they used to write themselves, and
a meter without it writes none. The OpenTelemetry hook's counters add up to the ledger for
LLM calls as they do for tools. llm_tokens cost 0.001 credits: 1 credit pays 1,000 tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent_meter import BackendUnavailable, Meter, SQLiteBackend, UsageLimitExceeded
from agent_meter.hooks import (
    Admitted,
    Billed,
    Event,
    Refunded,
    SettleFailed,
    UnbilledTokens,
)
from agent_meter.langchain.middleware import MeteringMiddleware
from agent_meter.openai import wrap_client
from agent_meter.otel import OpenTelemetryHook
from agent_meter.testing import MemoryBackend
from tests.langchain_token_helpers import ScriptedChatModel, reply
from tests.openai_helpers import chat_completion, chunks, example_pricing, sse
from tests.test_otel import counters

CUS = "cus_hooks"
Backend = MemoryBackend | SQLiteBackend


def recorded(meter: Meter) -> list[Event]:
    events: list[Event] = []
    meter.add_hook(events.append)
    return events


def of(kind: type[Any], events: list[Event]) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]


def invoke(meter: Meter, replies: list[AIMessage], **options: Any) -> None:
    handler = meter.callback_handler(customer_id=CUS, **options)
    model = ScriptedChatModel(replies=replies)
    for _ in replies:
        model.invoke("hi", config={"callbacks": [handler]})


def openai_client(answer: Callable[[httpx.Request], httpx.Response]) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="sk-test",
        max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(answer)),  # type: ignore[arg-type]
    )


def test_a_reserved_call_is_admitted_then_billed_its_real_tokens(
    memory_backend: MemoryBackend,
) -> None:
    meter = Meter(memory_backend)
    events = recorded(meter)
    invoke(meter, [reply(tokens=(12, 30))], estimate=500)
    assert [type(event) for event in events] == [Admitted, Billed]
    admitted, billed = events
    assert isinstance(admitted, Admitted)
    assert isinstance(billed, Billed)
    assert (admitted.reserved, billed.units) == (500, 42)
    assert admitted.call.call_id == billed.call.call_id


def test_usage_beyond_reservation_and_balance_is_an_unbilled_tokens_event(
    backend: Backend,
) -> None:
    backend.set_balance(CUS, "credits", 1)
    meter = Meter(backend)
    events = recorded(meter)
    invoke(meter, [reply(tokens=(100, 1400))], estimate=600)
    [billed] = of(Billed, events)
    [unbilled] = of(UnbilledTokens, events)
    assert billed.units == 1000  # what stayed billed: the balance paid 1,000 of 1,500
    assert (unbilled.customer_id, unbilled.tokens) == (CUS, 500)
    assert unbilled.call_id == billed.call.call_id
    assert "could not pay 500" in unbilled.reason
    assert backend.balances(CUS)["credits"] == 0


def test_a_reply_without_usage_is_an_unbilled_tokens_event_in_every_adapter(
    memory_backend: MemoryBackend,
) -> None:
    meter = Meter(memory_backend)
    events = recorded(meter)
    invoke(meter, [reply(tokens=None)])
    agent = create_agent(
        ScriptedChatModel(replies=[reply(tokens=None)]),
        middleware=[MeteringMiddleware(meter, customer_id=CUS)],
    )
    agent.invoke({"messages": [("user", "hi")]})
    content, _ = chunks()
    client = wrap_client(
        openai_client(lambda request: httpx.Response(200, content=sse(content))),
        meter,
        customer_id=CUS,
    )
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    for _ in stream:
        pass
    unbilled = of(UnbilledTokens, events)
    assert [(event.customer_id, event.tokens) for event in unbilled] == [(CUS, 0)] * 3
    assert "scripted-1" in unbilled[0].reason  # the model that reported nothing
    assert "no token usage" in unbilled[1].reason
    assert "without reporting usage" in unbilled[2].reason
    assert len(of(Refunded, events)) == 3  # each reservation was given back
    assert memory_backend.balances(CUS)["credits"] == 100


def test_a_failed_call_is_refunded_with_its_reason(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    events = recorded(meter)
    client = wrap_client(
        openai_client(lambda request: httpx.Response(400, json={"error": {"message": "no"}})),
        meter,
        customer_id=CUS,
        estimate=300,
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    [refunded] = of(Refunded, events)
    assert refunded.units == 300
    assert refunded.reason == "the request failed: BadRequestError"
    assert not of(UnbilledTokens, events)  # a failed call used nothing that went unbilled


def test_tokens_the_backend_could_not_record_are_reported(
    memory_backend: MemoryBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = Meter(memory_backend)
    events = recorded(meter)
    client = wrap_client(
        openai_client(lambda request: httpx.Response(200, json=chat_completion(usage=(20, 10)))),
        meter,
        customer_id=CUS,
        estimate=300,
    )
    memory_backend.fail(method="track")  # the refund of the unused part fails ...

    def outbox_full(*args: object, **kwargs: object) -> None:
        raise BackendUnavailable("ledger down and outbox full")

    monkeypatch.setattr(meter._flows, "queue", outbox_full)  # ... and cannot wait either
    client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )  # the answer is paid for at OpenAI: the caller gets it, the failure is reported
    # (issue 12: a settlement that cannot be written is kept and written again later, so
    # the tokens are not lost: the hooks get SettleFailed, not UnbilledTokens)
    [failed] = of(SettleFailed, events)
    assert (failed.call.customer_id, failed.succeeded) == (CUS, True)
    assert "outbox full" in failed.error
    assert meter._flows.unsettled == 1


def test_the_check_only_gate_bills_through_events_too(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    events = recorded(meter)
    invoke(meter, [reply(tokens=(12, 30)), reply(tokens=None)], reserve=False, estimate=10)
    kinds = [type(event) for event in events]
    assert kinds == [Admitted, Billed, Admitted, Refunded, UnbilledTokens]
    admitted, billed = events[0], events[1]
    assert isinstance(admitted, Admitted)
    assert isinstance(billed, Billed)
    assert (admitted.reserved, billed.units) == (0, 42)
    assert admitted.call.call_id == billed.call.call_id  # one call, admitted then billed


def test_without_the_logging_hook_the_llm_path_logs_nothing(
    memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    memory_backend.set_balance(CUS, "credits", 1)
    meter = Meter(memory_backend, hooks=[])
    events = recorded(meter)
    with caplog.at_level(logging.DEBUG, logger="agent_meter"):
        invoke(meter, [reply(tokens=None), reply(tokens=(100, 1400))], estimate=600)
    assert [r.getMessage() for r in caplog.records if r.name.startswith("agent_meter")] == []
    assert [event.tokens for event in of(UnbilledTokens, events)] == [0, 500]


def test_the_logging_hook_writes_the_llm_lines(
    memory_backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    memory_backend.set_balance(CUS, "credits", 1)
    meter = Meter(memory_backend)
    with caplog.at_level(logging.INFO, logger="agent_meter"):
        invoke(meter, [reply(tokens=None), reply(tokens=(100, 1400))], estimate=600)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert any(
        level == logging.WARNING and "scripted-1" in text and "not metered" in text
        for level, text in lines
    )
    assert any(
        level >= logging.WARNING and "could not pay 500" in text and CUS in text
        for level, text in lines
    )


# -- OpenTelemetry: counters add up to the ledger for LLM calls too ---------------------------


def test_otel_counters_add_up_to_the_ledger_for_llm_calls() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    backend.set_balance(CUS, "credits", 3)
    exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
    tracing = TracerProvider()
    tracing.add_span_processor(SimpleSpanProcessor(exporter))
    meter = Meter(backend)
    meter.add_hook(OpenTelemetryHook(tracing, MeterProvider(metric_readers=[reader])))
    handler = meter.callback_handler(customer_id=CUS, estimate=800)
    replies = [
        reply(tokens=(100, 200)),  # below the reservation: the rest given back
        reply(tokens=(300, 900)),  # above it: the excess charged
        reply(tokens=None),  # nothing reported: released
        reply(tokens=(200, 1800)),  # past reservation and balance: 1,500 paid of 2,000
    ]
    model = ScriptedChatModel(replies=replies)
    for _ in replies:
        model.invoke("hi", config={"callbacks": [handler]})
    with pytest.raises(UsageLimitExceeded):  # the balance is spent: refused before the call
        model.invoke("hi", config={"callbacks": [handler]})
    failing = wrap_client(
        openai_client(lambda request: httpx.Response(400, json={"error": {"message": "no"}})),
        meter,
        customer_id=CUS,
        estimate=500,
    )
    backend.set_balance(CUS, "credits", 1)
    with pytest.raises(openai.BadRequestError):
        failing.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
    totals = counters(reader)
    events = backend.events(CUS, feature_id="llm_tokens")
    charged = -sum(e.applied for e in events) / 0.001  # tokens the balance really paid
    assert totals["agent_meter.units.billed"] == pytest.approx(charged)
    assert totals["agent_meter.units.billed"] == pytest.approx(300 + 1200 + 1500)
    assert totals["agent_meter.units.refunded"] == 800 + 500  # the unmetered and failed calls
    assert totals["agent_meter.units.denied"] == sum(e.value for e in events if e.kind == "denied")
    assert totals["agent_meter.units.denied"] == 800
    assert totals["agent_meter.tokens.unbilled"] == 500
    spans = exporter.get_finished_spans()
    outcomes = [dict(span.attributes or {})["agent_meter.outcome"] for span in spans]
    assert outcomes == ["billed", "billed", "refunded", "billed", "denied", "refunded"]
