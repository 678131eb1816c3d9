"""Opening a ledger never damages a file: foreign files, other pricings, read-only places."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_meter import BackendError, ConfigError, Pricing, SQLiteBackend
from agent_meter.cli import cli
from agent_meter.demo import BROKE_CUSTOMER, CUSTOMER
from agent_meter.engine import TrackRequest

ROOT = Path(__file__).resolve().parents[1]
OTHER = Pricing(features={"web_search": "metered"}, credit_systems={"pool": {"web_search": 3}})


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    """Somebody else's SQLite database."""
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('keep me')")
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def ledger(tmp_path: Path, pricing: Pricing) -> Path:
    """A ledger that bills by the example pricing, with one customer's usage."""
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=pricing)
    backend.track(TrackRequest("cus_1", "web_search", 3, "k1"))
    backend.close()
    return path


# -- 2: a foreign file, a different pricing ------------------------------------------------


def test_a_foreign_sqlite_file_is_refused_and_left_byte_for_byte(
    foreign: Path, pricing: Pricing
) -> None:
    before, listing = digest(foreign), files_in(foreign.parent)
    with pytest.raises(ConfigError, match=r"not an agent_meter ledger .*notes"):
        SQLiteBackend(foreign, pricing=pricing)
    with pytest.raises(ConfigError, match="not an agent_meter ledger"):
        SQLiteBackend(foreign)
    assert digest(foreign) == before
    assert files_in(foreign.parent) == listing


def test_demo_refuses_a_foreign_file(foreign: Path) -> None:
    before = digest(foreign)
    result = CliRunner().invoke(cli, ["demo", "--db", str(foreign)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: {foreign}: not an agent_meter ledger")
    assert digest(foreign) == before
    conn = sqlite3.connect(foreign)
    assert [row[0] for row in conn.execute("SELECT name FROM sqlite_master")] == ["notes"]
    conn.close()


def test_a_different_pricing_is_refused_unless_replacing_is_asked_for(ledger: Path) -> None:
    before = digest(ledger)
    with pytest.raises(ConfigError, match="bills by a different pricing") as refused:
        SQLiteBackend(ledger, pricing=OTHER)
    assert "replace_pricing=True" in str(refused.value)
    assert digest(ledger) == before
    kept = SQLiteBackend(ledger)
    assert kept.pricing == Pricing.example()
    assert kept.balances("cus_1")["credits"] == 97
    kept.close()
    replaced = SQLiteBackend(ledger, pricing=OTHER, replace_pricing=True)
    replaced.close()
    assert SQLiteBackend(ledger, read_only=True).pricing == OTHER


def test_the_same_pricing_reopens_without_a_write(ledger: Path, pricing: Pricing) -> None:
    backend = SQLiteBackend(ledger, pricing=pricing)
    assert backend.balances("cus_1")["credits"] == 97
    backend.close()


def test_demo_refuses_a_ledger_with_another_pricing(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    SQLiteBackend(path, pricing=OTHER).close()
    result = CliRunner().invoke(cli, ["demo", "--db", str(path)])
    assert result.exit_code == 1
    assert "bills by a different pricing" in result.stderr
    kept = SQLiteBackend(path, read_only=True)
    assert kept.pricing == OTHER
    assert kept.customers() == []
    kept.close()


def test_demo_runs_twice_on_one_ledger_without_mixing_the_runs(tmp_path: Path) -> None:
    db = tmp_path / "demo.db"
    first = CliRunner().invoke(cli, ["demo", "--db", str(db)])
    second = CliRunner().invoke(cli, ["demo", "--db", str(db), "--credits", "3"])
    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "this run's customers are cus_demo_2 and cus_no_credits_2" in second.stdout
    backend = SQLiteBackend(db, read_only=True)
    assert backend.customers() == sorted(
        [CUSTOMER, BROKE_CUSTOMER, f"{CUSTOMER}_2", f"{BROKE_CUSTOMER}_2"]
    )
    assert backend.balances(CUSTOMER)["credits"] == 0.4  # the first run, untouched
    assert backend.balances(f"{CUSTOMER}_2")["credits"] == 0
    backend.close()
    report = CliRunner().invoke(cli, ["--db", str(db), "report", "--json"])
    spent = json.loads(report.stdout)["customers"]
    assert spent[CUSTOMER]["credits"] == 6.6  # 7 - 0.4: the first run alone
    assert spent[f"{CUSTOMER}_2"]["credits"] == 3


# -- 3: reading a ledger in a read-only directory -----------------------------------------


@pytest.fixture
def read_only_folder(ledger: Path) -> Iterator[Path]:
    """The ledger's folder made read-only (mode 555, the files 444)."""
    folder = ledger.parent
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        (folder / name).unlink(missing_ok=True)
    assert files_in(folder) == ["usage.db"]  # closed cleanly: no -wal or -shm left
    ledger.chmod(0o444)
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)
    ledger.chmod(0o644)


def unprivileged(command: list[str]) -> list[str]:
    """Run as a user the folder's permissions apply to (root ignores them)."""
    if os.geteuid() != 0:
        return command
    unshare = shutil.which("unshare")
    assert unshare is not None, "root needs unshare(1) to drop the power to write anywhere"
    return [unshare, "--user", *command]


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["balance", "cus_1"], "97"),
        (["events", "cus_1"], "k1"),
        (["report"], "3 credits"),
        (["report", "--json"], '"credits": 3.0'),
    ],
)
def test_read_commands_read_a_ledger_in_a_read_only_directory(
    read_only_folder: Path, command: list[str], expected: str
) -> None:
    db = read_only_folder / "usage.db"
    probe = subprocess.run(
        unprivileged([sys.executable, "-c", f"open({str(read_only_folder / 'x')!r}, 'w')"]),
        capture_output=True,
        check=False,
    )
    assert probe.returncode != 0, "the folder must really be read-only for this test"
    before = digest(db)
    done = subprocess.run(
        unprivileged([sys.executable, "-m", "agent_meter.cli", "--db", str(db), *command]),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
    assert digest(db) == before
    assert files_in(read_only_folder) == ["usage.db"]


def test_read_only_backend_never_writes(ledger: Path) -> None:
    before = digest(ledger)
    backend = SQLiteBackend(ledger, read_only=True)
    assert backend.customers() == ["cus_1"]
    with pytest.raises(BackendError, match=r"readonly|read-only"):
        backend.track(TrackRequest("cus_1", "web_search", 1, "k2"))
    backend.close()
    assert digest(ledger) == before
    with pytest.raises(ConfigError, match="bills by a different pricing"):
        SQLiteBackend(ledger, read_only=True, pricing=OTHER)
    with pytest.raises(ConfigError, match="a read-only ledger cannot store a new pricing"):
        SQLiteBackend(ledger, read_only=True, pricing=OTHER, replace_pricing=True)
    assert digest(ledger) == before


# -- 4: nothing is created when opening fails ----------------------------------------------


def test_a_missing_ledger_without_pricing_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no pricing given"):
        SQLiteBackend(tmp_path / "fresh.db")
    with pytest.raises(ConfigError, match="no such ledger file"):
        SQLiteBackend(tmp_path / "fresh.db", read_only=True)
    assert files_in(tmp_path) == []


def test_an_empty_file_without_pricing_stays_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(ConfigError, match="empty file and no pricing"):
        SQLiteBackend(empty)
    assert empty.stat().st_size == 0
    assert files_in(tmp_path) == ["empty.db"]


def test_a_failed_creation_removes_what_it_made(
    tmp_path: Path, pricing: Pricing, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr("agent_meter.backends.sqlite._create_schema", refuse)
    with pytest.raises(Exception, match="disk I/O error"):
        SQLiteBackend(tmp_path / "new.db", pricing=pricing)
    assert files_in(tmp_path) == []


def test_two_openers_race_to_create_one_ledger(tmp_path: Path, pricing: Pricing) -> None:
    """Creating is one transaction: a second opener sees all of it or nothing."""
    path = tmp_path / "race.db"
    errors: list[BaseException] = []
    opened: list[SQLiteBackend] = []

    def open_it(given: Pricing) -> None:
        try:
            opened.append(SQLiteBackend(path, pricing=given))
        except ConfigError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it, args=(p,)) for p in (pricing, OTHER) * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    prices = {backend.pricing.model_dump_json() for backend in opened}
    for backend in opened:
        backend.close()
    assert len(prices) == 1  # every opener that got in bills by the same pricing
    assert len(opened) + len(errors) == 8
    assert all("bills by a different pricing" in str(error) for error in errors)


def test_a_refused_opener_never_removes_a_ledger_another_one_just_created(
    tmp_path: Path, pricing: Pricing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file did not exist when this opener looked; another one created it meanwhile."""
    path = tmp_path / "race.db"
    others: list[SQLiteBackend] = []
    raced: list[bool] = []
    original = SQLiteBackend._open

    def another_opener_first(self: SQLiteBackend, given: Pricing | None, **kw: bool) -> Pricing:
        if not raced:
            raced.append(True)
            others.append(SQLiteBackend(path, pricing=pricing))
        return original(self, given, **kw)

    monkeypatch.setattr(SQLiteBackend, "_open", another_opener_first)
    with pytest.raises(ConfigError, match="bills by a different pricing"):
        SQLiteBackend(path, pricing=OTHER)
    theirs = others[0]
    theirs.track(TrackRequest("cus_1", "web_search", 2, "k1"))  # their ledger still works
    assert theirs.balances("cus_1")["credits"] == 98
    theirs.close()
    assert SQLiteBackend(path, read_only=True).pricing == pricing
