"""Every example is a small complete program that runs offline and says what it shows.

Each ``examples/*.py`` runs as a subprocess of this interpreter from the repository root,
with this checkout on ``PYTHONPATH``, its outbox in a temporary file and no API keys: those
that need a key must explain themselves and exit 0.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# A line each example must print: a number it computed, so a run that bills wrongly fails.
EXPECTED = {
    "agent_middleware.py": "cus_free: 100 - 1 (search) - 1.4 (1,400 tokens) = 97.6",
    "autumn_backend.py": "AUTUMN_SECRET_KEY is not set",
    "langchain_tools.py": "credits left: 97 of 100",
    "mcp_server.py": "cus_acme: 100 - 1 (search) - 2 (run_python) = 97 credits",
    "openai_tools.py": "credits left for cus_demo: 96.335",
    "token_budget.py": "second run refused: llm_tokens is unavailable: 0.6 credits left",
    "usage_report.py": "cus_acme spent 10 credits on 5 calls (1 refunded); balance 90",
}
KEYS = ("AUTUMN_SECRET_KEY", "OPENAI_API_KEY")


def run_example(path: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name not in KEYS}
    env["PYTHONPATH"] = str(ROOT)
    env["AGENT_METER_OUTBOX"] = str(tmp_path / "outbox.db")
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    return subprocess.run(
        [sys.executable, str(path), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_every_example_is_checked() -> None:
    assert {path.name for path in EXAMPLES} == set(EXPECTED)


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_says_what_it_shows_and_how_to_run_it(path: Path) -> None:
    docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert docstring, f"{path.name} needs a module docstring"
    assert len(docstring.splitlines()) >= 3, f"{path.name}: say what it shows"
    assert f"python examples/{path.name}" in docstring, f"{path.name}: say how to run it"


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs_offline(path: Path, tmp_path: Path) -> None:
    done = run_example(path, tmp_path)
    assert done.returncode == 0, f"{path.name} exited {done.returncode}:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert EXPECTED[path.name] in done.stdout, done.stdout


def test_usage_report_example_keeps_a_ledger_the_cli_reads(tmp_path: Path) -> None:
    db = tmp_path / "usage.db"
    done = run_example(ROOT / "examples" / "usage_report.py", tmp_path, str(db))
    assert done.returncode == 0, done.stderr
    assert db.is_file()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent_meter.cli",
            "--db",
            str(db),
            "balance",
            "cus_initech",
            "--json",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode == 0, cli.stderr
    # 3 credits - 2 for the one code run billed; the second was refused
    assert json.loads(cli.stdout)["balances"]["credits"] == 1
