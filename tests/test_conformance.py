"""One table of billing scenarios, run through every adapter that applies (issue 14).

Adapters: the LangChain tool wrapper (``wrap_tool``), the agent middleware
(``MeteringMiddleware``), OpenAI tool calls (``run_tool_calls``) and, for streams, the
OpenAI client (``wrap_client``). Ledgers: Memory, SQLite, and a local Autumn-shaped server
(127.0.0.1 only). Every scenario asserts what the customer's balance says afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import openai
import pytest
from langchain.agents import create_agent
from langchain.agents.middleware import ToolRetryMiddleware
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import InjectedToolCallId, tool
from langgraph.types import Command

from agent_meter import AutumnBackend, BackendUnavailable, Meter, SQLiteBackend
from agent_meter.langchain.middleware import MeteringMiddleware
from agent_meter.openai import run_tool_calls, wrap_client
from agent_meter.testing import MemoryBackend
from tests.langchain_tools_helpers import ScriptedChatModel
from tests.openai_helpers import API_BASE, ScriptedAPI, chunks, sse, sse_reply
from tests.outage_helpers import SECRET, AutumnServer, pricing

CUSTOMER = "cus_conformance"
CONFIG: Any = {"configurable": {"customer_id": CUSTOMER}}
START = 10.0


# -- ledgers ---------------------------------------------------------------------------------


@dataclass
class Ledger:
    name: str
    meter: Meter
    read: Callable[[], float]
    set_credits: Callable[[float], None]
    break_it: Callable[[], None]

    def credits(self) -> float:
        self.meter.flush(timeout=10)
        return self.read()


@pytest.fixture(params=["memory", "sqlite", "autumn"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "autumn":
        with AutumnServer() as server:
            backend = AutumnBackend(
                SECRET, base_url=server.url, timeout=2, max_retries=1, backoff=0.01
            )
            meter = Meter(backend, pricing=pricing(), outbox=tmp_path / "outbox.db")
            server.set_balance(CUSTOMER, START)
            yield Ledger(
                "autumn",
                meter,
                lambda: server.balance(CUSTOMER),
                lambda credits: server.set_balance(CUSTOMER, credits),
                lambda: server.set_mode("503"),
            )
            meter.close(timeout=2)
        return
    local: Any = (
        MemoryBackend(pricing=pricing())
        if request.param == "memory"
        else SQLiteBackend(tmp_path / "usage.db", pricing=pricing())
    )
    local.set_balance(CUSTOMER, "credits", START)
    meter = Meter(local)
    yield Ledger(
        request.param,
        meter,
        lambda: float(local.balances(CUSTOMER)["credits"]),
        lambda credits: local.set_balance(CUSTOMER, "credits", credits),
        lambda: _break(local),
    )
    meter.close()


def _break(local: Any) -> None:
    """Make every reservation fail as an unreachable service, cause and customer in it."""
    if isinstance(local, MemoryBackend):
        local.fail(method="check")
        return

    def reserve(*args: Any, **kwargs: Any) -> Any:
        raise BackendUnavailable(f"database is locked (customer {CUSTOMER!r})")

    async def areserve(*args: Any, **kwargs: Any) -> Any:
        reserve()

    local.reserve = reserve
    local.areserve = areserve


# -- the tools -------------------------------------------------------------------------------


class Work:
    """What the tool does on each run: fail the first ``failures`` runs, then succeed."""

    def __init__(self, failures: int = 0, error_message: bool = False) -> None:
        self.failures = failures
        self.error_message = error_message
        self.runs: list[dict[str, Any]] = []

    def __call__(self, **args: Any) -> str:
        self.runs.append(args)
        if len(self.runs) <= self.failures:
            raise ConnectionError("upstream timed out")
        return f"results for {args.get('query')}"


def lc_tool(work: Work) -> Any:
    @tool
    def search(query: str) -> str:
        """Search the web."""
        return work(query=query)

    return search


def command_tool(work: Work) -> Any:
    @tool
    def search(query: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> Command:  # type: ignore[type-arg]
        """Search the web, answering with a Command."""
        work(query=query)
        message = ToolMessage("nothing found", tool_call_id=tool_call_id, status="error")
        return Command(update={"messages": [message]})

    return search


def ai_call(call_id: str, query: str) -> AIMessage:
    args = {"query": query}
    return AIMessage(
        content="",
        tool_calls=[{"name": "search", "args": args, "id": call_id, "type": "tool_call"}],
    )


# -- the adapters: each runs tool calls and returns what the model read ----------------------


class Adapter:
    name: str

    def turns(self, ledger: Ledger, work: Work, calls: list[tuple[str, str]]) -> list[str]:
        """Run each (call id, query) as a separate turn; the model's readings."""
        raise NotImplementedError


class WrapTool(Adapter):
    name = "wrap_tool"

    def turns(self, ledger: Ledger, work: Work, calls: list[tuple[str, str]]) -> list[str]:
        wrapped = ledger.meter.wrap_tool(lc_tool(work), "web_search")
        return [_agent(wrapped, None, calls)]


class Middleware(Adapter):
    name = "middleware"

    def turns(self, ledger: Ledger, work: Work, calls: list[tuple[str, str]]) -> list[str]:
        middleware = MeteringMiddleware(ledger.meter, {"search": "web_search"}, None)
        return [_agent(lc_tool(work), middleware, calls)]


class OpenAITools(Adapter):
    name = "run_tool_calls"

    def turns(self, ledger: Ledger, work: Work, calls: list[tuple[str, str]]) -> list[str]:
        answers = []
        for n, (call_id, query) in enumerate(calls):
            completion = {
                "id": f"chatcmpl-turn{n}",
                "choices": [
                    {
                        "message": {
                            "role": "assistant",
                            "tool_calls": [
                                {
                                    "id": call_id,
                                    "type": "function",
                                    "function": {
                                        "name": "search",
                                        "arguments": f'{{"query": "{query}"}}',
                                    },
                                }
                            ],
                        }
                    }
                ],
            }
            reply = run_tool_calls(
                ledger.meter,
                completion,
                {"search": work},
                {"search": "web_search"},
                customer_id=CUSTOMER,
            )
            answers.append(str(reply[0]["content"]))
        return answers


def _agent(tool_: Any, middleware: MeteringMiddleware | None, calls: list[tuple[str, str]]) -> str:
    script = [ai_call(call_id, query) for call_id, query in calls] + [AIMessage(content="ok")]
    model: BaseChatModel = ScriptedChatModel(script=script)
    agent = create_agent(model, [tool_], middleware=[middleware] if middleware else [])
    result = agent.invoke({"messages": [("user", "go")]}, config=CONFIG)
    return " | ".join(str(m.content) for m in result["messages"] if isinstance(m, ToolMessage))


ADAPTERS = [WrapTool(), Middleware(), OpenAITools()]


@pytest.fixture(params=ADAPTERS, ids=lambda adapter: adapter.name)
def adapter(request: pytest.FixtureRequest) -> Adapter:
    chosen: Adapter = request.param
    return chosen


# -- the scenarios ---------------------------------------------------------------------------


def test_reused_ids_across_turns_are_billed_per_call(ledger: Ledger, adapter: Adapter) -> None:
    work = Work()
    adapter.turns(ledger, work, [("call_0", "a"), ("call_0", "b"), ("call_0", "a")])
    assert len(work.runs) == 3
    assert ledger.credits() == START - 3


def test_identical_refusal_text_without_customer_or_cause(ledger: Ledger, adapter: Adapter) -> None:
    ledger.set_credits(0)
    denied = adapter.turns(ledger, Work(), [("call_1", "a")])
    ledger.break_it()
    broken = adapter.turns(ledger, Work(), [("call_2", "a")])
    for text in denied + broken:
        assert CUSTOMER not in text
        assert "Cause" not in text
        assert "503" not in text
        assert "MemoryBackend told" not in text
        assert "locked" not in text
    # one wording: the OpenAI tool message puts "Error: " before it, nothing else differs
    assert (
        denied[0].removeprefix("Error: ") == "web_search is unavailable: 0 credits left, 1 needed"
    )
    assert broken[0].removeprefix("Error: ") == (
        "web_search is unavailable: the billing service is unreachable, so the tool was not "
        "run and nothing was charged; try again later"
    )


def test_a_retry_after_failure_is_billed_once(ledger: Ledger, tmp_path: Path) -> None:
    """The same call id, run again after it failed: with_retry, ToolRetryMiddleware, OpenAI."""
    # wrap_tool: LangChain's with_retry around the wrapped tool
    work = Work(failures=1)
    wrapped = ledger.meter.wrap_tool(lc_tool(work), "web_search")
    retrying = wrapped.with_retry(stop_after_attempt=2, wait_exponential_jitter=False)
    call = {"type": "tool_call", "name": "search", "args": {"query": "q"}, "id": "call_r"}
    assert retrying.invoke(call, config=CONFIG).content == "results for q"
    assert ledger.credits() == START - 1
    # middleware: ToolRetryMiddleware outside the meter, so each attempt is guarded
    work = Work(failures=1)
    retry = ToolRetryMiddleware(max_retries=1, initial_delay=0.0, jitter=False)
    metering = MeteringMiddleware(ledger.meter, {"search": "web_search"}, None)
    model = ScriptedChatModel(script=[ai_call("call_m", "q"), AIMessage(content="ok")])
    create_agent(model, [lc_tool(work)], middleware=[retry, metering]).invoke(
        {"messages": [("user", "go")]}, config=CONFIG
    )
    assert len(work.runs) == 2
    assert ledger.credits() == START - 2
    # OpenAI tool calls: the same message run again after its function failed
    work = Work(failures=1)
    message = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_o",
                "type": "function",
                "function": {"name": "search", "arguments": '{"query": "q"}'},
            }
        ],
    }
    for _ in range(2):
        run_tool_calls(
            ledger.meter, message, {"search": work}, {"search": "web_search"}, customer_id=CUSTOMER
        )
    assert ledger.credits() == START - 3


def test_a_replay_after_success_is_not_billed(ledger: Ledger) -> None:
    """On Autumn, whose check takes no key, the replay is caught by the track's key."""
    meter = ledger.meter
    if ledger.name == "autumn":
        meter = Meter(
            meter.backend, pricing=pricing(), strategy="check_then_track", outbox=meter.outbox.path
        )
    work = Work()
    wrapped = meter.wrap_tool(lc_tool(work), "web_search")
    call = {"type": "tool_call", "name": "search", "args": {"query": "q"}, "id": "call_p"}
    message = {
        "role": "assistant",
        "tool_calls": [
            {
                "id": "call_p",
                "type": "function",
                "function": {"name": "search", "arguments": '{"query": "q"}'},
            }
        ],
    }
    for _ in range(2):
        wrapped.invoke(call, config=CONFIG)
        run_tool_calls(
            meter, message, {"search": work}, {"search": "code_exec"}, customer_id=CUSTOMER
        )
    meter.flush(timeout=10)
    assert len(work.runs) == 4
    assert ledger.credits() == START - 1 - 2


@pytest.mark.parametrize("via", ["wrap_tool", "middleware"])
def test_a_command_with_an_error_message_is_not_billed(ledger: Ledger, via: str) -> None:
    work = Work()
    tool_ = command_tool(work)
    if via == "wrap_tool":
        _agent(ledger.meter.wrap_tool(tool_, "web_search"), None, [("call_c", "q")])
    else:
        middleware = MeteringMiddleware(ledger.meter, {"search": "web_search"}, None)
        _agent(tool_, middleware, [("call_c", "q")])
    assert len(work.runs) == 1
    assert ledger.credits() == START


def test_units_failing_on_bad_arguments_bill_nothing(ledger: Ledger) -> None:
    work = Work()
    wrapped = ledger.meter.wrap_tool(lc_tool(work), "web_search", units=lambda a: len(a["urls"]))
    answer = _agent(wrapped, None, [("call_u", "q")])
    assert "urls" in answer
    assert work.runs == []
    assert ledger.credits() == START


@pytest.mark.parametrize("how", ["to_the_end", "closed_early", "left_at_finish_reason"])
def test_a_stream_is_billed_exactly_once(ledger: Ledger, how: str) -> None:
    content, last = chunks(f"chatcmpl-{how}", usage=(800, 200))  # 1000 tokens = 1 credit
    api = ScriptedAPI(sse_reply(sse([*content, last])))
    openai_client = openai.OpenAI(
        api_key="sk-test",
        base_url=API_BASE,
        http_client=httpx.Client(transport=httpx.MockTransport(api)),  # type: ignore[arg-type]
        max_retries=0,
    )
    client = wrap_client(openai_client, ledger.meter, customer_id=CUSTOMER)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    for chunk in stream:
        if how == "closed_early":
            stream.close()
            break
        if how == "left_at_finish_reason" and chunk.choices[0].finish_reason:
            break
    assert ledger.credits() == START - 1
    stream.close()
    assert ledger.credits() == START - 1


def test_a_gate_denial_is_not_logged_as_a_callback_crash(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    from agent_meter import UsageLimitExceeded  # noqa: PLC0415

    ledger.set_credits(0)
    handler = ledger.meter.callback_handler("llm_tokens")
    model = ScriptedChatModel(script=[AIMessage(content="hi")])
    with caplog.at_level(logging.WARNING), pytest.raises(UsageLimitExceeded):
        model.invoke(
            "hello", config={"callbacks": [handler], "metadata": {"customer_id": CUSTOMER}}
        )
    assert "Error in" not in caplog.text
