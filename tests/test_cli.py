"""The ``agent-meter`` command line, through its entry points (click's runner and a process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from agent_meter import SQLiteBackend
from agent_meter.cli import cli, main
from agent_meter.demo import CUSTOMER
from agent_meter.engine import TrackRequest
from agent_meter.errors import CustomerNotFound

ROOT = Path(__file__).resolve().parents[1]


def stored(db: Path) -> SQLiteBackend:
    """The ledger as the tests read it (closed by the caller)."""
    return SQLiteBackend(db)


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=True)


def assert_one_line_error(result: Result, *fragments: str, code: int = 1) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ledger written by ``agent-meter demo --db``: cus_demo ends with 0.4 credits."""
    db = tmp_path_factory.mktemp("demo") / "demo.db"
    result = invoke("demo", "--db", str(db))
    assert result.exit_code == 0, result.output
    assert "credits left: 0.4" in result.stdout
    return db


# -- demo -------------------------------------------------------------------------------


def test_demo_writes_to_the_group_db_given_on_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "here.db"
    result = invoke("--db", str(db), "demo", "--credits", "3")
    assert result.exit_code == 0, result.output
    # 3 - 1.2 (tokens) - 1 (search), 900 tokens capped at 0, code refused, then the
    # next LLM call is stopped by the gate (and so is the customer with no credits)
    ledger = stored(db)
    assert ledger.balances(CUSTOMER)["credits"] == 0
    ledger.close()
    assert result.stdout.count("DENIED") == 2


def test_demo_never_writes_into_the_ledger_named_by_the_environment(tmp_path: Path) -> None:
    real = tmp_path / "production.db"
    result = invoke("demo", env={"AGENT_METER_DB": str(real)})
    assert result.exit_code == 0, result.output
    assert not real.exists()


# -- balance ----------------------------------------------------------------------------


def test_balance_shows_what_is_left(demo_db: Path) -> None:
    result = invoke("--db", str(demo_db), "balance", CUSTOMER)
    assert result.exit_code == 0, result.output
    assert "credits" in result.stdout
    assert "0.4" in result.stdout
    as_json = invoke("balance", CUSTOMER, "--db", str(demo_db), "--json")
    assert json.loads(as_json.stdout) == {
        "customer_id": CUSTOMER,
        "balances": {"credits": 0.4, "premium": True},
    }


def test_balance_of_an_unknown_customer_is_one_line(demo_db: Path) -> None:
    result = invoke("--db", str(demo_db), "balance", "cus_nobody")
    assert_one_line_error(result, "unknown customer 'cus_nobody'")
    ledger = stored(demo_db)
    assert "cus_nobody" not in ledger.customers()  # nothing was created
    ledger.close()


def test_environment_variable_names_the_ledger(demo_db: Path) -> None:
    result = invoke("balance", CUSTOMER, "--json", env={"AGENT_METER_DB": str(demo_db)})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["balances"]["credits"] == 0.4


# -- events -----------------------------------------------------------------------------


def test_events_lists_the_ledger_lines_with_their_role(demo_db: Path) -> None:
    result = invoke("--db", str(demo_db), "events", CUSTOMER, "--json")
    assert result.exit_code == 0, result.output
    events = json.loads(result.stdout)
    llm_call = [("llm_tokens", "reserve"), ("llm_tokens", "adjust")]  # reserved, settled
    assert [(e["feature_id"], e["role"]) for e in events] == [
        *llm_call,
        ("web_search", "reserve"),
        *llm_call,
        ("code_exec", "reserve"),
        ("code_exec", "refund"),
        *llm_call,
        ("code_exec", "reserve"),
        *llm_call,
        ("web_search", "denied"),
        *llm_call,
    ]
    table = invoke("--db", str(demo_db), "events", CUSTOMER, "--feature", "code_exec")
    assert table.exit_code == 0, table.output
    assert "Events of cus_demo (3)" in table.stdout
    assert "refund" in table.stdout
    last = invoke("--db", str(demo_db), "events", CUSTOMER, "--limit", "2", "--json")
    assert sum(e["value"] for e in json.loads(last.stdout)) == 400  # the last LLM call


def test_events_since_a_time(demo_db: Path) -> None:
    future = invoke("--db", str(demo_db), "events", CUSTOMER, "--since", "2999-01-01", "--json")
    assert json.loads(future.stdout) == []
    recent = invoke("--db", str(demo_db), "events", CUSTOMER, "--since", "1d", "--json")
    assert len(json.loads(recent.stdout)) == 15


def test_events_refuse_a_bad_since_an_unknown_feature_and_customer(demo_db: Path) -> None:
    bad = invoke("--db", str(demo_db), "events", CUSTOMER, "--since", "yesterday")
    assert bad.exit_code == 2
    assert "--since" in bad.stderr
    feature = invoke("--db", str(demo_db), "events", CUSTOMER, "--feature", "teleport")
    assert_one_line_error(feature, "unknown feature 'teleport'")
    customer = invoke("--db", str(demo_db), "events", "cus_nobody")
    assert_one_line_error(customer, "unknown customer 'cus_nobody'")


# -- report -----------------------------------------------------------------------------


def test_report_table_and_json(demo_db: Path) -> None:
    result = invoke("--db", str(demo_db), "report")
    assert result.exit_code == 0, result.output
    assert "Usage per customer and feature" in result.stdout
    assert "6.6 credits" in result.stdout  # 7 - 0.4 left
    data = json.loads(invoke("report", "--db", str(demo_db), "--json").stdout)
    total = data["customers"][CUSTOMER]
    assert (total["credits"], total["billed"], total["refunded"]) == (6.6, 7, 1)
    assert total["denied"] == 1
    rows = {row["feature_id"]: row for row in data["rows"] if row["customer_id"] == CUSTOMER}
    assert rows["llm_tokens"]["units"] == 3600
    assert rows["code_exec"]["billed"] == 1


def test_report_filters(demo_db: Path) -> None:
    only = json.loads(
        invoke(
            "--db",
            str(demo_db),
            "report",
            "--customer",
            CUSTOMER,
            "--feature",
            "web_search",
            "--json",
        ).stdout
    )
    assert [row["feature_id"] for row in only["rows"]] == ["web_search"]
    empty = invoke("--db", str(demo_db), "report", "--since", "2999-01-01")
    assert empty.exit_code == 0
    assert "no usage recorded in that period" in empty.stdout
    unknown = invoke("--db", str(demo_db), "report", "--customer", "cus_nobody")
    assert_one_line_error(unknown, "unknown customer 'cus_nobody'")


def test_report_over_many_customers(tmp_path: Path, pricing) -> None:
    backend = SQLiteBackend(tmp_path / "many.db", pricing=pricing)
    for n in range(60):
        backend.track(TrackRequest(f"cus_{n:02d}", "web_search", 1, idempotency_key=f"k{n}"))
    backend.close()
    data = json.loads(invoke("--db", str(tmp_path / "many.db"), "report", "--json").stdout)
    assert len(data["customers"]) == 60
    assert sum(c["credits"] for c in data["customers"].values()) == 60


# -- wrong ledgers ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["report"], ["balance", CUSTOMER], ["events", CUSTOMER]])
def test_a_wrong_db_path_is_an_error_and_creates_nothing(tmp_path: Path, command) -> None:
    missing = tmp_path / "typo.db"
    result = invoke("--db", str(missing), *command)
    assert_one_line_error(result, "no such ledger file", str(missing))
    assert not missing.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_ledger_is_left_alone(tmp_path: Path) -> None:
    junk = tmp_path / "notes.db"
    junk.write_text("not a database")
    assert_one_line_error(invoke("--db", str(junk), "report"), "not an agent_meter ledger")
    assert junk.read_text() == "not a database"
    empty = tmp_path / "empty.db"
    empty.touch()
    assert_one_line_error(invoke("--db", str(empty), "report"), "not an agent_meter ledger")
    assert empty.stat().st_size == 0


def test_no_ledger_given(tmp_path: Path) -> None:
    result = invoke("report", env={"AGENT_METER_DB": ""})
    assert_one_line_error(result, "pass --db PATH or set AGENT_METER_DB")


def test_a_different_pricing_file_is_noted_not_written(demo_db: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[features]\nweb_search = "metered"\n')
    result = invoke("--db", str(demo_db), "--pricing", str(other), "balance", CUSTOMER)
    assert result.exit_code == 0, result.output
    assert "differs from" in result.stderr
    ledger = stored(demo_db)
    assert "code_exec" in ledger.pricing.features  # the stored pricing was kept
    ledger.close()


# -- pricing check ----------------------------------------------------------------------


def test_pricing_check_shows_what_a_file_defines() -> None:
    result = invoke("pricing", "check", str(ROOT / "examples" / "pricing.toml"))
    assert result.exit_code == 0, result.output
    for text in ("web_search", "2 credits per unit", "0.001 credits per unit", "agent_free"):
        assert text in result.stdout
    assert "ok (4 features, 1 credit system, 1 plan)" in result.stdout


def test_pricing_check_reads_the_environment() -> None:
    path = str(ROOT / "examples" / "pricing.toml")
    result = invoke("pricing", "check", env={"AGENT_METER_PRICING": path})
    assert result.exit_code == 0, result.output
    assert "ok (4 features" in result.stdout


def test_pricing_check_rejects_bad_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("[features\n")
    assert_one_line_error(invoke("pricing", "check", str(broken)), "not valid TOML")
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[features]\nweb_search = "metered"\n[credit_systems.credits]\nsearch = 1\n')
    assert_one_line_error(
        invoke("pricing", "check", str(wrong)), "credit_systems.credits.search", "not declared"
    )
    kind = tmp_path / "kind.toml"
    kind.write_text('[features]\nweb_search = "metred"\n')
    assert_one_line_error(invoke("pricing", "check", str(kind)), "unknown feature type 'metred'")
    missing = tmp_path / "missing.toml"
    assert_one_line_error(invoke("pricing", "check", str(missing)), "cannot read")
    assert_one_line_error(
        invoke("pricing", "check", env={"AGENT_METER_PRICING": ""}), "no pricing file given"
    )


# -- errors and entry points -------------------------------------------------------------


def test_debug_shows_the_exception(demo_db: Path) -> None:
    result = invoke("--debug", "--db", str(demo_db), "balance", "cus_nobody")
    assert result.exit_code == 1
    assert isinstance(result.exception, CustomerNotFound)


def test_main_returns_the_exit_code(tmp_path: Path, demo_db: Path, capsys) -> None:
    assert main(["--db", str(tmp_path / "nope.db"), "report"]) == 1
    assert "no such ledger file" in capsys.readouterr().err
    assert main(["--db", str(demo_db), "balance", CUSTOMER, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["balances"]["credits"] == 0.4
    assert main(["balance"]) == 2  # a usage error: CUSTOMER is missing


def test_the_module_entry_point_prints_one_line_errors(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "agent_meter.cli", "--db", str(tmp_path / "nope.db"), "report"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'nope.db'}: no such ledger file (read commands never create "
        "one; check --db / AGENT_METER_DB)"
    ]
    assert done.stdout == ""
