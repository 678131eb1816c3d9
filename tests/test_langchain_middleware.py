"""MeteringMiddleware on create_agent: tool credits plus token credits, exactly."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import ToolException, tool

from agent_meter import AgentMeterError, ConfigError, Meter, SQLiteBackend, UsageLimitExceeded
from agent_meter.errors import BackendUnavailable
from agent_meter.langchain.middleware import MeteringMiddleware
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

SEARCH_CREDITS = Decimal(1)
CONFIG: RunnableConfig = {"configurable": {"customer_id": CUSTOMER}}


class Counter:
    def __init__(self) -> None:
        self.calls = 0


@pytest.fixture
def searches() -> Counter:
    return Counter()


@pytest.fixture
def web_search(searches: Counter):
    @tool
    def web_search(query: str) -> str:
        """Search the web."""
        searches.calls += 1
        return f"results for {query}"

    return web_search


def search_then_answer(call_id: str = "call_1") -> ScriptedChatModel:
    """A model that calls web_search once (10+20 tokens), then answers (50+7 tokens)."""
    return ScriptedChatModel(
        replies=[
            reply(
                "",
                tokens=(10, 20),
                tool_calls=[{"name": "web_search", "args": {"query": "x"}, "id": call_id}],
            ),
            reply("the answer", tokens=(50, 7)),
        ]
    )


TOKENS = (10 + 20) + (50 + 7)


@pytest.fixture(params=["memory", "sqlite"])
def meter(request: pytest.FixtureRequest, tmp_path) -> Meter:
    if request.param == "memory":
        return Meter(MemoryBackend(pricing=make_pricing()))
    return Meter(SQLiteBackend(tmp_path / "usage.db", pricing=make_pricing()))


def embedded(meter: Meter) -> SQLiteBackend | MemoryBackend:
    """The meter's backend, one of the embedded ledgers these tests run on."""
    assert isinstance(meter.backend, (SQLiteBackend, MemoryBackend))
    return meter.backend


def agent_for(meter: Meter, model: ScriptedChatModel, tools: list[Any], **options: Any) -> Any:
    middleware = MeteringMiddleware(meter, features={"web_search": "web_search"}, **options)
    return create_agent(model, tools=tools, middleware=[middleware])


def tool_messages(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


# -- the balance afterwards ---------------------------------------------------------------


def test_agent_run_costs_tool_credits_plus_token_credits(meter: Meter, web_search, searches):
    model = search_then_answer()

    result = agent_for(meter, model, [web_search]).invoke(
        {"messages": [("user", "search x")]}, config=CONFIG
    )

    assert result["messages"][-1].content == "the answer"
    assert searches.calls == 1
    assert model.calls == 2
    assert embedded(meter).balances(CUSTOMER)["credits"] == credits_left(
        100, SEARCH_CREDITS, TOKENS * TOKEN_RATE
    )


async def test_agent_run_costs_tool_credits_plus_token_credits_async(
    meter: Meter, web_search, searches
):
    model = search_then_answer()

    result = await agent_for(meter, model, [web_search]).ainvoke(
        {"messages": [("user", "search x")]}, config=CONFIG
    )

    assert result["messages"][-1].content == "the answer"
    assert searches.calls == 1
    assert embedded(meter).balances(CUSTOMER)["credits"] == credits_left(
        100, SEARCH_CREDITS, TOKENS * TOKEN_RATE
    )


async def test_concurrent_agent_runs_bill_exactly(web_search, searches):
    meter = Meter(MemoryBackend(pricing=make_pricing()))
    runs = 10
    agents = [agent_for(meter, search_then_answer(f"call_{i}"), [web_search]) for i in range(runs)]

    await asyncio.gather(
        *(agent.ainvoke({"messages": [("user", "x")]}, config=CONFIG) for agent in agents)
    )

    assert searches.calls == runs
    assert embedded(meter).balances(CUSTOMER)["credits"] == credits_left(
        100, runs * SEARCH_CREDITS, runs * TOKENS * TOKEN_RATE
    )


def test_split_token_features(web_search) -> None:
    meter = Meter(MemoryBackend(pricing=make_pricing()))
    agent = agent_for(
        meter,
        search_then_answer(),
        [web_search],
        token_feature_id=None,
        input_feature_id="llm_input",
        output_feature_id="llm_output",
    )

    agent.invoke({"messages": [("user", "x")]}, config=CONFIG)

    spent = SEARCH_CREDITS + 60 * INPUT_RATE + 27 * OUTPUT_RATE
    assert embedded(meter).balances(CUSTOMER)["credits"] == credits_left(100, spent)


# -- denials and failures -----------------------------------------------------------------


def test_denied_tool_becomes_an_error_tool_message(web_search, searches) -> None:
    backend = MemoryBackend(pricing=make_pricing())
    backend.set_balance(CUSTOMER, "credits", 0.5)  # tokens yes, a 1-credit search no
    model = search_then_answer()

    # each model call reserves 30 tokens (the scripted model's first reply is that size)
    result = agent_for(Meter(backend), model, [web_search], estimate=30).invoke(
        {"messages": [("user", "x")]}, config=CONFIG
    )

    [denial] = tool_messages(result)
    assert denial.status == "error"
    # The first model call (30 tokens) was billed before the tool was asked for.
    assert denial.content == "web_search is unavailable: 0.47 credits left, 1 needed"
    assert denial.tool_call_id == "call_1"
    assert searches.calls == 0
    assert model.calls == 2  # the run went on: the model read the denial and answered
    assert backend.balances(CUSTOMER)["credits"] == credits_left(0.5, TOKENS * TOKEN_RATE)


async def test_denied_tool_becomes_an_error_tool_message_async(web_search, searches):
    backend = MemoryBackend(pricing=make_pricing())
    backend.deny(feature_id="web_search")

    result = await agent_for(Meter(backend), search_then_answer(), [web_search]).ainvoke(
        {"messages": [("user", "x")]}, config=CONFIG
    )

    [denial] = tool_messages(result)
    assert denial.status == "error"
    assert str(denial.content).startswith("web_search is unavailable")
    assert searches.calls == 0
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, TOKENS * TOKEN_RATE)


def test_backend_down_on_a_tool_check_is_an_error_result_not_a_charge(web_search, searches):
    backend = MemoryBackend(pricing=make_pricing())
    meter = Meter(backend)
    agent = agent_for(meter, search_then_answer(), [web_search])
    # Only the tool's check fails; the model gates still pass.
    backend.fail(BackendUnavailable("connection refused"), method="check", feature_id="web_search")
    result = agent.invoke({"messages": [("user", "x")]}, config=CONFIG)

    [refusal] = tool_messages(result)
    assert refusal.status == "error"
    assert "billing service is unreachable" in refusal.content
    assert searches.calls == 0
    assert backend.balances(CUSTOMER)["credits"] == credits_left(100, TOKENS * TOKEN_RATE)


def test_failed_tool_is_not_billed(meter: Meter) -> None:
    @tool
    def web_search(query: str) -> str:
        """Search the web."""
        raise ToolException("search engine down")

    web_search.handle_tool_error = True  # the tool answers an error ToolMessage

    result = agent_for(meter, search_then_answer(), [web_search]).invoke(
        {"messages": [("user", "x")]}, config=CONFIG
    )

    [failure] = tool_messages(result)
    assert failure.status == "error"
    assert embedded(meter).balances(CUSTOMER)["credits"] == credits_left(100, TOKENS * TOKEN_RATE)


async def test_raising_tool_is_refunded_and_reraised(meter: Meter) -> None:
    @tool
    def web_search(query: str) -> str:
        """Search the web."""
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await agent_for(meter, search_then_answer(), [web_search]).ainvoke(
            {"messages": [("user", "x")]}, config=CONFIG
        )

    # Only the first model call (10+20 tokens) happened; the search was refunded.
    assert embedded(meter).balances(CUSTOMER)["credits"] == credits_left(100, 30 * TOKEN_RATE)


def test_no_credit_stops_the_run_before_the_model(web_search) -> None:
    backend = MemoryBackend(pricing=make_pricing())
    backend.set_balance(CUSTOMER, "credits", 0)
    model = search_then_answer()

    with pytest.raises(UsageLimitExceeded):
        agent_for(Meter(backend), model, [web_search]).invoke(
            {"messages": [("user", "x")]}, config=CONFIG
        )
    assert model.calls == 0


async def test_no_credit_stops_the_run_before_the_model_async(web_search) -> None:
    backend = MemoryBackend(pricing=make_pricing())
    backend.set_balance(CUSTOMER, "credits", 0)
    model = search_then_answer()

    with pytest.raises(UsageLimitExceeded):
        await agent_for(Meter(backend), model, [web_search]).ainvoke(
            {"messages": [("user", "x")]}, config=CONFIG
        )
    assert model.calls == 0


def test_unmapped_tools_run_unmetered(meter: Meter, searches) -> None:
    @tool
    def web_search(query: str) -> str:
        """Search the web."""
        searches.calls += 1
        return "ok"

    agent = create_agent(
        search_then_answer(), tools=[web_search], middleware=[MeteringMiddleware(meter)]
    )
    agent.invoke({"messages": [("user", "x")]}, config=CONFIG)

    assert searches.calls == 1
    assert embedded(meter).balances(CUSTOMER)["credits"] == credits_left(100, TOKENS * TOKEN_RATE)


def test_reply_without_usage_warns(meter: Meter, web_search, caplog) -> None:
    model = ScriptedChatModel(replies=[reply("hi", tokens=None)], model="mystery-7b")

    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        agent_for(meter, model, [web_search]).invoke({"messages": [("user", "x")]}, config=CONFIG)

    assert any("no token usage" in r.getMessage() for r in caplog.records)
    assert embedded(meter).balances(CUSTOMER)["credits"] == 100


# -- who pays -----------------------------------------------------------------------------


@dataclass
class Context:
    customer_id: str


def test_customer_from_runtime_context(web_search) -> None:
    meter = Meter(MemoryBackend(pricing=make_pricing()))
    middleware = MeteringMiddleware(meter, features={"web_search": "web_search"})
    agent: Any = create_agent(  # langchain cannot infer the context type from a dataclass
        search_then_answer(), tools=[web_search], middleware=[middleware], context_schema=Context
    )

    agent.invoke({"messages": [("user", "x")]}, context=Context(customer_id="cus_ctx"))

    assert embedded(meter).balances("cus_ctx")["credits"] == credits_left(
        100, SEARCH_CREDITS, TOKENS * TOKEN_RATE
    )


async def test_customer_from_meter_customer_scope(web_search) -> None:
    meter = Meter(MemoryBackend(pricing=make_pricing()))

    async with meter.customer("cus_scope"):
        await agent_for(meter, search_then_answer(), [web_search]).ainvoke(
            {"messages": [("user", "x")]}
        )

    assert embedded(meter).balances("cus_scope")["credits"] == credits_left(
        100, SEARCH_CREDITS, TOKENS * TOKEN_RATE
    )


def test_no_customer_is_a_clear_error(web_search) -> None:
    meter = Meter(MemoryBackend(pricing=make_pricing()))
    model = search_then_answer()

    with pytest.raises(AgentMeterError, match="no customer"):
        agent_for(meter, model, [web_search]).invoke({"messages": [("user", "x")]})
    assert model.calls == 0


def test_unknown_feature_is_a_config_error() -> None:
    meter = Meter(MemoryBackend(pricing=make_pricing()))
    with pytest.raises(ConfigError):
        MeteringMiddleware(meter, features={"web_search": "web_serch"})
    with pytest.raises(ConfigError):
        MeteringMiddleware(meter, token_feature_id="tokens")  # noqa: S106


def test_agent_middleware_example_runs_offline() -> None:
    from tests.test_langchain_callbacks import run_example  # noqa: PLC0415

    done = run_example("agent_middleware.py")

    assert done.returncode == 0, done.stderr
    assert "= 97.6" in done.stdout
    assert (
        "cus_broke's search: [error] web_search is unavailable: 0.975 credits left" in done.stdout
    )
    assert "cus_broke credits left: 0.1" in done.stdout
