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
from rich.text import Text

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


def _fresh_customers(known: list[str]) -> tuple[str, str]:
    """The first pair of demo customer ids this ledger has never seen."""
    taken = set(known)
    number = 1
    while True:
        suffix = "" if number == 1 else f"_{number}"
        pair = (CUSTOMER + suffix, BROKE_CUSTOMER + suffix)
        if not taken & set(pair):
            return pair
        number += 1


def run_demo(
    db_path: Path | None = None, *, credits: float = 7, console: Console | None = None
) -> list[DemoStep]:
    """Run the scripted agent and print what happened.

    Each run has customers of its own: on a ledger that holds an earlier run, they are
    ``cus_demo_2`` and ``cus_no_credits_2`` (then ``_3``...), so runs never mix.

    Args:
        db_path: The ledger file; a temporary one when omitted. An existing file must be
            a ledger with the demo's pricing: any other file is refused, never written.
        credits: What the customer starts with.
        console: Where to print (a default rich console when omitted).

    Returns:
        The steps, for tests.

    Raises:
        ConfigError: ``db_path`` is not an agent_meter ledger, or bills by another pricing.
    """
    console = console or Console()
    with tempfile.TemporaryDirectory() as tmp:
        path = db_path or Path(tmp) / "demo.db"
        backend = SQLiteBackend(path, pricing=Pricing.from_toml(DEMO_PRICING, source="demo"))
        customer, broke_customer = _fresh_customers(backend.customers())
        if customer != CUSTOMER:
            console.print(
                f"{path} holds earlier demo runs; this run's customers are {customer} "
                f"and {broke_customer}",
                markup=False,
                highlight=False,
            )
        backend.set_balance(customer, "credits", credits)
        backend.set_balance(broke_customer, "credits", 0)
        meter = Meter(backend)
        tools = {
            t.name: t
            for t in meter.wrap_tools(
                [web_search, run_python],
                features={"web_search": "web_search", "run_python": "code_exec"},
            )
        }
        # Each model call reserves its prompt plus a completion budget before it starts
        # (the scripted replies write 100 tokens; no max_tokens is set, so the default
        # budget is given) and is settled to the tokens its reply reports.
        handler = meter.callback_handler(feature_id="llm_tokens", default_max_tokens=200)
        steps: list[DemoStep] = []

        def record(action: str, outcome: str) -> None:
            left = float(backend.balances(customer)["credits"])
            steps.append(DemoStep(action, outcome, left))

        console.print(
            f"[bold]agent_meter demo[/] - customer {customer} starts with {credits:g} credits "
            "(web_search 1, code_exec 2, 1,000 tokens 1)"
        )
        who = {"customer_id": customer}
        config: RunnableConfig = {"configurable": who, "metadata": who, "callbacks": [handler]}
        run_id = f"call_{uuid.uuid4().hex[:8]}"
        _agent_loop(GenericFakeChatModel(messages=_script(run_id)), tools, config, record)

        broke = {"customer_id": broke_customer}
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

        run = Table(title=f"The agent run of {customer}")
        for column in ("step", "call", "outcome", "credits left"):
            run.add_column(column)
        for number, step in enumerate(steps, 1):
            style = "red" if "unavailable" in step.outcome else None  # a denial
            run.add_row(
                str(number),
                Text(step.action),
                Text(step.outcome),
                f"{step.credits_left:g}",
                style=style,
            )
        console.print(run)
        console.print(usage_report(backend, [customer]).table(f"Usage of {customer}"))
        console.print(handler.summary.table())
        console.print(f"{broke_customer} (0 credits) starts a run: {outcome}")
        console.print(f"credits left: [bold]{backend.balances(customer)['credits']:g}[/]")
        meter.close()
    return steps
