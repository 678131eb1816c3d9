"""Wrapped tools inside LangGraph's ToolNode and langchain's create_agent (no network)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain.tools import ToolRuntime
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import StructuredTool, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from pydantic import BaseModel

from agent_meter import Meter, SQLiteBackend
from agent_meter.testing import MemoryBackend
from tests.langchain_tools_helpers import CONFIG, CUSTOMER, ScriptedChatModel, example_pricing

BODIES: list[str] = []
_lock = threading.Lock()


@tool
def search(query: str) -> str:
    """Search the web for a query."""
    time.sleep(0.02)  # long enough for parallel calls to overlap
    with _lock:
        BODIES.append(query)
    return f"results for {query}"


@tool
async def asearch(query: str) -> str:
    """Search the web for a query (async)."""
    await asyncio.sleep(0.02)
    BODIES.append(query)
    return f"results for {query}"


@tool
def run_python(code: str) -> str:
    """Run Python code."""
    BODIES.append(code)
    return str(len(code))


@tool
def whoami(note: str, runtime: ToolRuntime) -> str:
    """A tool that needs LangGraph's runtime injected."""
    return f"{note}:{runtime.tool_call_id}"


@pytest.fixture(autouse=True)
def _clear() -> None:
    BODIES.clear()


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Any) -> Any:
    if request.param == "memory":
        return MemoryBackend(pricing=example_pricing())
    return SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())


def tool_graph(tools: list[Any]) -> Any:
    """A graph whose one node is a ToolNode (ToolNode needs a graph runtime to run)."""
    graph = StateGraph(MessagesState)
    graph.add_node("tools", ToolNode(tools))
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    return graph.compile()


def ten_calls(name: str) -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[
            {"name": name, "args": {"query": f"q{i}"}, "id": f"call_{i}", "type": "tool_call"}
            for i in range(10)
        ],
    )


def check_three_of_ten(backend: Any, messages: list[ToolMessage]) -> None:
    assert len(messages) == 10
    ok = [m for m in messages if m.status == "success"]
    refused = [m for m in messages if m.status == "error"]
    assert len(ok) == 3
    assert len(refused) == 7
    assert len(BODIES) == 3  # refused calls never ran
    assert {m.content for m in refused} == {"web_search is unavailable: 0 credits left, 1 needed"}
    assert backend.balances(CUSTOMER)["credits"] == 0
    reserved = [e for e in backend.events(CUSTOMER) if e.kind == "reserve"]
    assert len(reserved) == 3
    assert sorted(m.tool_call_id for m in messages) == sorted(f"call_{i}" for i in range(10))


def test_tool_node_ten_parallel_calls_against_three_credits(backend: Any) -> None:
    backend.set_balance(CUSTOMER, "credits", 3)
    graph = tool_graph([Meter(backend).wrap_tool(search, "web_search")])
    result = graph.invoke({"messages": [ten_calls("search")]}, config=CONFIG)
    check_three_of_ten(backend, result["messages"][1:])


async def test_tool_node_ten_parallel_calls_against_three_credits_async(backend: Any) -> None:
    backend.set_balance(CUSTOMER, "credits", 3)
    graph = tool_graph([Meter(backend).wrap_tool(asearch, "web_search")])
    result = await graph.ainvoke({"messages": [ten_calls("asearch")]}, config=CONFIG)
    check_three_of_ten(backend, result["messages"][1:])


def test_tool_node_injects_runtime_into_a_wrapped_tool() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    graph = tool_graph([Meter(backend).wrap_tool(whoami, "web_search")])
    call = {"name": "whoami", "args": {"note": "hi"}, "id": "call_rt", "type": "tool_call"}
    result = graph.invoke({"messages": [AIMessage(content="", tool_calls=[call])]}, config=CONFIG)
    assert result["messages"][-1].content == "hi:call_rt"
    assert backend.balances(CUSTOMER)["credits"] == 99


def agent_script(final: str = "done") -> list[AIMessage]:
    return [
        AIMessage(
            content="",
            tool_calls=[
                {"name": "search", "args": {"query": "cats"}, "id": "call_a", "type": "tool_call"},
                {
                    "name": "run_python",
                    "args": {"code": "1+1"},
                    "id": "call_b",
                    "type": "tool_call",
                },
            ],
        ),
        AIMessage(content=final),
    ]


def test_create_agent_bills_the_tools_it_called() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    tools = Meter(backend).wrap_tools(
        [search, run_python], features={"search": "web_search", "run_python": "code_exec"}
    )
    model = ScriptedChatModel(script=agent_script())
    agent = create_agent(model, tools)
    result = agent.invoke({"messages": [("user", "find cats")]}, config=CONFIG)
    assert result["messages"][-1].content == "done"
    assert backend.balances(CUSTOMER)["credits"] == 97  # 1 search + 2 for code_exec
    assert sorted(BODIES) == ["1+1", "cats"]


async def test_create_agent_bills_the_tools_it_called_async() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    tools = Meter(backend).wrap_tools(
        [search, run_python], features={"search": "web_search", "run_python": "code_exec"}
    )
    agent = create_agent(ScriptedChatModel(script=agent_script()), tools)
    result = await agent.ainvoke({"messages": [("user", "find cats")]}, config=CONFIG)
    assert result["messages"][-1].content == "done"
    assert backend.balances(CUSTOMER)["credits"] == 97


def test_create_agent_tells_the_model_about_a_denial(tmp_path: Any) -> None:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())
    backend.set_balance(CUSTOMER, "credits", 1)  # enough for search, not for code_exec
    tools = Meter(backend).wrap_tools(
        [search, run_python], features={"search": "web_search", "run_python": "code_exec"}
    )
    model = ScriptedChatModel(script=agent_script("out of credits for code"))
    agent = create_agent(model, tools)
    result = agent.invoke({"messages": [("user", "go")]}, config=CONFIG)
    assert result["messages"][-1].content == "out of credits for code"
    # The model's second call saw both results, the refusal marked as an error.
    seen = {m.name: m for m in model.seen[1] if isinstance(m, ToolMessage)}
    assert seen["search"].status == "success"
    assert seen["run_python"].status == "error"
    # The two calls run in parallel: the refusal saw the credit before or after the search.
    assert seen["run_python"].content in {
        "code_exec is unavailable: 0 credits left, 2 needed",
        "code_exec is unavailable: 1 credit left, 2 needed",
    }
    assert BODIES == ["cats"]
    assert backend.balances(CUSTOMER)["credits"] == 0


def test_create_agent_model_cannot_pick_who_pays() -> None:
    backend = MemoryBackend(pricing=example_pricing())

    @tool
    def refund(customer_id: str) -> str:
        """Refund a customer (the model names one)."""
        return f"refunded {customer_id}"

    wrapped = Meter(backend).wrap_tool(refund, "web_search")
    script = [
        AIMessage(
            content="",
            tool_calls=[
                {
                    "name": "refund",
                    "args": {"customer_id": "cus_victim"},
                    "id": "call_v",
                    "type": "tool_call",
                }
            ],
        ),
        AIMessage(content="ok"),
    ]
    agent = create_agent(ScriptedChatModel(script=script), [wrapped])
    agent.invoke(
        {"messages": [("user", "refund cus_victim")]},
        config={"configurable": {"customer_id": "cus_payer"}},
    )
    assert backend.customers() == ["cus_payer"]
    assert backend.balances("cus_payer")["credits"] == 99


class NoteInput(BaseModel):
    note: str


def _whoami_explicit(note: str, runtime: ToolRuntime) -> str:
    return f"{note}:{runtime.tool_call_id}"


# An explicit schema without the runtime: ToolNode finds it in the function's annotations.
whoami_explicit = StructuredTool.from_function(
    func=_whoami_explicit,
    name="whoami_explicit",
    description="A tool whose runtime is declared only on its function.",
    args_schema=NoteInput,
)


def test_tool_node_finds_runtime_on_the_wrapped_function() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    graph = tool_graph([Meter(backend).wrap_tool(whoami_explicit, "web_search")])
    call = {"name": "whoami_explicit", "args": {"note": "yo"}, "id": "call_f", "type": "tool_call"}
    result = graph.invoke({"messages": [AIMessage(content="", tool_calls=[call])]}, config=CONFIG)
    assert result["messages"][-1].content == "yo:call_f"
    assert backend.balances(CUSTOMER)["credits"] == 99
