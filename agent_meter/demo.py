"""A scripted, offline agent run on the embedded backend: what ``agent-meter demo`` shows.

A customer with a few credits runs an agent whose steps call paid tools and an LLM. One
tool call fails (and is not billed), tokens are tracked as batch values, and once the
credits run out the calls are denied, visibly. Then a table of usage per feature.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from agent_meter.backends.sqlite import SQLiteBackend
from agent_meter.errors import UsageLimitExceeded
from agent_meter.meter import Meter
from agent_meter.pricing import Pricing
from agent_meter.tokens import TokenUsage

__all__ = ["DEMO_PRICING", "DemoStep", "run_demo"]

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


@dataclass(frozen=True)
class DemoStep:
    """One step of the scripted run and what became of it."""

    action: str
    outcome: str
    credits_left: float


def _search(query: str) -> str:
    return f"3 results for {query!r}"


def _run_code(code: str) -> str:
    namespace: dict[str, object] = {}
    exec(f"result = {code}", {"__builtins__": {"sum": sum, "range": range}}, namespace)  # noqa: S102 - a fixed demo script
    return str(namespace["result"])


def run_demo(
    db_path: Path | None = None, *, credits: float = 6, console: Console | None = None
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
        meter = Meter(backend)
        steps: list[DemoStep] = []

        def left() -> float:
            return float(backend.balances(CUSTOMER)["credits"])

        def tool(feature: str, action: str, work: Callable[[], str]) -> None:
            try:
                with meter.guard(CUSTOMER, feature, call_id=f"step{len(steps)}"):
                    outcome = work()
            except UsageLimitExceeded as denied:
                outcome = f"DENIED: {denied.reason}"
            except Exception as exc:  # noqa: BLE001 - the demo shows that failures are refunded
                outcome = f"failed ({type(exc).__name__}: {exc}); refunded"
            steps.append(DemoStep(action, outcome, left()))

        def llm(tokens: int) -> None:
            usage = TokenUsage(tokens - 200, 200, tokens, model="scripted-model")
            meter.track_tokens(CUSTOMER, usage, call_id=f"llm{len(steps)}")
            steps.append(DemoStep(f"LLM call ({tokens} tokens)", "tracked", left()))

        console.print(
            f"[bold]agent_meter demo[/] - customer {CUSTOMER} starts with {credits} credits"
        )
        llm(1200)
        tool("web_search", "web_search('agent billing')", lambda: _search("agent billing"))
        tool("code_exec", "code_exec('1/0')", lambda: _run_code("1/0"))
        tool("code_exec", "code_exec('sum(range(10))')", lambda: _run_code("sum(range(10))"))
        llm(900)
        tool("web_search", "web_search('pricing pages')", lambda: _search("pricing pages"))
        tool("code_exec", "code_exec('2**10')", lambda: _run_code("2**10"))

        run = Table(title="The agent run")
        for column in ("step", "call", "outcome", "credits left"):
            run.add_column(column)
        for number, step in enumerate(steps, 1):
            style = "red" if step.outcome.startswith("DENIED") else None
            run.add_row(
                str(number), step.action, step.outcome, f"{step.credits_left:g}", style=style
            )
        console.print(run)
        console.print(usage_table(backend, CUSTOMER))
        console.print(f"credits left: [bold]{left():g}[/]")
        backend.close()
    return steps


def usage_table(backend: SQLiteBackend, customer_id: str) -> Table:
    """Usage per feature for one customer: units and credits that stayed billed."""
    units: dict[str, float] = {}
    spent: dict[str, float] = {}
    for event in backend.events(customer_id):
        units[event.feature_id] = units.get(event.feature_id, 0) + event.value
        spent[event.feature_id] = spent.get(event.feature_id, 0) - event.applied
    table = Table(title=f"Usage of {customer_id}")
    for column in ("feature", "units billed", "credits"):
        table.add_column(column)
    for feature in sorted(units):
        table.add_row(feature, f"{units[feature]:g}", f"{spent[feature]:g}")
    return table
