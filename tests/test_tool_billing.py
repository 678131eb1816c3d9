"""The tool wrapper bills exactly what succeeded, under ordinary agent behaviour (issue 14).

Retries (``with_retry``, LangGraph's ``RetryPolicy``), ids reused across turns, units of
invalid arguments, handlers set after wrapping, ``Command`` results and default customers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.tools import ToolException, tool
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command, RetryPolicy
from pydantic import ValidationError

from agent_meter import Meter, SQLiteBackend
from agent_meter.testing import MemoryBackend
from tests.langchain_tools_helpers import CONFIG, CUSTOMER, ScriptedChatModel, example_pricing

RUNS: list[str] = []
FLAKY: list[str] = []


@pytest.fixture(autouse=True)
def _clear() -> None:
    RUNS.clear()
    FLAKY.clear()


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    backend: Any
    if request.param == "memory":
        backend = MemoryBackend(pricing=example_pricing())
    else:
        backend = SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())
    backend.set_balance(CUSTOMER, "credits", 100)
    return backend


def credits(backend: Any) -> float:
    return float(backend.balances(CUSTOMER)["credits"])


def call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    return {"type": "tool_call", "name": name, "args": args, "id": call_id}


@tool
def flaky(query: str) -> str:
    """Fails on its first run, succeeds afterwards."""
    FLAKY.append(query)
    RUNS.append(query)
    if len(FLAKY) == 1:
        raise ConnectionError("upstream timed out")
    return f"results for {query}"


@tool
def search(query: str) -> str:
    """Search."""
    RUNS.append(query)
    return f"results for {query}"


@tool
def fetch(urls: list[str]) -> str:
    """Fetch pages."""
    RUNS.append(",".join(urls))
    return f"{len(urls)} pages"


def tool_graph(tools: list[Any], *, retry: RetryPolicy | None = None) -> Any:
    graph = StateGraph(MessagesState)
    graph.add_node("tools", ToolNode(tools), retry_policy=retry)
    graph.add_edge(START, "tools")
    graph.add_edge("tools", END)
    return graph.compile()


# -- 1. retries are billed ------------------------------------------------------------------


def test_with_retry_bills_the_retry_that_succeeded(backend: Any) -> None:
    wrapped = Meter(backend).wrap_tool(flaky, "web_search")
    retrying = wrapped.with_retry(stop_after_attempt=2, wait_exponential_jitter=False)
    result = retrying.invoke(call("flaky", {"query": "q"}, "call_1"), config=CONFIG)
    assert result.content == "results for q"
    assert RUNS == ["q", "q"]
    assert credits(backend) == 99


async def test_a_failed_sync_attempt_then_ainvoke_is_billed(backend: Any) -> None:
    wrapped = Meter(backend).wrap_tool(flaky, "web_search")
    with pytest.raises(ConnectionError):
        wrapped.invoke(call("flaky", {"query": "q"}, "call_1"), config=CONFIG)
    result = await wrapped.ainvoke(call("flaky", {"query": "q"}, "call_1"), config=CONFIG)
    assert result.content == "results for q"
    assert credits(backend) == 99


def test_retry_policy_bills_the_retry_and_not_the_sibling_twice(backend: Any) -> None:
    """The node is retried as a whole: the sibling that succeeded is replayed for free."""
    meter = Meter(backend)
    graph = tool_graph(
        [meter.wrap_tool(flaky, "web_search"), meter.wrap_tool(search, "code_exec")],
        retry=RetryPolicy(max_attempts=2, initial_interval=0.0, jitter=False),
    )
    message = AIMessage(
        content="",
        tool_calls=[
            call("search", {"query": "s"}, "call_s"),
            call("flaky", {"query": "f"}, "call_f"),
        ],
    )
    result = graph.invoke({"messages": [message]}, config=CONFIG)
    statuses = {m.tool_call_id: m.status for m in result["messages"][1:]}
    assert statuses == {"call_s": "success", "call_f": "success"}
    assert RUNS.count("f") == 2
    assert credits(backend) == 100 - 1 - 2  # flaky once (web_search), search once (code_exec)


# -- 2. ids reused across turns --------------------------------------------------------------


@pytest.mark.parametrize("same_args", [True, False])
def test_ids_reused_across_turns_bill_each_call(backend: Any, same_args: bool) -> None:
    def turn(i: int) -> AIMessage:
        query = "same" if same_args else f"q{i}"
        return AIMessage(content="", tool_calls=[call("search", {"query": query}, "call_0")])

    model = ScriptedChatModel(script=[turn(0), turn(1), turn(2), turn(3), AIMessage(content="ok")])
    agent = create_agent(model, [Meter(backend).wrap_tool(search, "web_search")])
    agent.invoke({"messages": [("user", "go")]}, config=CONFIG)
    assert len(RUNS) == 4
    assert credits(backend) == 96


def test_the_same_call_id_in_another_run_is_a_new_call(backend: Any) -> None:
    wrapped = Meter(backend).wrap_tool(search, "web_search")
    for _ in range(2):
        model = ScriptedChatModel(
            script=[
                AIMessage(content="", tool_calls=[call("search", {"query": "x"}, "call_0")]),
                AIMessage(content="ok"),
            ]
        )
        create_agent(model, [wrapped]).invoke({"messages": [("user", "go")]}, config=CONFIG)
    assert credits(backend) == 98


def test_a_replayed_tool_call_is_billed_once(backend: Any) -> None:
    wrapped = Meter(backend).wrap_tool(search, "web_search")
    for _ in range(3):
        wrapped.invoke(call("search", {"query": "x"}, "call_1"), config=CONFIG)
    assert len(RUNS) == 3
    assert credits(backend) == 99
    wrapped.invoke(call("search", {"query": "other"}, "call_1"), config=CONFIG)
    assert credits(backend) == 98  # same id, other arguments: another call


# -- 4. units run on validated arguments -----------------------------------------------------


def test_units_of_bad_arguments_are_a_validation_error_and_siblings_survive(backend: Any) -> None:
    meter = Meter(backend)
    graph = tool_graph(
        [
            meter.wrap_tool(fetch, "web_search", units=lambda args: len(args["urls"])),
            meter.wrap_tool(search, "code_exec"),
        ]
    )
    message = AIMessage(
        content="",
        tool_calls=[
            call("fetch", {"pages": ["a"]}, "call_bad"),  # no "urls": the schema refuses it
            call("fetch", {"urls": ["a", "b"]}, "call_ok"),
            call("search", {"query": "s"}, "call_s"),
        ],
    )
    result = graph.invoke({"messages": [message]}, config=CONFIG)
    answers = {m.tool_call_id: m for m in result["messages"][1:]}
    assert answers["call_bad"].status == "error"
    assert "urls" in answers["call_bad"].content
    assert answers["call_ok"].content == "2 pages"
    assert answers["call_s"].content == "results for s"
    assert credits(backend) == 100 - 2 - 2


def _units_that_fail(args: dict[str, Any]) -> float:
    return len(args["pages"])  # the schema has no "pages": a bug in the units function


def test_a_failing_units_function_is_the_tools_validation_error(backend: Any) -> None:
    wrapped = Meter(backend).wrap_tool(fetch, "web_search", units=_units_that_fail)
    with pytest.raises(ValidationError, match="pages"):
        wrapped.invoke({"urls": ["a"]}, config=CONFIG)
    wrapped.handle_validation_error = True
    answer = wrapped.invoke(call("fetch", {"urls": ["a"]}, "call_1"), config=CONFIG)
    assert isinstance(answer, ToolMessage)
    assert answer.status == "error"
    assert answer.content == "Tool input validation error"
    assert RUNS == []
    assert credits(backend) == 100


def test_a_failing_units_function_in_tool_node_answers_the_model(backend: Any) -> None:
    meter = Meter(backend)
    graph = tool_graph(
        [
            meter.wrap_tool(fetch, "web_search", units=_units_that_fail),
            meter.wrap_tool(search, "web_search"),
        ]
    )
    message = AIMessage(
        content="",
        tool_calls=[
            call("fetch", {"urls": ["a"]}, "call_f"),
            call("search", {"query": "s"}, "call_s"),
        ],
    )
    result = graph.invoke({"messages": [message]}, config=CONFIG)
    answers = {m.tool_call_id: m for m in result["messages"][1:]}
    assert answers["call_f"].status == "error"
    assert "pages" in answers["call_f"].content
    assert answers["call_s"].status == "success"
    assert credits(backend) == 99


def test_units_see_validated_arguments() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    seen: list[dict[str, Any]] = []

    @tool
    def count(n: int) -> str:
        """Count."""
        return str(n)

    def units(args: dict[str, Any]) -> float:
        seen.append(args)
        return float(args["n"])

    Meter(backend).wrap_tool(count, "web_search", units=units).invoke({"n": "3"}, config=CONFIG)
    assert seen == [{"n": 3}]  # coerced by the schema before the units function saw it
    assert credits(backend) == 97


# -- 5, 6. outcomes ------------------------------------------------------------------------


def test_handle_tool_error_set_after_wrapping_is_honoured(backend: Any) -> None:
    @tool
    def broken(query: str) -> str:
        """Always fails."""
        raise ToolException("no results")

    wrapped = Meter(backend).wrap_tool(broken, "web_search")
    with pytest.raises(ToolException):
        wrapped.invoke(call("broken", {"query": "x"}, "call_1"), config=CONFIG)
    wrapped.handle_tool_error = True
    answer = wrapped.invoke(call("broken", {"query": "x"}, "call_2"), config=CONFIG)
    assert answer.status == "error"
    assert answer.content == "no results"
    assert credits(backend) == 100


def test_a_command_carrying_an_error_message_is_not_billed(backend: Any) -> None:
    @tool
    def route(query: str, tool_call_id: str) -> Command:  # type: ignore[type-arg]
        """Answers with a Command."""
        status = "error" if query == "bad" else "success"
        message = ToolMessage(query, tool_call_id=tool_call_id, status=status)
        return Command(update={"messages": [message]})

    wrapped = Meter(backend).wrap_tool(route, "web_search")
    wrapped.invoke(call("route", {"query": "bad", "tool_call_id": "x"}, "call_1"), config=CONFIG)
    assert credits(backend) == 100
    wrapped.invoke(call("route", {"query": "ok", "tool_call_id": "x"}, "call_2"), config=CONFIG)
    assert credits(backend) == 99


# -- 10. a default customer ------------------------------------------------------------------


def test_wrap_tool_takes_a_default_customer_that_the_run_overrides(backend: Any) -> None:
    backend.set_balance("cus_default", "credits", 10)
    wrapped = Meter(backend).wrap_tool(search, "web_search", customer_id="cus_default")
    wrapped.invoke({"query": "a"})
    assert float(backend.balances("cus_default")["credits"]) == 9
    wrapped.invoke({"query": "b"}, config=CONFIG)
    assert credits(backend) == 99
    assert float(backend.balances("cus_default")["credits"]) == 9
