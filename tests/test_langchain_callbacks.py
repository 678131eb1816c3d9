"""MeteringCallbackHandler: tokens billed once per LLM call, and no call without credit."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import pytest
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableConfig, RunnableLambda

from agent_meter import (
    AgentMeterError,
    BackendError,
    ConfigError,
    Meter,
    SQLiteBackend,
    UsageLimitExceeded,
)
from agent_meter.langchain.callbacks import MeteringCallbackHandler
from agent_meter.testing import MemoryBackend
from tests.langchain_token_helpers import (
    CUSTOMER,
    INPUT_RATE,
    OUTPUT_RATE,
    TOKEN_RATE,
    ScriptedChatModel,
    credits_left,
    make_pricing,
    reply,
)

CONFIG: RunnableConfig = {"metadata": {"customer_id": CUSTOMER}}


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(pricing=make_pricing())


@pytest.fixture
def meter(backend: MemoryBackend) -> Meter:
    return Meter(backend)


def tracks(backend: MemoryBackend) -> list[tuple[str, float]]:
    """What stayed billed per LLM call and feature: its reservation with its settlement."""
    net: dict[tuple[str, str], float] = {}
    for event in backend.events():
        if event.kind in ("reserve", "track"):
            # the hold, adjust and refund keys of one call (a refund names its attempt)
            # (a hold settled later through the outbox refunds under <hold key>:confirm)
            key = re.sub(r":(confirm|release)$", "", event.idempotency_key or "")
            call = re.sub(r"\.r[0-9a-f]{12}$", "", key.rsplit(":", 1)[0])
            net[call, event.feature_id] = net.get((call, event.feature_id), 0.0) + event.value
    return [(feature, value) for (_, feature), value in net.items() if value]


def run_config(handler: MeteringCallbackHandler, **extra: Any) -> RunnableConfig:
    return cast("RunnableConfig", {"callbacks": [handler], **CONFIG, **extra})


# -- invoke -------------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def any_meter(request: pytest.FixtureRequest, tmp_path) -> Meter:
    if request.param == "memory":
        return Meter(MemoryBackend(pricing=make_pricing()))
    return Meter(SQLiteBackend(tmp_path / "usage.db", pricing=make_pricing()))


def test_invoke_bills_total_tokens_once(any_meter: Meter) -> None:
    model = ScriptedChatModel(replies=[reply(tokens=(120, 30))])
    handler = any_meter.callback_handler()

    model.invoke("hi", config=run_config(handler))

    assert cast("MemoryBackend | SQLiteBackend", any_meter.backend).balances(CUSTOMER)[
        "credits"
    ] == credits_left(100, 150 * TOKEN_RATE)
    assert model.calls == 1
    usage = handler.summary.models["scripted-1"]
    assert (usage.calls, usage.input_tokens, usage.output_tokens, usage.total_tokens) == (
        1,
        120,
        30,
        150,
    )
    assert usage.credits == float(150 * TOKEN_RATE)


async def test_ainvoke_bills_total_tokens_once(any_meter: Meter) -> None:
    model = ScriptedChatModel(replies=[reply(tokens=(120, 30))])
    handler = any_meter.callback_handler()

    await model.ainvoke("hi", config=run_config(handler))

    assert cast("MemoryBackend | SQLiteBackend", any_meter.backend).balances(CUSTOMER)[
        "credits"
    ] == credits_left(100, 150 * TOKEN_RATE)
    assert handler.summary.total.total_tokens == 150


# -- streaming ----------------------------------------------------------------------------


def test_stream_bills_final_chunk_usage_exactly_once(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply("one two three four", tokens=(40, 4))])
    handler = meter.callback_handler()

    chunks = list(model.stream("hi", config=run_config(handler)))

    assert len(chunks) >= 4  # really streamed, usage only on the last
    assert [c.usage_metadata is not None for c in chunks if c.content] == [False] * 3 + [True]
    assert tracks(backend) == [("llm_tokens", 44)]
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, 44 * TOKEN_RATE)
    assert handler.summary.total.calls == 1


async def test_astream_bills_final_chunk_usage_exactly_once(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply("one two three four", tokens=(40, 4))])
    handler = meter.callback_handler()

    chunks = [chunk async for chunk in model.astream("hi", config=run_config(handler))]

    assert len(chunks) >= 4
    assert tracks(backend) == [("llm_tokens", 44)]
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, 44 * TOKEN_RATE)


# -- concurrency --------------------------------------------------------------------------


async def test_twenty_concurrent_ainvokes_bill_exactly(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply(tokens=(100, 17))])
    handler = meter.callback_handler()

    await asyncio.gather(*(model.ainvoke("hi", config=run_config(handler)) for _ in range(20)))

    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, 20 * 117 * TOKEN_RATE)
    assert len(tracks(backend)) == 20
    total = handler.summary.total
    assert (total.calls, total.total_tokens) == (20, 20 * 117)


def test_twenty_concurrent_threads_bill_exactly(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply(tokens=(100, 17))])
    handler = meter.callback_handler()

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda _: model.invoke("hi", config=run_config(handler)), range(20)))

    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, 20 * 117 * TOKEN_RATE)
    assert handler.summary.total.calls == 20


# -- the gate -----------------------------------------------------------------------------


def test_no_credit_means_the_model_is_never_called(meter: Meter, backend: MemoryBackend):
    backend.set_balance(CUSTOMER, "credits", 0)
    model = ScriptedChatModel(replies=[reply()])
    handler = meter.callback_handler()

    with pytest.raises(UsageLimitExceeded) as denied:
        model.invoke("hi", config=run_config(handler))

    assert model.calls == 0
    assert denied.value.feature_id == "llm_tokens"
    assert tracks(backend) == []
    assert backend.balances(CUSTOMER)["credits"] == 0
    assert handler.summary.total.calls == 0


async def test_no_credit_means_the_model_is_never_called_async(
    meter: Meter, backend: MemoryBackend
):
    backend.set_balance(CUSTOMER, "credits", 0)
    model = ScriptedChatModel(replies=[reply()])
    handler = meter.callback_handler()

    with pytest.raises(UsageLimitExceeded):
        await model.ainvoke("hi", config=run_config(handler))
    with pytest.raises(UsageLimitExceeded):
        [chunk async for chunk in model.astream("hi", config=run_config(handler))]

    assert model.calls == 0
    assert tracks(backend) == []


def test_gate_estimate_requires_that_many_tokens(meter: Meter, backend: MemoryBackend):
    backend.set_balance(CUSTOMER, "credits", 0.5)  # 500 tokens' worth
    model = ScriptedChatModel(replies=[reply(tokens=(1, 1))])

    with pytest.raises(UsageLimitExceeded):
        model.invoke("hi", config=run_config(meter.callback_handler(gate_estimate=501)))
    model.invoke("hi", config=run_config(meter.callback_handler(gate_estimate=500)))

    assert model.calls == 1
    assert backend.balances(CUSTOMER)["credits"] == credits_left(0.5, 2 * TOKEN_RATE)


def test_gate_off_lets_the_call_run_and_bills_it(meter: Meter, backend: MemoryBackend):
    backend.set_balance(CUSTOMER, "credits", 0)
    model = ScriptedChatModel(replies=[reply()])

    model.invoke("hi", config=run_config(meter.callback_handler(gate=False)))

    assert model.calls == 1
    assert tracks(backend) == [("llm_tokens", 42)]
    assert backend.balances(CUSTOMER)["credits"] == 0  # capped at 0, as Autumn does


def test_backend_down_on_the_gate_refuses_the_call(backend: MemoryBackend):
    meter = Meter(backend, on_backend_error="deny")
    backend.fail(method="check")
    model = ScriptedChatModel(replies=[reply()])

    with pytest.raises(BackendError, match="billing service is unreachable"):
        model.invoke("hi", config=run_config(meter.callback_handler()))
    assert model.calls == 0


def test_billing_rejection_is_raised_not_swallowed(meter: Meter, backend: MemoryBackend):
    backend.fail(ConfigError("feature llm_tokens not found"), method="track")
    model = ScriptedChatModel(replies=[reply()])

    with pytest.raises(ConfigError):
        model.invoke("hi", config=run_config(meter.callback_handler()))
    assert model.calls == 1


async def test_billing_rejection_is_raised_not_swallowed_async(
    meter: Meter, backend: MemoryBackend
):
    backend.fail(ConfigError("feature llm_tokens not found"), method="track")
    model = ScriptedChatModel(replies=[reply()])

    with pytest.raises(ConfigError):
        await model.ainvoke("hi", config=run_config(meter.callback_handler()))


def test_usage_that_meets_an_outage_waits_and_is_billed_once(meter: Meter, backend: MemoryBackend):
    backend.fail(method="track")
    model = ScriptedChatModel(replies=[reply()])

    model.invoke("hi", config=run_config(meter.callback_handler(estimate=1000)))

    # the 958 unused tokens of the reservation wait to be given back
    assert meter.outbox.pending(CUSTOMER) == 1
    assert backend.balances(CUSTOMER)["credits"] == 99
    backend.heal()
    assert meter.flush(timeout=5) == 0
    assert tracks(backend) == [("llm_tokens", 42)]
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, 42 * TOKEN_RATE)


# -- split features -----------------------------------------------------------------------


def test_input_and_output_tokens_go_to_their_own_features(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply(tokens=(1000, 250))])
    handler = meter.callback_handler(input_feature_id="llm_input", output_feature_id="llm_output")

    model.invoke("hi", config=run_config(handler))

    assert sorted(tracks(backend)) == [("llm_input", 1000), ("llm_output", 250)]
    spent = 1000 * INPUT_RATE + 250 * OUTPUT_RATE
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, spent)
    assert handler.summary.total.credits == float(spent)
    # Each side is reserved on its own feature before the call.
    checks = [c for c in backend.calls if c.method == "check"]
    assert [c.feature_id for c in checks] == ["llm_input", "llm_output"]


async def test_input_and_output_tokens_split_async(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply(tokens=(1000, 250))])
    handler = meter.callback_handler(input_feature_id="llm_input", output_feature_id="llm_output")

    await model.ainvoke("hi", config=run_config(handler))

    spent = 1000 * INPUT_RATE + 250 * OUTPUT_RATE
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, spent)


def test_a_lone_input_feature_is_a_config_error(meter: Meter) -> None:
    with pytest.raises(ConfigError, match="both"):
        meter.callback_handler(input_feature_id="llm_input")
    with pytest.raises(ConfigError, match="unknown feature"):
        meter.callback_handler(feature_id="llm_tokenz")
    with pytest.raises(ConfigError, match="gate_estimate"):
        meter.callback_handler(gate_estimate=0)


# -- missing usage ------------------------------------------------------------------------


def test_a_reply_without_usage_is_warned_and_counted_unmetered(
    meter: Meter, backend: MemoryBackend, caplog: pytest.LogCaptureFixture
):
    model = ScriptedChatModel(replies=[reply(tokens=None)], model="mystery-7b")
    handler = meter.callback_handler()

    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        model.invoke("hi", config=run_config(handler))

    assert any(
        "mystery-7b" in r.getMessage() and "not metered" in r.getMessage() for r in caplog.records
    )
    usage = handler.summary.models["mystery-7b"]
    assert (usage.calls, usage.unmetered_calls, usage.total_tokens) == (1, 1, 0)
    assert tracks(backend) == []
    assert backend.balances(CUSTOMER)["credits"] == 100


async def test_a_stream_without_usage_is_warned_and_counted_unmetered(
    meter: Meter, backend: MemoryBackend, caplog: pytest.LogCaptureFixture
):
    model = ScriptedChatModel(replies=[reply("a b", tokens=None)], model="mystery-7b")
    handler = meter.callback_handler()

    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        [chunk async for chunk in model.astream("hi", config=run_config(handler))]

    assert any("mystery-7b" in r.getMessage() for r in caplog.records)
    assert handler.summary.total.unmetered_calls == 1
    assert tracks(backend) == []


def test_legacy_llm_output_token_usage_is_the_fallback(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(
        replies=[reply(tokens=None)],
        llm_output={
            "token_usage": {"prompt_tokens": 70, "completion_tokens": 5, "total_tokens": 75}
        },
    )
    handler = meter.callback_handler()

    model.invoke("hi", config=run_config(handler))

    assert tracks(backend) == [("llm_tokens", 75)]
    assert handler.summary.total.unmetered_calls == 0


# -- idempotency --------------------------------------------------------------------------


def _result(tokens: tuple[int, int]) -> LLMResult:
    return LLMResult(generations=[[ChatGeneration(message=reply(tokens=tokens))]])


def test_a_repeated_on_llm_end_bills_once(meter: Meter, backend: MemoryBackend) -> None:
    handler = meter.callback_handler(customer_id=CUSTOMER)
    run_id = uuid.uuid4()
    handler.on_chat_model_start({}, [[]], run_id=run_id, metadata={})

    handler.on_llm_end(_result((300, 200)), run_id=run_id)
    handler.on_llm_end(_result((300, 200)), run_id=run_id)

    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, 500 * TOKEN_RATE)
    assert handler.summary.total.calls == 1


def test_the_run_id_keys_the_track_across_handlers(meter: Meter, backend: MemoryBackend) -> None:
    # Two handlers (two processes replaying the same run) report the same LLM run.
    run_id = uuid.uuid4()
    for _ in range(2):
        handler = meter.callback_handler(customer_id=CUSTOMER)
        handler.on_llm_end(_result((300, 200)), run_id=run_id)

    assert len([c for c in backend.calls if c.method == "track"]) == 2  # both reached it ...
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, 500 * TOKEN_RATE)  # once


# -- who pays -----------------------------------------------------------------------------


def test_customer_from_configurable_of_the_enclosing_runnable(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply()])
    chain = RunnableLambda(model.invoke)

    chain.invoke(
        "hi",
        config={"callbacks": [meter.callback_handler()], "configurable": {"customer_id": "cus_9"}},
    )

    assert backend.balances("cus_9")["credits"] == credits_left(100, 42 * TOKEN_RATE)


async def test_customer_from_configurable_of_the_enclosing_runnable_async(
    meter: Meter, backend: MemoryBackend
):
    model = ScriptedChatModel(replies=[reply()])

    async def call(text: str) -> object:
        return await model.ainvoke(text)

    await RunnableLambda(call).ainvoke(
        "hi",
        config={"callbacks": [meter.callback_handler()], "configurable": {"customer_id": "cus_9"}},
    )

    assert backend.balances("cus_9")["credits"] == credits_left(100, 42 * TOKEN_RATE)


def test_customer_from_meter_customer_scope(meter: Meter, backend: MemoryBackend) -> None:
    model = ScriptedChatModel(replies=[reply()])

    with meter.customer("cus_scope"):
        model.invoke("hi", config={"callbacks": [meter.callback_handler()]})

    assert backend.balances("cus_scope")["credits"] == credits_left(100, 42 * TOKEN_RATE)


async def test_customer_from_meter_customer_scope_async(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply()])

    async with meter.customer("cus_scope"):
        await model.ainvoke("hi", config={"callbacks": [meter.callback_handler()]})

    assert backend.balances("cus_scope")["credits"] == credits_left(100, 42 * TOKEN_RATE)


def test_run_metadata_wins_over_the_handlers_own_customer(meter: Meter, backend: MemoryBackend):
    model = ScriptedChatModel(replies=[reply()])
    handler = meter.callback_handler(customer_id="cus_default")

    model.invoke("hi", config={"callbacks": [handler]})
    model.invoke("hi", config={"callbacks": [handler], "metadata": {"customer_id": "cus_2"}})

    assert backend.balances("cus_default")["credits"] == credits_left(100, 42 * TOKEN_RATE)
    assert backend.balances("cus_2")["credits"] == credits_left(100, 42 * TOKEN_RATE)


def test_no_customer_is_a_clear_error(meter: Meter) -> None:
    model = ScriptedChatModel(replies=[reply()])

    with pytest.raises(AgentMeterError, match="no customer"):
        model.invoke("hi", config={"callbacks": [meter.callback_handler()]})
    assert model.calls == 0


# -- the summary --------------------------------------------------------------------------


def test_summary_adds_up_every_run_per_model(meter: Meter) -> None:
    small = ScriptedChatModel(replies=[reply(tokens=(10, 5))], model="small")
    large = ScriptedChatModel(
        replies=[reply(tokens=(1000, 500)), reply(tokens=None)], model="large"
    )
    handler = meter.callback_handler()

    small.invoke("a", config=run_config(handler))
    large.invoke("b", config=run_config(handler))
    large.invoke("c", config=run_config(handler))
    small.invoke("d", config=run_config(handler))

    summary = handler.summary
    as_dict = summary.to_dict()
    assert as_dict["models"]["small"] == {
        "model": "small",
        "calls": 2,
        "input_tokens": 20,
        "output_tokens": 10,
        "total_tokens": 30,
        "credits": float(30 * TOKEN_RATE),
        "unmetered_calls": 0,
    }
    assert as_dict["models"]["large"]["unmetered_calls"] == 1
    assert as_dict["total"]["total_tokens"] == 1530
    assert as_dict["total"]["credits"] == float(1530 * TOKEN_RATE)
    assert as_dict["credit_system"] == "credits"
    text = str(summary)
    assert "large" in text
    assert "1530" in text
    assert "1.53" in text
    assert text.splitlines()[0].split()[:2] == ["model", "calls"]


def test_summary_without_pricing_has_no_credits(tmp_path) -> None:
    backend = SQLiteBackend(tmp_path / "u.db", pricing=make_pricing())
    meter = Meter(backend)
    meter.pricing = None  # a remote backend whose catalogue the meter does not know
    model = ScriptedChatModel(replies=[reply()])
    handler = meter.callback_handler()

    model.invoke("hi", config=run_config(handler))

    assert handler.summary.total.credits is None
    assert "?" in str(handler.summary)
    assert handler.summary.total.total_tokens == 42


def test_summary_of_a_split_handler_counts_credits(meter: Meter) -> None:
    handler = meter.callback_handler(input_feature_id="llm_input", output_feature_id="llm_output")
    ScriptedChatModel(replies=[reply(tokens=(2, 3))]).invoke("x", config=run_config(handler))

    assert handler.summary.total.credits == float(2 * INPUT_RATE + 3 * OUTPUT_RATE)
    assert Decimal(str(handler.summary.total.credits)) == Decimal("0.014")


# -- on an agent run ----------------------------------------------------------------------


def _agent(model: ScriptedChatModel):
    from langchain.agents import create_agent  # noqa: PLC0415 - dev dependency
    from langchain_core.tools import tool  # noqa: PLC0415

    @tool
    def lookup(query: str) -> str:
        """Look something up."""
        return "found"

    return create_agent(model, tools=[lookup])


def _lookup_then_answer() -> ScriptedChatModel:
    return ScriptedChatModel(
        replies=[
            reply(
                "",
                tokens=(10, 20),
                tool_calls=[{"name": "lookup", "args": {"query": "q"}, "id": "c1"}],
            ),
            reply("answer", tokens=(50, 7)),
        ]
    )


def test_agent_run_with_configurable_customer(meter: Meter, backend: MemoryBackend) -> None:
    model = _lookup_then_answer()
    handler = meter.callback_handler()

    _agent(model).invoke(
        {"messages": [("user", "q")]},
        config={"callbacks": [handler], "configurable": {"customer_id": "cus_agent"}},
    )

    assert model.calls == 2
    assert backend.balances("cus_agent")["credits"] == credits_left(100, 87 * TOKEN_RATE)
    assert handler.summary.total.calls == 2


async def test_agent_run_stops_when_credit_runs_out_async(meter: Meter, backend: MemoryBackend):
    backend.set_balance("cus_agent", "credits", 0.05)  # 50 tokens; each call reserves 30
    model = _lookup_then_answer()
    handler = meter.callback_handler(estimate=30)

    with pytest.raises(UsageLimitExceeded):
        await _agent(model).ainvoke(
            {"messages": [("user", "q")]},
            config={"callbacks": [handler], "configurable": {"customer_id": "cus_agent"}},
        )

    assert model.calls == 1  # the second call was refused before it started
    assert backend.balances("cus_agent")["credits"] == 0.02  # the first call's 30 tokens


def run_example(name: str) -> subprocess.CompletedProcess[str]:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, str(root / "examples" / name)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_token_budget_example_runs_offline() -> None:
    done = run_example("token_budget.py")

    assert done.returncode == 0, done.stderr
    assert "credits left: 0.6" in done.stdout
    assert "second run refused: llm_tokens is unavailable" in done.stdout
    assert "scripted-gpt      2   1300     100   1400" in done.stdout
