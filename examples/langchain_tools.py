"""Metering LangChain tools: every call checked, only successes billed.

What it shows, offline (no API key, no network; a scripted chat model stands in for an LLM):

1. ``meter.wrap_tools`` puts a billing guard on an agent's tools without changing what the
   model sees (the OpenAI tool schema is identical).
2. A ``create_agent`` run for customer ``cus_demo``, whose id comes from the run's config,
   never from the model: search costs 1 credit, code execution 2.
3. A failing tool is refunded; a denial (too few credits) does not run the tool and reaches
   the model as an error ToolMessage it can explain to the user.
4. ``@meter.metered`` on a plain function, inside ``meter.customer(...)``.

Run it from the repository root:

    python examples/langchain_tools.py

The ledger is a SQLite file in a temporary directory, deleted at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import ToolException, tool
from langchain_core.utils.function_calling import convert_to_openai_tool

from agent_meter import Meter, Pricing, SQLiteBackend, UsageLimitExceeded
from agent_meter.pricing import Plan

PRICING = Pricing(
    features={
        "web_search": "metered",
        "code_exec": "metered",
        "llm_tokens": "metered",
        "premium": "boolean",
    },
    credit_systems={"credits": {"web_search": 1, "code_exec": 2, "llm_tokens": 0.001}},
    plans={"agent_free": Plan(auto_enable=True, grants={"credits": 100, "premium": True})},
)


@tool
def search(query: str) -> str:
    """Search the web."""
    return f"3 results for {query!r}"


@tool
def run_python(code: str) -> str:
    """Run a Python expression."""
    if "import" in code:
        msg = "imports are not allowed"
        raise ToolException(msg)
    return str(len(code))


run_python.handle_tool_error = True  # the model reads the error text; we must not bill it


class ScriptedModel(BaseChatModel):
    """Answers from a script: stands in for a real chat model so the demo runs offline."""

    script: list[AIMessage]
    turn: int = 0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        message = self.script[self.turn]
        self.turn += 1
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedModel:
        """A scripted model already knows its tool calls."""
        return self


def call(name: str, call_id: str, **args: Any) -> dict[str, Any]:
    return {"type": "tool_call", "name": name, "args": args, "id": call_id}


def show_results(messages: list[BaseMessage]) -> None:
    for message in messages:
        if isinstance(message, ToolMessage):
            print(f"   {message.name:<10} {message.status:<7} {message.content}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "usage.db", pricing=PRICING)
        meter = Meter(backend)
        tools = meter.wrap_tools(
            [search, run_python], features={"search": "web_search", "run_python": "code_exec"}
        )
        same = convert_to_openai_tool(tools[0]) == convert_to_openai_tool(search)
        print(f"1. wrapped {[t.name for t in tools]}; the model sees the same schema: {same}")

        config: RunnableConfig = {"configurable": {"customer_id": "cus_demo"}}
        model = ScriptedModel(
            script=[
                AIMessage(
                    content="",
                    tool_calls=[
                        call("search", "call_1", query="billing guards"),
                        call("run_python", "call_2", code="1 + 1"),
                        call("run_python", "call_3", code="import os"),
                    ],
                ),
                AIMessage(content="Found 3 results; 1 + 1 has 5 characters."),
            ]
        )
        result = create_agent(model, tools).invoke(
            {"messages": [("user", "search, then compute")]}, config=config
        )
        print("2. agent run for cus_demo (search 1 credit, code 2, the failing call free):")
        show_results(result["messages"])
        print(f"   final answer: {result['messages'][-1].content}")
        print(f"   credits left: {backend.balances('cus_demo')['credits']:g} of 100")

        backend.set_balance("cus_demo", "credits", 1)
        model = ScriptedModel(
            script=[
                AIMessage(content="", tool_calls=[call("run_python", "call_4", code="2 * 21")]),
                AIMessage(content="Sorry, you are out of credits for running code."),
            ]
        )
        result = create_agent(model, tools).invoke(
            {"messages": [("user", "compute 2 * 21")]}, config=config
        )
        print("3. with 1 credit left, code execution (2 credits) is refused, not run:")
        show_results(result["messages"])
        print(f"   final answer: {result['messages'][-1].content}")

        @meter.metered("web_search", units=lambda args: len(args["urls"]))
        def fetch_all(urls: list[str]) -> list[str]:
            return [f"<html of {url}>" for url in urls]

        with meter.customer("cus_script"):
            pages = fetch_all(["https://a.example", "https://b.example"])
            try:
                fetch_all(["https://c.example"] * 200)
            except UsageLimitExceeded as denied:
                refusal = denied.reason
        left = backend.balances("cus_script")["credits"]
        print(f"4. @meter.metered: fetched {len(pages)} pages, {left:g} credits left")
        print(f"   200 more were refused: {refusal}")
        backend.close()


if __name__ == "__main__":
    main()
