"""``agent-meter demo``: the scripted run bills what succeeded and shows the denials."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

from agent_meter import SQLiteBackend
from agent_meter.demo import BROKE_CUSTOMER, CUSTOMER, run_demo


def test_demo_bills_successes_refunds_failures_and_denies_at_zero(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    console = Console(record=True, width=200)
    steps = run_demo(db, credits=7, console=console)
    outcomes = [step.outcome for step in steps]
    assert "ZeroDivisionError: division by zero (not billed)" in outcomes
    assert "web_search is unavailable: 0.8 credits left, 1 needed (not billed)" in outcomes
    backend = SQLiteBackend(db)
    # 7 - 3.6 (3,600 tokens) - 1 (one search) - 2 (one code run); the failed run is refunded
    assert backend.balances(CUSTOMER)["credits"] == 0.4
    # each LLM call: its reservation and its settlement, keyed by the run
    per_call: dict[str, float] = {}
    for event in backend.events(CUSTOMER, feature_id="llm_tokens"):
        call = (event.idempotency_key or "").rsplit(":", 1)[0]
        per_call[call] = per_call.get(call, 0.0) + event.value
    assert list(per_call.values()) == [1200, 900, 600, 500, 400]
    # stopped before any usage; the refusal is kept for reports
    assert [e.kind for e in backend.events(BROKE_CUSTOMER)] == ["denied"]
    assert [e.feature_id for e in backend.events(CUSTOMER) if e.kind == "denied"] == ["web_search"]
    backend.close()
    text = console.export_text()
    assert "DENIED before the model was called" in text
    assert "credits left: 0.4" in text


def test_demo_runs_from_the_console_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent_meter.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "unavailable" in done.stdout
    assert "credits left: 0.4" in done.stdout
