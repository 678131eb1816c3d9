"""The client side: MCP tools loaded with langchain-mcp-adapters, metered by ``wrap_tools``.

The agent's author bills their own customers for the tools of an MCP server. The tools
come from a real FastMCP server through a real MCP session, are wrapped unchanged, and
run inside ``langchain.agents.create_agent`` with a scripted chat model (no network).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from fastmcp import Client, FastMCP
from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
from fastmcp.tools import ToolResult
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import BaseTool, ToolException
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_mcp_adapters.tools import load_mcp_tools

from agent_meter import Meter
from agent_meter.testing import MemoryBackend
from tests.langchain_tools_helpers import CONFIG, CUSTOMER, ScriptedChatModel, example_pricing
from tests.langchain_tools_helpers import tool_call as call
from tests.mcp_helpers import TOKENS, Work, build_server, serve_http

FEATURES = {"search": "web_search", "run_python": "code_exec", "broken": "web_search"}


def third_party_server(work: Work) -> FastMCP[Any]:
    """An MCP server someone else runs: it knows nothing about agent_meter."""
    mcp: FastMCP[Any] = FastMCP("tools")

    @mcp.tool
    def search(query: str, limit: int = 3) -> str:
        """Search the web."""
        work.ran.append(("search", query))
        return f"{limit} results for {query}"

    @mcp.tool
    def run_python(code: str) -> str:
        """Run Python code."""
        work.ran.append(("run_python", code))
        if "import" in code:
            msg = "imports are not allowed"
            raise ValueError(msg)
        return str(len(code))

    @mcp.tool
    def broken(query: str) -> ToolResult:
        """Reports a failure as an isError result."""
        work.ran.append(("broken", query))
        return ToolResult(content="upstream failed", is_error=True)

    return mcp


@pytest.fixture
def work() -> Work:
    return Work()


@pytest.fixture
async def mcp_tools(work: Work) -> AsyncIterator[list[BaseTool]]:
    async with Client(third_party_server(work)) as client:
        yield await load_mcp_tools(client.session)


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(pricing=example_pricing())


def by_name(tools: Sequence[BaseTool]) -> dict[str, BaseTool]:
    return {tool.name: tool for tool in tools}


async def test_wrapped_mcp_tools_keep_their_schemas(
    mcp_tools: list[BaseTool], backend: MemoryBackend
) -> None:
    wrapped = Meter(backend).wrap_tools(mcp_tools, features=FEATURES)
    for bare, metered in zip(mcp_tools, wrapped, strict=True):
        assert convert_to_openai_tool(metered) == convert_to_openai_tool(bare)
        assert metered.tool_call_schema == bare.tool_call_schema
        assert metered.response_format == bare.response_format == "content_and_artifact"
    spec = convert_to_openai_tool(by_name(wrapped)["search"])["function"]
    assert spec["parameters"]["required"] == ["query"]


async def test_an_agent_run_bills_exactly_the_mcp_calls_that_succeeded(
    mcp_tools: list[BaseTool], backend: MemoryBackend, work: Work
) -> None:
    tools = Meter(backend).wrap_tools(mcp_tools, features=FEATURES)
    model = ScriptedChatModel(
        script=[
            AIMessage(
                content="",
                tool_calls=[
                    call("search", {"query": "mcp"}, "call_1"),
                    call("run_python", {"code": "1 + 1"}, "call_2"),
                    call("run_python", {"code": "import os"}, "call_3"),
                    call("broken", {"query": "x"}, "call_4"),
                    call("search", {"query": "billing", "limit": 5}, "call_5"),
                ],
            ),
            AIMessage(content="done"),
        ]
    )
    result = await create_agent(model, tools).ainvoke({"messages": [("user", "go")]}, config=CONFIG)
    messages = {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}
    status = {key: message.status for key, message in messages.items()}
    assert status == {
        "call_1": "success",
        "call_2": "success",
        "call_3": "error",  # the server raised: an isError result
        "call_4": "error",  # the tool returned isError itself
        "call_5": "success",
    }
    assert "imports are not allowed" in str(messages["call_3"].content)
    assert messages["call_5"].artifact == {
        "structured_content": {"result": "5 results for billing"}
    }
    assert len(work.ran) == 5
    # search 1 + code 2 + search 1; the failed code run and the isError result refunded
    assert backend.balances(CUSTOMER)["credits"] == 96
    net = sum(e.value for e in backend.events(CUSTOMER) if e.feature_id == "code_exec")
    assert net == 1
    assert result["messages"][-1].content == "done"


async def test_a_denied_mcp_call_never_reaches_the_server(
    mcp_tools: list[BaseTool], backend: MemoryBackend, work: Work
) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    tools = Meter(backend).wrap_tools(mcp_tools, features=FEATURES)
    model = ScriptedChatModel(
        script=[
            AIMessage(content="", tool_calls=[call("search", {"query": "q"}, "call_1")]),
            AIMessage(content="out of credits"),
        ]
    )
    result = await create_agent(model, tools).ainvoke({"messages": [("user", "go")]}, config=CONFIG)
    refused = [m for m in result["messages"] if isinstance(m, ToolMessage)]
    assert [(m.status, m.content) for m in refused] == [
        ("error", "web_search is unavailable: 0 credits left, 1 needed")
    ]
    assert work.ran == []


async def test_an_mcp_error_raised_as_an_exception_is_refunded(
    work: Work, backend: MemoryBackend
) -> None:
    async with Client(third_party_server(work)) as client:
        bare = await load_mcp_tools(client.session, handle_tool_errors=False)
        tools = by_name(Meter(backend).wrap_tools(bare, features=FEATURES))
        with pytest.raises(ToolException, match="upstream failed"):
            await tools["broken"].ainvoke(call("broken", {"query": "q"}, "call_1"), config=CONFIG)
        ok = await tools["search"].ainvoke(call("search", {"query": "q"}, "call_2"), config=CONFIG)
    assert ok.status == "success"
    assert backend.balances(CUSTOMER)["credits"] == 99
    assert [e.kind for e in backend.events(CUSTOMER)] == ["reserve", "track", "reserve"]


@pytest.mark.slow
async def test_an_agent_bills_its_customers_while_the_paid_server_bills_the_agent(
    backend: MemoryBackend, work: Work
) -> None:
    # Two ledgers: the MCP server charges the agent's author (bearer token tok-1 is
    # cus_1's); the agent's author charges their own customer cus_end for each success.
    server_ledger = MemoryBackend(pricing=example_pricing())
    server = build_server(Meter(server_ledger), work, auth=StaticTokenVerifier(TOKENS))
    with serve_http(server) as url:
        connection: Any = {
            "transport": "streamable_http",
            "url": url,
            "headers": {"Authorization": "Bearer tok-1"},
        }
        bare = await load_mcp_tools(None, connection=connection)
        tools = Meter(backend).wrap_tools(
            [t for t in bare if t.name in FEATURES], features=FEATURES
        )
        model = ScriptedChatModel(
            script=[
                AIMessage(
                    content="",
                    tool_calls=[
                        call("search", {"query": "a"}, "call_1"),
                        call("broken", {"query": "b"}, "call_2"),
                        call("run_python", {"code": "2 * 21"}, "call_3"),
                    ],
                ),
                AIMessage(content="done"),
            ]
        )
        await create_agent(model, tools).ainvoke(
            {"messages": [("user", "go")]},
            config={"configurable": {"customer_id": "cus_end"}},
        )
    assert sorted(name for name, _ in work.ran) == ["broken", "run_python", "search"]
    assert backend.balances("cus_end")["credits"] == 97  # what the agent billed its customer
    assert server_ledger.balances(CUSTOMER)["credits"] == 97  # what the server billed the agent
    assert server_ledger.customers() == [CUSTOMER]
