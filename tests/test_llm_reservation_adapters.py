"""LLM calls reserve before they run, in every adapter, against a server that keeps a ledger.

The :class:`~tests.token_server.TokenServer` counts the tokens it served its own way; the
tests compare what agent_meter billed with that ledger (llm_tokens cost 0.001 credits).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import openai
import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage
from openai.types.chat import ChatCompletionMessageParam

from agent_meter import Meter, SQLiteBackend, UsageLimitExceeded
from agent_meter.errors import ConfigError
from agent_meter.langchain.middleware import MeteringMiddleware
from agent_meter.openai import wrap_client
from agent_meter.testing import MemoryBackend
from tests.openai_helpers import example_pricing
from tests.token_server import ServerChatModel, TokenServer

CUS = "cus_ledger"
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the weather in Paris today?"}
]
QUESTION = "What is the weather in Paris today?"
Backend = MemoryBackend | SQLiteBackend


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        return MemoryBackend(pricing=example_pricing())
    return SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())


def credits(backend: Backend) -> float:
    return backend.balances(CUS)["credits"]


def billed_tokens(backend: Backend) -> int:
    """LLM tokens actually charged (reservations plus settlements, as applied to the
    balance: a track past the balance is capped, so this is what was collected)."""
    charged = -sum(e.applied for e in backend.events(CUS, feature_id="llm_tokens"))
    return round(charged / 0.001)


def reserved(backend: Backend) -> list[float]:
    """Tokens each LLM reservation held."""
    return [e.value for e in backend.events(CUS, feature_id="llm_tokens") if e.kind == "reserve"]


# -- the completion limit the call sets is what it reserves ------------------------------


def test_the_handler_reads_the_limit_from_the_invocation_params(backend: Backend) -> None:
    server = TokenServer()
    meter = Meter(backend)
    handler = meter.callback_handler(estimate=lambda text: 0)  # count the limit only
    model = ServerChatModel(server=server, max_tokens=300)
    model.invoke("hi", config={"callbacks": [handler], "metadata": {"customer_id": CUS}})
    [held] = reserved(backend)
    assert 300 < held < 320  # the limit plus message overheads
    assert billed_tokens(backend) == server.ledger


def test_the_handler_reserves_the_default_budget_without_a_limit(backend: Backend) -> None:
    server = TokenServer()
    meter = Meter(backend)
    handler = meter.callback_handler(estimate=lambda text: 0, default_max_tokens=77)
    ServerChatModel(server=server).invoke(
        "hi", config={"callbacks": [handler], "metadata": {"customer_id": CUS}}
    )
    [held] = reserved(backend)
    assert 77 < held < 100
    assert billed_tokens(backend) == server.ledger  # 120 written: the excess was charged


def test_the_middleware_reads_the_limit_from_the_model(backend: Backend) -> None:
    server = TokenServer()
    meter = Meter(backend)
    middleware = MeteringMiddleware(meter, estimate=lambda text: 0)
    agent = create_agent(ServerChatModel(server=server, max_tokens=250), middleware=[middleware])
    agent.invoke({"messages": [("user", "hi")]}, config={"configurable": {"customer_id": CUS}})
    [held] = reserved(backend)
    assert 250 < held < 270
    assert billed_tokens(backend) == server.ledger


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_wrap_client_reads_the_limit_from_the_request(backend: Backend, param: str) -> None:
    server = TokenServer()
    client = wrap_client(server.client(), Meter(backend), customer_id=CUS, estimate=len)
    limit: dict[str, Any] = {param: 40}
    client.chat.completions.create(model="m", messages=MESSAGES, **limit)
    [held] = reserved(backend)
    assert held == 40 + len(QUESTION) + 4 + 3  # counter len(): 1 per char
    assert billed_tokens(backend) == server.ledger


def test_the_options_have_the_same_names_in_all_three(backend: Backend) -> None:
    meter = Meter(backend)
    options: dict[str, Any] = {"estimate": 100, "default_max_tokens": 50, "on_denied": "raise"}
    meter.callback_handler(**options)
    MeteringMiddleware(meter, **options)
    wrap_client(TokenServer().client(), meter, customer_id=CUS, **options)
    for bad in ({"estimate": 0}, {"default_max_tokens": -1}, {"on_denied": "ignore"}):
        with pytest.raises(ConfigError):
            meter.callback_handler(**bad)
        with pytest.raises(ConfigError):
            MeteringMiddleware(meter, **bad)
        with pytest.raises(ConfigError):
            wrap_client(TokenServer().client(), meter, customer_id=CUS, **bad)


# -- failures give the reservation back -----------------------------------------------------


def test_a_failed_model_call_releases_in_the_handler_and_the_middleware(backend: Backend) -> None:
    server = TokenServer()
    server.fail_with = 500
    meter = Meter(backend)
    model = ServerChatModel(server=server, max_tokens=100)
    handler = meter.callback_handler()
    with pytest.raises(openai.InternalServerError):
        model.invoke("hi", config={"callbacks": [handler], "metadata": {"customer_id": CUS}})
    agent = create_agent(model, middleware=[MeteringMiddleware(meter)])
    with pytest.raises(openai.InternalServerError):
        agent.invoke({"messages": [("user", "hi")]}, config={"configurable": {"customer_id": CUS}})
    assert len(reserved(backend)) == 2  # both calls held credit while they ran ...
    assert credits(backend) == 100  # ... and gave it back
    assert backend.holds() == []


def test_the_middleware_can_answer_a_refusal_instead_of_raising(backend: Backend) -> None:
    backend.set_balance(CUS, "credits", 0.01)
    server = TokenServer()
    middleware = MeteringMiddleware(Meter(backend), on_denied="message")
    agent = create_agent(ServerChatModel(server=server, max_tokens=100), middleware=[middleware])
    result = agent.invoke(
        {"messages": [("user", "hi")]}, config={"configurable": {"customer_id": CUS}}
    )
    answer = result["messages"][-1]
    assert isinstance(answer, AIMessage)
    assert "llm_tokens is unavailable" in str(answer.content)
    assert server.requests == []  # the model was never called


# -- the 1.2-credit scenario: tool calls, then LLM calls until the gate refuses ---------------


def _llm_call_through(adapter: str, meter: Meter, server: TokenServer) -> Any:
    """A function making one LLM call (max_tokens=100) for CUS through ``adapter``."""
    model = ServerChatModel(server=server, max_tokens=100)
    if adapter == "handler":
        handler = meter.callback_handler()
        config: Any = {"callbacks": [handler], "metadata": {"customer_id": CUS}}
        return lambda: model.invoke(QUESTION, config=config)
    if adapter == "middleware":
        agent = create_agent(model, middleware=[MeteringMiddleware(meter)])
        config = {"configurable": {"customer_id": CUS}}
        return lambda: agent.invoke({"messages": [("user", QUESTION)]}, config=config)
    client = wrap_client(server.client(), meter, customer_id=CUS)
    return lambda: client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=100)


@pytest.mark.parametrize("adapter", ["handler", "middleware", "wrap_client"])
def test_tool_calls_then_llm_calls_on_1_2_credits(backend: Backend, adapter: str) -> None:
    backend.set_balance(CUS, "credits", 1.2)
    server = TokenServer(completion_tokens=120)
    meter = Meter(backend)
    with meter.guard(CUS, "web_search", call_id="search_1"):  # a tool call: 1 credit
        pass
    call = _llm_call_through(adapter, meter, server)
    refused_at = None
    for n in range(5):
        sent = len(server.requests)
        try:
            call()
        except UsageLimitExceeded:
            refused_at = n
            assert len(server.requests) == sent  # refused before the request left
            break
    assert refused_at is not None  # the gate refused the call it could not cover
    assert refused_at == len(server.served) >= 1
    # billed = what the server's ledger says it served, and nothing more or less
    assert billed_tokens(backend) == server.ledger
    assert credits(backend) == pytest.approx(1.2 - 1 - server.ledger * 0.001)
    assert credits(backend) >= 0
    assert backend.holds() == []


# -- streams ---------------------------------------------------------------------------------


def test_a_stream_is_settled_once_when_its_final_chunk_is_read(backend: Backend) -> None:
    server = TokenServer()
    client = wrap_client(server.client(), Meter(backend), customer_id=CUS)
    with client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=100, stream=True
    ) as stream:
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if chunk.choices[0].finish_reason:
                # the usage chunk was read ahead: settled before the caller saw the end
                assert billed_tokens(backend) == server.ledger
                assert backend.holds() == []
    assert billed_tokens(backend) == server.ledger  # closing did not bill it again
    stream.close()
    assert billed_tokens(backend) == server.ledger
    assert credits(backend) == pytest.approx(100 - server.ledger * 0.001)


def test_a_stream_that_fails_releases_its_reservation(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    server = TokenServer()
    server.break_streams = True
    client = wrap_client(server.client(), Meter(backend), customer_id=CUS)
    stream = client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert credits(backend) < 100  # held while it runs
    with (
        caplog.at_level(logging.INFO, logger="agent_meter"),
        pytest.raises(openai.APIConnectionError),
    ):
        list(stream)
    stream.close()
    assert credits(backend) == 100
    assert backend.holds() == []
    assert "the stream failed before its usage arrived" in caplog.text


async def test_async_streams_settle_once_and_release_on_failure(backend: Backend) -> None:
    server = TokenServer()
    client = wrap_client(server.async_client(), Meter(backend), customer_id=CUS)
    stream = await client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=100, stream=True
    )
    async with stream:
        seen = [chunk async for chunk in stream]
    await stream.close()
    assert seen
    assert billed_tokens(backend) == server.ledger
    ledger = server.ledger
    server.break_streams = True
    broken = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        [chunk async for chunk in broken]
    await broken.close()
    assert billed_tokens(backend) == ledger  # the broken stream's reservation came back
    assert backend.holds() == []


# -- 20 concurrent calls, each limited to and using 1,000 tokens, balance for 5 -------------


async def test_20_concurrent_requests_on_a_balance_for_5(backend: Backend) -> None:
    backend.set_balance(CUS, "credits", 5)
    server = TokenServer(completion_tokens=10_000, delay=0.02)
    prompt = server.prompt_tokens({"messages": MESSAGES})
    overhead = 4 + 3  # what the estimator adds: one message, the reply's priming
    # a tokenizer that counts as the server does: each estimate is exactly 1,000 tokens,
    # and each call, limited to 1,000 - prompt completion tokens, uses exactly 1,000
    client = wrap_client(
        server.async_client(),
        Meter(backend),
        customer_id=CUS,
        estimate=lambda text: prompt - overhead,
    )
    lowest = [100.0]

    async def call() -> str:
        try:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, max_completion_tokens=1000 - prompt
            )
        except UsageLimitExceeded:
            return "refused"
        lowest[0] = min(lowest[0], credits(backend))
        return "ran"

    outcomes = await asyncio.gather(*(call() for _ in range(20)))
    ran = outcomes.count("ran")
    assert ran == len(server.served) <= 5
    assert ran == 5  # the balance pays for exactly 5 estimates of 1,000 tokens
    assert server.served == [1000] * 5
    assert billed_tokens(backend) == server.ledger == 5000
    assert credits(backend) == 0
    assert lowest[0] >= 0
    assert backend.holds() == []
