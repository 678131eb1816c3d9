"""MeteredTool, wrap_tool(s) and the metered decorator, with real LangChain tools."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableConfig, RunnableLambda
from langchain_core.tools import (
    BaseTool,
    InjectedToolCallId,
    StructuredTool,
    Tool,
    ToolException,
    tool,
)
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field

from agent_meter import (
    AgentMeterError,
    BackendError,
    ConfigError,
    Meter,
    SQLiteBackend,
    UsageLimitExceeded,
)
from agent_meter.langchain.tools import MeteredSimpleTool, MeteredTool, wrap_tool
from agent_meter.testing import MemoryBackend
from tests.langchain_tools_helpers import (
    CONFIG,
    CUSTOMER,
    ToolEvents,
    example_pricing,
    tool_call,
)

# -- the tools under test ---------------------------------------------------------------

RAN: list[str] = []  # every tool appends its name when its body runs


@tool
def search(query: str) -> str:
    """Search the web for a query."""
    RAN.append("search")
    return f"results for {query}"


def _fetch(urls: list[str]) -> list[str]:
    RAN.append("fetch")
    return [f"page {url}" for url in urls]


async def _afetch(urls: list[str]) -> list[str]:
    RAN.append("fetch")
    return [f"page {url}" for url in urls]


fetch = StructuredTool.from_function(
    func=_fetch,
    coroutine=_afetch,
    name="fetch",
    description="Fetch several pages.",
    tags=["io"],
    metadata={"owner": "crawler"},
)


class CalculatorInput(BaseModel):
    expression: str = Field(description="A Python expression")


class Calculator(BaseTool):
    """A BaseTool subclass with its own schema, sync and async bodies."""

    name: str = "run_python"
    description: str = "Evaluate a Python expression."
    args_schema: type[BaseModel] = CalculatorInput
    return_direct: bool = True

    def _run(self, expression: str) -> str:
        RAN.append("run_python")
        if expression == "boom":
            msg = "division by zero"
            raise ZeroDivisionError(msg)
        return str(len(expression))

    async def _arun(self, expression: str) -> str:
        return self._run(expression)


@tool
def flaky(query: str) -> str:
    """A tool that fails with a ToolException."""
    RAN.append("flaky")
    raise ToolException(f"cannot search {query}")


flaky_handled = flaky.model_copy(update={"handle_tool_error": True, "name": "flaky_handled"})
flaky_custom = flaky.model_copy(
    update={"handle_tool_error": lambda e: f"sorry: {e}", "name": "flaky_custom"}
)


@tool(response_format="content_and_artifact")
def summarise(text: str) -> tuple[str, dict[str, int]]:
    """Summarise a text; the artifact says how many tokens it spent."""
    RAN.append("summarise")
    return text[:10], {"tokens": len(text)}


@tool
def charge_account(customer_id: str, amount: int) -> str:
    """A tool whose own argument is called customer_id (the model fills it in)."""
    RAN.append("charge_account")
    return f"{customer_id}:{amount}"


@tool
def erroring_message(query: str, tool_call_id: Annotated[str, InjectedToolCallId]) -> ToolMessage:
    """A tool that reports its own failure as a ToolMessage with status=error."""
    RAN.append("erroring_message")
    return ToolMessage("upstream said no", tool_call_id=tool_call_id, status="error")


echo = Tool(name="echo", func=lambda text: text, description="Echo the input.")


@pytest.fixture(autouse=True)
def _clear_ran() -> None:
    RAN.clear()


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(pricing=example_pricing())


@pytest.fixture
def meter(backend: MemoryBackend) -> Meter:
    return Meter(backend)


@pytest.fixture(params=["memory", "sqlite"])
def any_backend(request: pytest.FixtureRequest, tmp_path: Any) -> MemoryBackend | SQLiteBackend:
    if request.param == "memory":
        return MemoryBackend(pricing=example_pricing())
    return SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())


def credits(backend: Any, customer: str = CUSTOMER) -> float:
    return float(backend.balances(customer)["credits"])


# -- the model sees exactly the same tool --------------------------------------------------

ALL_TOOLS = [search, fetch, Calculator(), flaky_handled, summarise, charge_account, echo]


@pytest.mark.parametrize("original", ALL_TOOLS, ids=lambda t: t.name)
def test_wrapped_tool_looks_the_same(meter: Meter, original: BaseTool) -> None:
    wrapped = meter.wrap_tool(original, "web_search")
    assert isinstance(wrapped, MeteredTool)
    assert convert_to_openai_tool(wrapped) == convert_to_openai_tool(original)
    for field in (
        "name",
        "description",
        "args_schema",
        "return_direct",
        "response_format",
        "tags",
        "metadata",
        "extras",
        "handle_tool_error",
        "args",
    ):
        assert getattr(wrapped, field) == getattr(original, field), field
    assert wrapped.tool_call_schema is original.tool_call_schema
    wrapped_schema, original_schema = wrapped.get_input_schema(), original.get_input_schema()
    assert issubclass(wrapped_schema, BaseModel)
    assert issubclass(original_schema, BaseModel)
    assert wrapped_schema.model_json_schema() == original_schema.model_json_schema()


def test_simple_tool_stays_a_tool(meter: Meter) -> None:
    wrapped = meter.wrap_tool(echo, "web_search")
    assert isinstance(wrapped, MeteredSimpleTool)
    assert isinstance(wrapped, Tool)
    assert convert_to_openai_tool(wrapped)["function"]["parameters"]["required"] == ["__arg1"]


# -- success is billed, sync and async, on both embedded ledgers --------------------------


def test_success_is_billed(any_backend: Any) -> None:
    wrapped = Meter(any_backend).wrap_tool(search, "web_search")
    assert wrapped.invoke({"query": "cats"}, config=CONFIG) == "results for cats"
    message = wrapped.invoke(tool_call("search", {"query": "dogs"}, "call_1"), config=CONFIG)
    assert isinstance(message, ToolMessage)
    assert (message.content, message.status, message.tool_call_id) == (
        "results for dogs",
        "success",
        "call_1",
    )
    assert credits(any_backend) == 98


async def test_success_is_billed_async(any_backend: Any) -> None:
    wrapped = Meter(any_backend).wrap_tool(search, "web_search")
    assert await wrapped.ainvoke({"query": "cats"}, config=CONFIG) == "results for cats"
    message = await wrapped.ainvoke(tool_call("search", {"query": "dogs"}, "c2"), config=CONFIG)
    assert message.content == "results for dogs"
    assert credits(any_backend) == 98


def test_base_tool_subclass_code_exec_costs_two(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(Calculator(), "code_exec")
    assert wrapped.invoke({"expression": "1+1"}, config=CONFIG) == "3"
    assert credits(backend) == 98


async def test_base_tool_subclass_code_exec_costs_two_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(Calculator(), "code_exec")
    assert await wrapped.ainvoke({"expression": "1+1"}, config=CONFIG) == "3"
    assert credits(backend) == 98


def test_content_and_artifact_is_kept(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(summarise, "web_search")
    call = tool_call("summarise", {"text": "a long story indeed"}, "call_s")
    expected = summarise.invoke(call)
    got = wrapped.invoke(call, config=CONFIG)
    assert (got.content, got.artifact, got.status) == (
        expected.content,
        expected.artifact,
        "success",
    )
    assert got.artifact == {"tokens": 19}
    assert credits(backend) == 99


async def test_content_and_artifact_is_kept_async(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(summarise, "web_search")
    got = await wrapped.ainvoke(tool_call("summarise", {"text": "abc"}, "c"), config=CONFIG)
    assert (got.content, got.artifact) == ("abc", {"tokens": 3})
    assert credits(backend) == 99


def test_simple_tool_runs_and_bills(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(echo, "web_search")
    assert wrapped.invoke("hello", config=CONFIG) == "hello"
    assert credits(backend) == 99


async def test_simple_tool_runs_and_bills_async(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(echo, "web_search")
    assert await wrapped.ainvoke("hello", config=CONFIG) == "hello"
    assert credits(backend) == 99


def test_run_directly_bills_the_scoped_customer(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(search, "web_search")
    with meter.customer("cus_scope"):
        assert wrapped.run({"query": "x"}) == "results for x"
        message = wrapped.run({"query": "y"}, tool_call_id="call_r")
    assert message.tool_call_id == "call_r"
    assert credits(backend, "cus_scope") == 98


async def test_arun_directly_bills_the_scoped_customer(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(search, "web_search")
    async with meter.customer("cus_scope"):
        assert await wrapped.arun({"query": "x"}) == "results for x"
    assert credits(backend, "cus_scope") == 99


# -- units: fixed, from the arguments, from the result -----------------------------------------


def test_units_from_arguments(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(fetch, "web_search", units=lambda args: len(args["urls"]))
    assert wrapped.invoke({"urls": ["a", "b", "c"]}, config=CONFIG) == [
        "page a",
        "page b",
        "page c",
    ]
    assert credits(backend) == 97


async def test_units_from_arguments_async(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(fetch, "web_search", units=lambda args: len(args["urls"]))
    await wrapped.ainvoke(tool_call("fetch", {"urls": ["a", "b"]}, "c1"), config=CONFIG)
    assert credits(backend) == 98


def test_units_function_sees_only_model_arguments(meter: Meter) -> None:
    seen: list[dict[str, Any]] = []

    def count(args: dict[str, Any]) -> int:
        seen.append(args)
        return 1

    wrapped = meter.wrap_tool(erroring_message, "web_search", units=count)
    wrapped.invoke(tool_call("erroring_message", {"query": "q"}, "call_9"), config=CONFIG)
    assert seen == [{"query": "q"}]  # the injected tool_call_id is not the model's


@pytest.mark.parametrize(("actual", "left"), [(4000, 96), (15000, 85), (10000, 90)])
def test_units_from_result_adjusts_the_estimate(any_backend: Any, actual: int, left: float) -> None:
    wrapped = Meter(any_backend).wrap_tool(
        summarise,
        "llm_tokens",
        units=10_000,  # the estimate reserved up front: 10 credits
        units_from_result=lambda message: message.artifact["tokens"],
    )
    call = tool_call("summarise", {"text": "x" * actual}, "call_sum")
    assert wrapped.invoke(call, config=CONFIG).status == "success"
    assert credits(any_backend) == pytest.approx(left)
    assert next(event.kind for event in any_backend.events(CUSTOMER)) == "reserve"


async def test_units_from_result_adjusts_the_estimate_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(
        summarise,
        "llm_tokens",
        units=10_000,
        units_from_result=lambda message: message.artifact["tokens"],
    )
    await wrapped.ainvoke(tool_call("summarise", {"text": "x" * 2000}, "c"), config=CONFIG)
    assert credits(backend) == pytest.approx(98)


def test_broken_units_from_result_bills_the_estimate(
    meter: Meter, backend: MemoryBackend, caplog: pytest.LogCaptureFixture
) -> None:
    wrapped = meter.wrap_tool(search, "web_search", units=3, units_from_result=lambda _: 1 / 0)
    assert wrapped.invoke({"query": "q"}, config=CONFIG) == "results for q"
    assert credits(backend) == 97
    assert "units_from_result of search failed" in caplog.text


def test_boolean_feature_is_gated_never_tracked(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(search, "premium")
    assert wrapped.invoke({"query": "q"}, config=CONFIG) == "results for q"
    assert [call.method for call in backend.calls] == ["check"]
    assert not backend.calls[0].kwargs.get("send_event")
    assert credits(backend) == 100
    backend.set_balance(CUSTOMER, "premium", False)
    message = wrapped.invoke(tool_call("search", {"query": "q"}, "c"), config=CONFIG)
    assert message.status == "error"
    assert message.content == "premium is unavailable: not included in the customer's plan"
    assert RAN == ["search"]
    assert not any(call.method == "track" for call in backend.calls)


async def test_boolean_feature_is_gated_never_tracked_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(search, "premium")
    assert await wrapped.ainvoke({"query": "q"}, config=CONFIG) == "results for q"
    backend.set_balance(CUSTOMER, "premium", False)
    with pytest.raises(UsageLimitExceeded):
        await wrapped.ainvoke({"query": "q"}, config=CONFIG)
    assert RAN == ["search"]
    assert [call.method for call in backend.calls] == ["check", "check"]


# -- wiring errors come at wrap time --------------------------------------------------------


def test_wrap_tools_maps_names_to_features(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tools(
        [search, Calculator()], features={"search": "web_search", "run_python": "code_exec"}
    )
    assert [(w.name, w.feature_id) for w in wrapped] == [
        ("search", "web_search"),
        ("run_python", "code_exec"),
    ]
    wrapped[0].invoke({"query": "q"}, config=CONFIG)
    wrapped[1].invoke({"expression": "2"}, config=CONFIG)
    assert credits(backend) == 97


def test_tool_missing_from_features_is_refused_at_wrap_time(meter: Meter) -> None:
    with pytest.raises(ConfigError, match=r"no feature for tool.*'run_python'"):
        meter.wrap_tools([search, Calculator()], features={"search": "web_search"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature_id": "web_serch"}, "unknown feature 'web_serch'"),
        ({"feature_id": "web_search", "on_denied": "ignore"}, "on_denied"),
        ({"feature_id": "web_search", "strategy": "yolo"}, "strategy"),
        ({"feature_id": "web_search", "on_backend_error": "maybe"}, "on_backend_error"),
        ({"feature_id": "web_search", "units": -1}, "units"),
        ({"feature_id": "web_search", "units_from_result": 3}, "units_from_result"),
    ],
)
def test_bad_options_are_refused_at_wrap_time(
    meter: Meter, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        meter.wrap_tool(search, **kwargs)


def test_wrapping_twice_or_two_tools_with_one_name_is_refused(meter: Meter) -> None:
    wrapped = meter.wrap_tool(search, "web_search")
    with pytest.raises(ConfigError, match="already metered"):
        meter.wrap_tool(wrapped, "web_search")
    with pytest.raises(ConfigError, match="several tools are named 'search'"):
        meter.wrap_tools([search, search], features={"search": "web_search"})


def test_unknown_option_is_a_type_error(meter: Meter) -> None:
    with pytest.raises(TypeError):
        meter.wrap_tool(search, "web_search", colour="red")  # type: ignore[call-arg]


# -- who pays -------------------------------------------------------------------------------


def test_customer_and_entity_come_from_config(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(search, "web_search")
    config: RunnableConfig = {"configurable": {"customer_id": "cus_7", "entity_id": "seat_3"}}
    wrapped.invoke({"query": "q"}, config=config)
    checks = [call for call in backend.calls if call.method == "check"]
    assert [(c.customer_id, c.kwargs["entity_id"]) for c in checks] == [("cus_7", "seat_3")]


def test_config_wins_over_scope(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(search, "web_search")
    with meter.customer("cus_scope"):
        wrapped.invoke({"query": "q"}, config=CONFIG)
        wrapped.invoke({"query": "q"})
    assert credits(backend) == 99
    assert credits(backend, "cus_scope") == 99


def test_no_customer_is_refused_with_help(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(search, "web_search")
    with pytest.raises(AgentMeterError, match=r"configurable.*customer_id.*meter\.customer"):
        wrapped.invoke(tool_call("search", {"query": "q"}, "c1"))
    assert RAN == []
    assert backend.calls == []


async def test_no_customer_is_refused_with_help_async(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(search, "web_search")
    with pytest.raises(AgentMeterError, match="customer_id"):
        await wrapped.ainvoke({"query": "q"}, config={"configurable": {}})
    assert RAN == []
    assert backend.calls == []


def test_model_written_customer_id_never_decides_who_pays(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(charge_account, "web_search")
    call = tool_call("charge_account", {"customer_id": "cus_victim", "amount": 5}, "call_x")
    message = wrapped.invoke(call, config={"configurable": {"customer_id": "cus_payer"}})
    assert message.content == "cus_victim:5"  # the tool still gets its own argument
    assert credits(backend, "cus_payer") == 99
    assert "cus_victim" not in backend.customers()
    assert {call.customer_id for call in backend.calls} == {"cus_payer"}


async def test_model_written_customer_id_never_decides_who_pays_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(charge_account, "web_search")
    with meter.customer("cus_payer"):
        await wrapped.ainvoke({"customer_id": "cus_victim", "amount": 1})
    with pytest.raises(AgentMeterError, match="no customer"):
        # The model's customer_id is no substitute for a trusted one.
        await wrapped.ainvoke({"customer_id": "cus_victim", "amount": 1})
    assert backend.customers() == ["cus_payer"]


# -- idempotency ----------------------------------------------------------------------------


def test_tool_call_id_names_the_track(backend: MemoryBackend) -> None:
    wrapped = Meter(backend, strategy="check_then_track").wrap_tool(search, "web_search")
    call = tool_call("search", {"query": "q"}, "call_42")
    wrapped.invoke(call, config=CONFIG)
    wrapped.invoke(call, config=CONFIG)  # a replay of the same model call
    keys = [c.kwargs["idempotency_key"] for c in backend.calls if c.method == "track"]
    assert len(keys) == 2
    assert len(set(keys)) == 1
    assert "call_42" in keys[0]
    assert CUSTOMER in keys[0]
    assert credits(backend) == 99  # billed once


def test_calls_without_id_get_fresh_keys(backend: MemoryBackend) -> None:
    wrapped = Meter(backend, strategy="check_then_track").wrap_tool(search, "web_search")
    wrapped.invoke({"query": "q"}, config=CONFIG)
    wrapped.invoke({"query": "q"}, config=CONFIG)
    keys = [c.kwargs["idempotency_key"] for c in backend.calls if c.method == "track"]
    assert len(set(keys)) == 2
    assert credits(backend) == 98


# -- failures are never billed, and error handling is unchanged ----------------------------


def test_exception_is_refunded_and_raised(any_backend: Any) -> None:
    wrapped = Meter(any_backend).wrap_tool(Calculator(), "code_exec")
    with pytest.raises(ZeroDivisionError):
        wrapped.invoke(tool_call("run_python", {"expression": "boom"}, "c1"), config=CONFIG)
    assert RAN == ["run_python"]
    assert credits(any_backend) == 100


async def test_exception_is_refunded_and_raised_async(any_backend: Any) -> None:
    wrapped = Meter(any_backend).wrap_tool(Calculator(), "code_exec")
    with pytest.raises(ZeroDivisionError):
        await wrapped.ainvoke({"expression": "boom"}, config=CONFIG)
    assert credits(any_backend) == 100


@pytest.mark.parametrize("original", [flaky_handled, flaky_custom], ids=lambda t: t.name)
def test_handled_tool_exception_is_refunded_and_unchanged(
    meter: Meter, backend: MemoryBackend, original: BaseTool
) -> None:
    wrapped = meter.wrap_tool(original, "web_search")
    # Without a tool call the handled error is plain text: indistinguishable from success
    # by its value alone.
    plain = wrapped.invoke({"query": "q"}, config=CONFIG)
    assert plain == original.invoke({"query": "q"})
    assert plain in ("cannot search q", "sorry: cannot search q")
    call = tool_call(original.name, {"query": "q"}, "call_f")
    message = wrapped.invoke(call, config=CONFIG)
    expected = original.invoke(call)
    assert (message.content, message.status) == (expected.content, "error")
    assert credits(backend) == 100
    assert RAN.count("flaky") == 4


async def test_handled_tool_exception_is_refunded_and_unchanged_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(flaky_handled, "web_search")
    assert await wrapped.ainvoke({"query": "q"}, config=CONFIG) == "cannot search q"
    message = await wrapped.ainvoke(tool_call("flaky_handled", {"query": "q"}, "c"), config=CONFIG)
    assert message.status == "error"
    assert credits(backend) == 100


def test_unhandled_tool_exception_is_refunded_and_raised(
    meter: Meter, backend: MemoryBackend
) -> None:
    wrapped = meter.wrap_tool(flaky, "web_search")
    with pytest.raises(ToolException, match="cannot search q"):
        wrapped.invoke({"query": "q"}, config=CONFIG)
    assert credits(backend) == 100


def test_handled_validation_error_is_refunded(meter: Meter, backend: MemoryBackend) -> None:
    lenient = search.model_copy(update={"handle_validation_error": True})
    wrapped = meter.wrap_tool(lenient, "web_search")
    message = wrapped.invoke(tool_call("search", {"q": 1}, "c"), config=CONFIG)
    assert (message.content, message.status) == ("Tool input validation error", "error")
    assert wrapped.invoke({"q": 1}, config=CONFIG) == "Tool input validation error"
    assert RAN == []
    assert credits(backend) == 100


def test_error_tool_message_is_refunded(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(erroring_message, "web_search")
    message = wrapped.invoke(tool_call("erroring_message", {"query": "q"}, "c"), config=CONFIG)
    assert (message.content, message.status) == ("upstream said no", "error")
    assert RAN == ["erroring_message"]
    assert credits(backend) == 100


async def test_error_tool_message_is_refunded_async(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(erroring_message, "web_search")
    message = await wrapped.ainvoke(
        tool_call("erroring_message", {"query": "q"}, "c"), config=CONFIG
    )
    assert message.status == "error"
    assert credits(backend) == 100


def test_handled_errors_do_not_leak_between_calls(meter: Meter, backend: MemoryBackend) -> None:
    failing = meter.wrap_tool(flaky_handled, "web_search")
    working = meter.wrap_tool(search, "web_search")
    failing.invoke({"query": "q"}, config=CONFIG)
    working.invoke({"query": "q"}, config=CONFIG)
    assert credits(backend) == 99
    # The original tool keeps working unwrapped, and its handler is untouched.
    assert flaky_handled.invoke({"query": "z"}) == "cannot search z"
    assert flaky_handled.handle_tool_error is True


# -- denials do not run the tool -----------------------------------------------------------------


def test_denial_answers_a_tool_call_with_an_error_message(
    any_backend: Any,
) -> None:
    any_backend.set_balance(CUSTOMER, "credits", 0)
    wrapped = Meter(any_backend).wrap_tool(search, "web_search")
    message = wrapped.invoke(tool_call("search", {"query": "q"}, "call_d"), config=CONFIG)
    assert isinstance(message, ToolMessage)
    assert message.content == "web_search is unavailable: 0 credits left, 1 needed"
    assert (message.status, message.tool_call_id, message.name) == ("error", "call_d", "search")
    assert RAN == []
    assert credits(any_backend) == 0


async def test_denial_answers_a_tool_call_with_an_error_message_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    backend.set_balance(CUSTOMER, "credits", 1)
    wrapped = meter.wrap_tool(Calculator(), "code_exec")
    message = await wrapped.ainvoke(
        tool_call("run_python", {"expression": "1"}, "c"), config=CONFIG
    )
    assert message.content == "code_exec is unavailable: 1 credit left, 2 needed"
    assert message.status == "error"
    assert RAN == []


def test_denial_with_plain_arguments_raises(meter: Meter, backend: MemoryBackend) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    wrapped = meter.wrap_tool(search, "web_search")
    with pytest.raises(UsageLimitExceeded) as caught:
        wrapped.invoke({"query": "q"}, config=CONFIG)
    assert (caught.value.balance, caught.value.required) == (0, 1)
    assert RAN == []


async def test_denial_with_plain_arguments_raises_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    wrapped = meter.wrap_tool(search, "web_search")
    with pytest.raises(UsageLimitExceeded):
        await wrapped.ainvoke({"query": "q"}, config=CONFIG)
    assert RAN == []


def test_on_denied_raise_raises_for_tool_calls_too(meter: Meter, backend: MemoryBackend) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    wrapped = meter.wrap_tool(search, "web_search", on_denied="raise")
    with pytest.raises(UsageLimitExceeded, match="0 credits left, 1 needed"):
        wrapped.invoke(tool_call("search", {"query": "q"}, "c"), config=CONFIG)
    assert RAN == []


def test_unreachable_billing_is_refused_with_its_own_reason(
    meter: Meter, backend: MemoryBackend
) -> None:
    backend.fail(method="check")
    wrapped = meter.wrap_tool(search, "web_search")
    message = wrapped.invoke(tool_call("search", {"query": "q"}, "c"), config=CONFIG)
    assert message.status == "error"
    assert "billing service is unreachable" in message.content
    assert "credits left" not in message.content
    with pytest.raises(BackendError, match="unreachable"):
        wrapped.invoke({"query": "q"}, config=CONFIG)
    assert RAN == []


async def test_unreachable_billing_is_refused_with_its_own_reason_async(
    meter: Meter, backend: MemoryBackend
) -> None:
    backend.fail(method="check")
    wrapped = meter.wrap_tool(search, "web_search")
    message = await wrapped.ainvoke(tool_call("search", {"query": "q"}, "c"), config=CONFIG)
    assert "billing service is unreachable" in message.content
    assert RAN == []


def test_refusal_by_the_backend_is_not_called_unreachable(
    meter: Meter, backend: MemoryBackend
) -> None:
    backend.fail(BackendError("invalid secret key"), method="check")
    wrapped = meter.wrap_tool(search, "web_search", on_backend_error="allow")
    message = wrapped.invoke(tool_call("search", {"query": "q"}, "c"), config=CONFIG)
    assert "refused the check" in message.content
    assert "secret" not in message.content
    assert RAN == []


def test_per_tool_fail_open_runs_and_bills_afterwards(meter: Meter, backend: MemoryBackend) -> None:
    backend.fail(method="check", times=1)
    wrapped = meter.wrap_tool(search, "web_search", on_backend_error="allow")
    assert wrapped.invoke({"query": "q"}, config=CONFIG) == "results for q"
    assert [call.method for call in backend.calls] == ["check", "track"]
    assert credits(backend) == 99


def test_per_tool_strategy_override(meter: Meter, backend: MemoryBackend) -> None:
    wrapped = meter.wrap_tool(search, "web_search", strategy="check_then_track")
    wrapped.invoke({"query": "q"}, config=CONFIG)
    assert [(c.method, c.kwargs.get("send_event")) for c in backend.calls] == [
        ("check", False),
        ("track", None),
    ]
    assert credits(backend) == 99


def test_nested_denial_inside_the_tool_is_the_tools_failure(
    meter: Meter, backend: MemoryBackend
) -> None:
    inner = meter.wrap_tool(Calculator(), "code_exec")

    @tool
    def orchestrate(expression: str) -> str:
        """Runs code through another metered tool."""
        return str(inner.invoke({"expression": expression}))

    outer = meter.wrap_tool(orchestrate, "web_search")
    backend.set_balance(CUSTOMER, "credits", 1)  # enough for the outer call only
    with pytest.raises(UsageLimitExceeded, match="code_exec"):
        outer.invoke(tool_call("orchestrate", {"expression": "1"}, "c"), config=CONFIG)
    assert credits(backend) == 1  # the outer call was refunded


# -- callbacks still fire ------------------------------------------------------------------------


def test_callbacks_of_the_wrapped_tool_fire(meter: Meter) -> None:
    own, passed = ToolEvents(), ToolEvents()
    original = search.model_copy(update={"callbacks": [own]})
    wrapped = meter.wrap_tool(original, "web_search")
    wrapped.invoke({"query": "q"}, config={**CONFIG, "callbacks": [passed]})
    assert own.events == passed.events == [("start", "search"), ("end", "results for q")]


async def test_callbacks_of_the_wrapped_tool_fire_async(meter: Meter) -> None:
    events = ToolEvents()
    wrapped = meter.wrap_tool(flaky_handled, "web_search")
    await wrapped.ainvoke({"query": "q"}, config={**CONFIG, "callbacks": [events]})
    # A handled ToolException ends the run normally, as it did before wrapping.
    assert events.events == [("start", "flaky_handled"), ("end", "cannot search q")]


def test_callbacks_see_errors(meter: Meter) -> None:
    events = ToolEvents()
    wrapped = meter.wrap_tool(Calculator(), "code_exec")
    with pytest.raises(ZeroDivisionError):
        wrapped.invoke({"expression": "boom"}, config={**CONFIG, "callbacks": [events]})
    assert events.events == [("start", "run_python"), ("error", "ZeroDivisionError")]


# -- the decorator for plain functions ------------------------------------------------------


def test_metered_function_is_billed(meter: Meter, backend: MemoryBackend) -> None:
    @meter.metered("web_search", units=lambda args: len(args["urls"]))
    def fetch_all(urls: list[str], timeout: float = 1.0) -> list[str]:
        """Fetch pages."""
        return [url.upper() for url in urls]

    with meter.customer(CUSTOMER):
        assert fetch_all(["a", "b"]) == ["A", "B"]
    assert credits(backend) == 98
    assert fetch_all.__name__ == "fetch_all"
    assert fetch_all.__doc__ == "Fetch pages."


async def test_metered_coroutine_is_billed(meter: Meter, backend: MemoryBackend) -> None:
    @meter.metered("code_exec")
    async def run_code(source: str) -> int:
        await asyncio.sleep(0)
        return len(source)

    assert inspect.iscoroutinefunction(run_code)
    async with meter.customer(CUSTOMER):
        assert await run_code("print(1)") == 8
    assert credits(backend) == 98


def test_metered_function_failure_is_refunded(meter: Meter, backend: MemoryBackend) -> None:
    @meter.metered("web_search")
    def broken() -> None:
        raise RuntimeError("down")

    with meter.customer(CUSTOMER), pytest.raises(RuntimeError):
        broken()
    assert credits(backend) == 100


async def test_metered_coroutine_failure_is_refunded(meter: Meter, backend: MemoryBackend) -> None:
    @meter.metered("web_search")
    async def broken() -> None:
        raise RuntimeError("down")

    with meter.customer(CUSTOMER), pytest.raises(RuntimeError):
        await broken()
    assert credits(backend) == 100


def test_metered_function_denied_does_not_run(meter: Meter, backend: MemoryBackend) -> None:
    ran: list[int] = []

    @meter.metered("web_search")
    def work() -> None:
        ran.append(1)

    backend.set_balance(CUSTOMER, "credits", 0)
    with meter.customer(CUSTOMER), pytest.raises(UsageLimitExceeded):
        work()
    assert ran == []


async def test_metered_coroutine_denied_does_not_run(meter: Meter, backend: MemoryBackend) -> None:
    ran: list[int] = []

    @meter.metered("web_search")
    async def work() -> None:
        ran.append(1)

    backend.set_balance(CUSTOMER, "credits", 0)
    with meter.customer(CUSTOMER), pytest.raises(UsageLimitExceeded):
        await work()
    assert ran == []


def test_metered_function_needs_a_trusted_customer(meter: Meter, backend: MemoryBackend) -> None:
    @meter.metered("web_search")
    def pay(customer_id: str) -> str:
        return customer_id

    with pytest.raises(AgentMeterError, match=r"meter\.customer"):
        pay(customer_id="cus_victim")  # an argument named customer_id is not trusted
    with meter.customer("cus_payer"):
        assert pay(customer_id="cus_victim") == "cus_victim"
    assert backend.customers() == ["cus_payer"]


def test_metered_function_takes_the_customer_of_the_langchain_run(
    meter: Meter, backend: MemoryBackend
) -> None:
    @meter.metered("web_search")
    def lookup(query: str) -> str:
        return query

    chain = RunnableLambda(lookup)
    assert chain.invoke("q", config={"configurable": {"customer_id": "cus_run"}}) == "q"
    assert credits(backend, "cus_run") == 99


async def test_metered_coroutine_units_from_result(meter: Meter, backend: MemoryBackend) -> None:
    @meter.metered("llm_tokens", units=5000, units_from_result=lambda tokens: tokens)
    async def summarise_text(text: str) -> int:
        return 2000

    async with meter.customer(CUSTOMER):
        assert await summarise_text("abc") == 2000
    assert credits(backend) == pytest.approx(98)


def test_metered_bad_options_are_refused(meter: Meter) -> None:
    with pytest.raises(ConfigError):
        meter.metered("nope")
    with pytest.raises(TypeError):
        meter.metered("web_search", on_denied="message")  # type: ignore[call-arg]  # on purpose


def test_wrap_tool_function_matches_meter_method(meter: Meter) -> None:
    direct = wrap_tool(meter, search, "web_search", 2)
    assert (direct.feature_id, direct.units, direct.meter) == ("web_search", 2, meter)


def test_example_runs_offline() -> None:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    done = subprocess.run(
        [sys.executable, str(root / "examples" / "langchain_tools.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "credits left: 97 of 100" in done.stdout
    assert "code_exec is unavailable: 1 credit left, 2 needed" in done.stdout
