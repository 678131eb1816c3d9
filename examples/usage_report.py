"""What did each customer spend, on what? Usage reports from the embedded ledger.

What it shows:
- three customers use paid tools through ``meter.guard`` and LLM tokens through
  ``meter.track_tokens``: calls that succeed stay billed, a failing call is refunded, and a
  customer who runs out is refused;
- ``agent_meter.report.usage_report(backend)`` folds the ledger into one row per customer
  and feature (units, credits, calls billed and refunded), printed as a rich table;
- ``report.to_dict()`` gives the same numbers as plain data (what ``--json`` prints);
- the command line reads the same ledger: ``agent-meter --db PATH report`` (and
  ``balance CUSTOMER``, ``events CUSTOMER``).

Run it offline, from the repository root::

    python examples/usage_report.py              # a ledger in a temporary directory
    python examples/usage_report.py usage.db     # keep the ledger, then try:
    agent-meter --db usage.db report
    agent-meter --db usage.db events cus_acme
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

from rich.console import Console

from agent_meter import Meter, Pricing, SQLiteBackend, TokenUsage, UsageLimitExceeded
from agent_meter.report import usage_report

PRICING = Path(__file__).with_name("pricing.toml")  # web_search 1, code_exec 2, tokens 0.001


def use(meter: Meter, customer: str, feature: str, *, fail: bool = False) -> str:
    """One guarded tool call; returns what became of it."""
    try:
        with meter.guard(customer, feature, call_id=uuid.uuid4().hex):
            if fail:
                raise RuntimeError("the tool crashed")
    except UsageLimitExceeded as denied:
        return f"denied ({denied.reason})"
    except RuntimeError:
        return "failed, refunded"
    return "billed"


def run(db_path: Path) -> None:
    backend = SQLiteBackend(db_path, pricing=Pricing.from_file(PRICING))
    with Meter(backend) as meter:
        # cus_acme: on the free plan (100 credits); searches, runs code, one crash.
        for _ in range(3):
            use(meter, "cus_acme", "web_search")
        use(meter, "cus_acme", "code_exec")
        use(meter, "cus_acme", "code_exec", fail=True)
        usage = TokenUsage(4200, 800, 5000, model="gpt-4o-mini")
        meter.track_tokens("cus_acme", usage, call_id=uuid.uuid4().hex)

        # cus_globex: mostly tokens.
        for tokens in (1200, 3400, 2600):
            usage = TokenUsage(tokens - 300, 300, tokens, model="gpt-4o")
            meter.track_tokens("cus_globex", usage, call_id=uuid.uuid4().hex)
        use(meter, "cus_globex", "web_search")

        # cus_initech: 3 credits; the second code run is refused.
        backend.set_balance("cus_initech", "credits", 3)
        outcomes = [use(meter, "cus_initech", "code_exec") for _ in range(2)]
        print("cus_initech's code runs:", "; ".join(outcomes))

        report = usage_report(backend)
        Console().print(report.table())
        acme = report.total("cus_acme")
        print(
            f"cus_acme spent {acme.credits:g} credits on {acme.billed} calls "
            f"({acme.refunded} refunded); balance {backend.balances('cus_acme')['credits']:g}"
        )
        print("as JSON (agent-meter report --json):")
        print(json.dumps(report.to_dict()["customers"]["cus_initech"], indent=2))


def main() -> int:
    if len(sys.argv) > 1:
        db_path = Path(sys.argv[1])
        run(db_path)
        print(f"\nThe ledger is in {db_path}; try: agent-meter --db {db_path} report")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        run(Path(tmp) / "usage.db")
    return 0


if __name__ == "__main__":
    sys.exit(main())
