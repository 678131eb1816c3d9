"""``agent-meter demo``: the scripted run bills what succeeded and shows the denial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rich.console import Console

from agent_meter import SQLiteBackend
from agent_meter.demo import CUSTOMER, run_demo


def test_demo_bills_successes_refunds_failures_and_denies_at_zero(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    console = Console(record=True, width=120)
    steps = run_demo(db, credits=6, console=console)
    outcomes = [step.outcome for step in steps]
    assert any("refunded" in outcome for outcome in outcomes)
    assert sum(outcome.startswith("DENIED") for outcome in outcomes) == 2
    backend = SQLiteBackend(db)
    # 6 - 1.2 (tokens) - 1 (search) - 2 (code) - 0.9 (tokens); the failed run is refunded
    assert backend.balances(CUSTOMER)["credits"] == 0.9
    backend.close()
    text = console.export_text()
    assert "web_search is unavailable: 0.9 credits left, 1 needed" in text


def test_demo_runs_from_the_console_script() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent_meter.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "DENIED" in done.stdout
    assert "credits left: 0.9" in done.stdout
