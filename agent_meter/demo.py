"""A scripted, offline agent run on the embedded backend: what ``agent-meter demo`` shows.

A customer with a few credits runs an agent: a scripted chat model (no network) whose
tokens are metered by the callback handler, and LangChain tools wrapped by the meter.
One tool call fails and is refunded, one is denied when the credits run out (the model
reads why), and a second customer with no credits is stopped before the model is called.
Then a table of usage per feature and the handler's token summary.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent_meter.extras import require

require("langchain", "langchain_core", integration="agent-meter demo")

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from rich.console import Console
from rich.table import Table

from agent_meter.backends.sqlite import SQLiteBackend
from agent_meter.errors import UsageLimitExceeded
from agent_meter.meter import Meter
from agent_meter.pricing import Pricing
from agent_meter.report import usage_report

__all__ = ["BROKE_CUSTOMER", "CUSTOMER", "DEMO_PRICING", "DemoStep", "run_demo"]

DEMO_PRICING = """\
[features]
web_search = "metered"
code_exec = "metered"
llm_tokens = "metered"
premium = "boolean"

[credit_systems.credits]
web_search = 1
code_exec = 2
llm_tokens = 0.001

[plans.agent_free]
auto_enable = true
interval = "month"
grants = { credits = 100, premium = true }
"""

CUSTOMER = "cus_demo"
BROKE_CUSTOMER = "cus_no_credits"
MODEL = "scripted-model"


@dataclass(frozen=True)
class DemoStep:
    """One step of the scripted run and what became of it."""

    action: str
    outcome: str
    credits_left: float


@tool
def web_search(query: str) -> str:
    """Search the web for a query."""
    return f"3 results for {query!r}"


@tool
def run_python(expression: str) -> str:
    """Evaluate a small Python expression (sum and range are available)."""
    allowed = {"__builtins__": {"sum": sum, "range": range}}
    return str(eval(expression, allowed, {}))  # noqa: S307 - the demo's scripted inputs only


def _reply(tokens: int, text: str = "", *calls: tuple[str, str, dict[str, Any]]) -> AIMessage:
    return AIMessage(
        content=text,
        tool_calls=[{"name": name, "id": call_id, "args": args} for name, call_id, args in calls],
        usage_metadata={
            "input_tokens": tokens - 100,
            "output_tokens": 100,
            "total_tokens": tokens,
        },
        response_metadata={"model_name": MODEL},
    )


def _script(run: str) -> Iterator[AIMessage]:
    # Tool call ids are unique per run, as a provider's are: a call id is billed once.
    yield _reply(1200, "", ("web_search", f"{run}_1", {"query": "agent billing"}))
    yield _reply(900, "", ("run_python", f"{run}_2", {"expression": "1/0"}))
    yield _reply(600, "", ("run_python", f"{run}_3", {"expression": "sum(range(10))"}))
    yield _reply(500, "", ("web_search", f"{run}_4", {"query": "pricing pages"}))
    yield _reply(400, "0+1+...+9 = 45. I could not search for pricing pages: no credits left.")


def _agent_loop(
    model: GenericFakeChatModel,
    tools: Mapping[str, BaseTool],
    config: RunnableConfig,
    record: Any,
) -> None:
    """The smallest agent: call the model, run the tool calls it asks for, repeat."""
    messages: list[BaseMessage] = [HumanMessage("Find pricing pages and add up 0..9")]
    while True:
        try:
            reply = model.invoke(messages, config=config)
        except UsageLimitExceeded as denied:
            record("LLM call", f"DENIED before the model was called: {denied.reason}")
            return
        assert isinstance(reply, AIMessage)  # noqa: S101 - the scripted model answers so
        messages.append(reply)
        record(f"LLM call ({reply.usage_metadata['total_tokens']} tokens)", "tracked")  # type: ignore[index]
        if not reply.tool_calls:
            record("final answer", str(reply.content))
            return
        for call in reply.tool_calls:
            try:
                result = tools[call["name"]].invoke({**call, "type": "tool_call"}, config=config)
            except Exception as exc:  # noqa: BLE001 - what a ToolNode does: tell the model
                result = ToolMessage(
                    f"{type(exc).__name__}: {exc}", tool_call_id=call["id"], status="error"
                )
            assert isinstance(result, ToolMessage)  # noqa: S101 - invoked with a tool call
            args = ", ".join(f"{value!r}" for value in call["args"].values())
            outcome = str(result.content)
            if result.status == "error":
                outcome = f"{outcome} (not billed)"
            messages.append(result)
            record(f"{call['name']}({args})", outcome)


def run_demo(
    db_path: Path | None = None, *, credits: float = 7, console: Console | None = None
) -> list[DemoStep]:
    """Run the scripted agent and print what happened.

    Args:
        db_path: The ledger file; a temporary one when omitted.
        credits: What the customer starts with.
        console: Where to print (a default rich console when omitted).

    Returns:
        The steps, for tests.
    """
    console = console or Console()
    with tempfile.TemporaryDirectory() as tmp:
        path = db_path or Path(tmp) / "demo.db"
        pricing_path = Path(tmp) / "pricing.toml"
        pricing_path.write_text(DEMO_PRICING)
        backend = SQLiteBackend(path, pricing=Pricing.from_file(pricing_path))
        backend.set_balance(CUSTOMER, "credits", credits)
        backend.set_balance(BROKE_CUSTOMER, "credits", 0)
        meter = Meter(backend)
        tools = {
            t.name: t
            for t in meter.wrap_tools(
                [web_search, run_python],
                features={"web_search": "web_search", "run_python": "code_exec"},
            )
        }
        handler = meter.callback_handler(feature_id="llm_tokens")
        steps: list[DemoStep] = []

        def record(action: str, outcome: str) -> None:
            left = float(backend.balances(CUSTOMER)["credits"])
            steps.append(DemoStep(action, outcome, left))

        console.print(
            f"[bold]agent_meter demo[/] - customer {CUSTOMER} starts with {credits:g} credits "
            "(web_search 1, code_exec 2, 1,000 tokens 1)"
        )
        who = {"customer_id": CUSTOMER}
        config: RunnableConfig = {"configurable": who, "metadata": who, "callbacks": [handler]}
        run_id = f"call_{uuid.uuid4().hex[:8]}"
        _agent_loop(GenericFakeChatModel(messages=_script(run_id)), tools, config, record)

        broke = {"customer_id": BROKE_CUSTOMER}
        stopped = GenericFakeChatModel(messages=iter([_reply(100, "never sent")]))
        quiet = logging.getLogger("langchain_core.callbacks.manager")
        level, quiet.level = quiet.level, logging.ERROR  # it logs the refusal we print below
        try:
            stopped.invoke("hello", config={"metadata": broke, "callbacks": [handler]})
        except UsageLimitExceeded as denied:
            outcome = f"DENIED before the model was called: {denied.reason}"
        else:  # pragma: no cover - the gate must stop it
            outcome = "the model was called"
        finally:
            quiet.setLevel(level)

        run = Table(title=f"The agent run of {CUSTOMER}")
        for column in ("step", "call", "outcome", "credits left"):
            run.add_column(column)
        for number, step in enumerate(steps, 1):
            style = "red" if "unavailable" in step.outcome else None  # a denial
            run.add_row(
                str(number), step.action, step.outcome, f"{step.credits_left:g}", style=style
            )
        console.print(run)
        console.print(usage_report(backend, [CUSTOMER]).table(f"Usage of {CUSTOMER}"))
        console.print(str(handler.summary))
        console.print(f"{BROKE_CUSTOMER} (0 credits) starts a run: {outcome}")
        console.print(f"credits left: [bold]{backend.balances(CUSTOMER)['credits']:g}[/]")
        meter.close()
    return steps
