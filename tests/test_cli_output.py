"""The command line's output, piped: never wrapped or cut, whatever the paths and COLUMNS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent_meter import Pricing, SQLiteBackend
from agent_meter.cli import cli
from agent_meter.engine import TrackRequest
from agent_meter.pricing import example_toml
from agent_meter.report import usage_report

ROOT = Path(__file__).resolve().parents[1]
LENGTHS = [40, 120, 200, 300]
BOX = "┃┡│├└"


def long_relative_path(length: int, name: str) -> Path:
    """A relative path of exactly ``length`` characters ending in ``name``."""
    room = length - len(name) - 1
    parts = []
    while room > 0:
        size = min(room, 100)  # folder names stay under the file system's limit
        parts.append("d" * (size - 1) if size > 1 else "d")
        room -= len(parts[-1]) + 1
    path = Path(*parts, name) if parts else Path(name)
    path = Path(str(path).rjust(length, "p")) if len(str(path)) < length else path
    assert len(str(path)) == length, (len(str(path)), length)
    return path


def piped_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def invoke(monkeypatch: pytest.MonkeyPatch, *args: str) -> Result:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def assert_table_intact(text: str, *whole: str) -> None:
    """Every border and row of each table is one line of one width; each text is whole."""
    tables: list[list[str]] = []
    for line in text.splitlines():
        if line[:1] in "┏┌":
            tables.append([])
        if line[:1] in BOX + "┏┌":
            tables[-1].append(line)
    assert tables, text
    for table in tables:
        assert table[-1][:1] == "└", text  # nothing after the last row was cut off
        assert len({len(line) for line in table}) == 1, text
    for part in whole:
        assert any(part in line for line in text.splitlines()), (part, text)


@pytest.mark.parametrize("length", LENGTHS)
def test_pricing_check_piped_is_never_wrapped(tmp_path: Path, length: int) -> None:
    relative = long_relative_path(length, "pricing.toml")
    (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / relative).write_text(example_toml())
    done = subprocess.run(
        [sys.executable, "-m", "agent_meter.cli", "pricing", "check", str(relative)],
        cwd=tmp_path,
        env=piped_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"{relative}: ok (4 features, 1 credit system, 1 plan)"
    assert lines[0].strip() == f"Features in {relative}"
    assert "\x1b[" not in done.stdout  # no colour codes in a pipe
    assert_table_intact(done.stdout, "0.001 credits per unit", "1 credit per unit")


@pytest.mark.parametrize("length", LENGTHS)
def test_report_events_and_balance_piped_are_never_wrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pricing: Pricing, length: int
) -> None:
    db = tmp_path / long_relative_path(length, "usage.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    customer = ("cus_" + "c" * length)[:256]  # the longest a customer id may be
    call = "call_" + "k" * (length - 5)
    backend = SQLiteBackend(db, pricing=pricing)
    backend.track(TrackRequest(customer, "llm_tokens", 1830, call))
    backend.track(TrackRequest("cus_short", "web_search", 1, "k1"))
    backend.close()

    report = invoke(monkeypatch, "--db", str(db), "report").stdout
    assert_table_intact(report, customer, "1.83 credits", "1 credit ")
    events = invoke(monkeypatch, "--db", str(db), "events", customer).stdout
    assert_table_intact(events, call, f"Events of {customer} (1)")
    balance = invoke(monkeypatch, "--db", str(db), "balance", customer).stdout
    assert_table_intact(balance, f"Balances of {customer}", "credit system: code_exec")


def test_ids_are_shown_as_written_never_read_as_markup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pricing: Pricing
) -> None:
    db = tmp_path / "usage.db"
    backend = SQLiteBackend(db, pricing=pricing)
    backend.track(TrackRequest("cus_[bold]x[/bold]", "web_search", 1, "[red]k"))
    backend.close()
    report = invoke(monkeypatch, "--db", str(db), "report").stdout
    assert "cus_[bold]x[/bold]" in report
    events = invoke(monkeypatch, "--db", str(db), "events", "cus_[bold]x[/bold]").stdout
    assert "[red]k" in events


# -- pricing check --json and init ----------------------------------------------------------


def test_pricing_check_json(monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(ROOT / "examples" / "pricing.toml")
    data = json.loads(invoke(monkeypatch, "pricing", "check", path, "--json").stdout)
    assert data["file"] == path
    assert data["ok"] is True
    assert data["pricing"]["features"]["premium"] == "boolean"
    assert data["pricing"]["credit_systems"]["credits"]["llm_tokens"] == 0.001
    assert Pricing.model_validate(data["pricing"]) == Pricing.from_file(path)


def test_init_writes_a_commented_pricing_that_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = invoke(monkeypatch, "init")
    assert "wrote pricing.toml" in result.stdout
    text = (tmp_path / "pricing.toml").read_text()
    assert text.count("\n#") >= 5  # commented for a newcomer
    assert Pricing.from_file(tmp_path / "pricing.toml") == Pricing.example()
    again = CliRunner().invoke(cli, ["init"])
    assert again.exit_code == 1
    assert "pricing.toml exists; pass --force" in again.stderr
    invoke(monkeypatch, "init", "--force")


# -- reports as text and JSON ---------------------------------------------------------------


def test_print_of_a_report_table_prints_the_table(
    tmp_path: Path, pricing: Pricing, capsys: pytest.CaptureFixture[str]
) -> None:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
    backend.track(TrackRequest("cus_1", "web_search", 1, "k1"))
    backend.track(TrackRequest("cus_1", "llm_tokens", 2000, "k2"))
    report = usage_report(backend)
    backend.close()
    print(report.table())
    printed = capsys.readouterr().out
    assert "rich.table.Table object" not in printed
    assert "Usage per customer and feature" in printed
    assert_table_intact(printed, "cus_1", "1 credit ", "2 credits", "3 credits")
    assert str(report) == printed.rstrip("\n")


def test_report_json_totals_never_mix_units_with_numbers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pricing: Pricing
) -> None:
    db = tmp_path / "usage.db"
    backend = SQLiteBackend(db, pricing=pricing)
    backend.track(TrackRequest("cus_one_feature", "web_search", 2, "k1"))
    backend.track(TrackRequest("cus_two_features", "web_search", 1, "k2"))
    backend.track(TrackRequest("cus_two_features", "code_exec", 1, "k3"))
    backend.close()
    data = json.loads(invoke(monkeypatch, "--db", str(db), "report", "--json").stdout)
    assert all(isinstance(row["units"], float) for row in data["rows"])
    for total in data["customers"].values():
        assert "units" not in total  # units of different features do not add up
    assert data["customers"]["cus_one_feature"]["credits"] == 2
    assert data["customers"]["cus_two_features"]["credits"] == 3
