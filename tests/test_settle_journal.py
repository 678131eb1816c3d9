"""The SQLite success path costs one commit: a success's hold is closed by the next one.

Between the two, the success is kept in this process's settle journal (a file next to the
ledger), so that ``recover()`` never refunds it, even if the process is killed before
another commit. These tests count the commits, kill a process right after a success, and
break the journal.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from agent_meter import Meter, Pricing, SQLiteBackend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def ledger(tmp_path: Path, pricing: Pricing) -> SQLiteBackend:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
    backend.set_balance("cus_1", "credits", 100)
    return backend


def journals(ledger: SQLiteBackend) -> list[Path]:
    return sorted(ledger.path.parent.glob(f"{ledger.path.name}-settled-*"))


def open_in_ledger(path: Path) -> list[str]:
    """Hold keys whose row still names an owner, read with a connection of our own."""
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT idempotency_key FROM events WHERE owner IS NOT NULL")
        return [key for (key,) in rows]
    finally:
        conn.close()


def test_each_success_costs_one_commit(ledger: SQLiteBackend) -> None:
    meter = Meter(ledger, recover_on_start=False)
    with meter.guard("cus_1", "web_search", call_id="warm"):
        pass  # the customer is known, the connection open
    statements: list[str] = []
    ledger._conn().set_trace_callback(statements.append)

    for n in range(5):
        with meter.guard("cus_1", "web_search", call_id=f"c{n}"):
            pass

    commits = 0
    in_transaction = False
    alone: list[str] = []  # statements committed on their own (autocommit)
    for statement in statements:
        verb = statement.strip().upper()
        if verb.startswith("BEGIN"):
            in_transaction = True
        elif verb in ("COMMIT", "ROLLBACK"):
            commits += verb == "COMMIT"
            in_transaction = False
        elif not in_transaction and not verb.startswith("SELECT"):
            alone.append(statement)
    assert commits == 5  # one per call: its reservation, with the previous call's close
    assert alone == []  # no close committed on its own
    closes = [s for s in statements if s.lstrip().upper().startswith("UPDATE EVENTS")]
    assert len(closes) == 5  # the warm-up's and four of the five (the fifth: next commit)
    assert ledger.balances("cus_1")["credits"] == 100 - 6


def test_the_next_commit_closes_the_hold_and_close_closes_the_last(
    ledger: SQLiteBackend,
) -> None:
    meter = Meter(ledger, recover_on_start=False)
    with meter.guard("cus_1", "web_search", call_id="first") as first:
        pass
    key = first.admission.hold.key if first.admission and first.admission.hold else ""
    assert open_in_ledger(ledger.path) == [key]  # not closed yet, but recorded:
    assert [p.read_text().splitlines()[1:] for p in journals(ledger)] == [[key]]
    assert ledger.holds() == []  # so it is not an open hold to anyone who asks

    with meter.guard("cus_1", "web_search", call_id="second"):
        pass
    assert key not in open_in_ledger(ledger.path)  # closed by the second call's commit

    meter.close()
    ledger.close()
    assert open_in_ledger(ledger.path) == []  # close() folded the last one in
    assert journals(ledger) == []  # and removed the journal, all of it folded


def test_a_failure_is_refunded_in_its_own_commit_never_journaled(
    ledger: SQLiteBackend,
) -> None:
    meter = Meter(ledger, recover_on_start=False)
    with pytest.raises(RuntimeError), meter.guard("cus_1", "web_search", call_id="bad"):
        raise RuntimeError("the tool failed")
    assert open_in_ledger(ledger.path) == []
    assert ledger.balances("cus_1")["credits"] == 100
    assert all(len(p.read_text().splitlines()) <= 1 for p in journals(ledger))


KILLED_AFTER_SUCCESS = textwrap.dedent(
    """
    import os, signal, sys
    from agent_meter import Meter, SQLiteBackend

    meter = Meter(SQLiteBackend(sys.argv[1]), recover_on_start=False)
    for n in range(3):
        with meter.guard("cus_1", "web_search", call_id=f"ok{n}"):
            pass
    print("billed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # before any other commit, before close()
    """
)


def test_a_process_killed_right_after_its_successes_is_never_refunded(
    ledger: SQLiteBackend,
) -> None:
    ledger.close()
    child = subprocess.run(  # our own interpreter, our own script
        [sys.executable, "-c", KILLED_AFTER_SUCCESS, str(ledger.path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout == "billed\n"
    assert len(open_in_ledger(ledger.path)) == 1  # the last success's hold, still open
    assert len(journals(ledger)) == 1  # and the journal that says it succeeded

    backend = SQLiteBackend(ledger.path)
    report = Meter(backend, recover_on_start=False).recover()

    assert report.refunded == 0  # the caller was told "billed": it stays billed
    assert open_in_ledger(ledger.path) == []
    assert journals(ledger) == []  # folded in, then removed
    assert backend.balances("cus_1")["credits"] == 100 - 3


EXITS_WITHOUT_CLOSE = textwrap.dedent(
    """
    import sys
    from agent_meter import Meter, SQLiteBackend

    meter = Meter(SQLiteBackend(sys.argv[1]), recover_on_start=False)
    with meter.guard("cus_1", "web_search", call_id="ok"):
        pass
    """  # and exits normally, without closing anything
)


def test_a_normal_exit_closes_the_last_successes_hold(ledger: SQLiteBackend) -> None:
    ledger.close()
    subprocess.run(  # our own interpreter, our own script
        [sys.executable, "-c", EXITS_WITHOUT_CLOSE, str(ledger.path)],
        cwd=ROOT,
        check=True,
        timeout=60,
    )
    assert open_in_ledger(ledger.path) == []
    assert journals(ledger) == []


def test_a_meter_that_starts_folds_what_a_killed_process_left(ledger: SQLiteBackend) -> None:
    ledger.close()
    child = subprocess.run(  # our own interpreter, our own script
        [sys.executable, "-c", KILLED_AFTER_SUCCESS, str(ledger.path)],
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -signal.SIGKILL
    assert len(journals(ledger)) == 1

    meter = Meter(SQLiteBackend(ledger.path))  # recovers on start, in the background
    deadline = time.monotonic() + 20
    while journals(ledger) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert journals(ledger) == []
    assert open_in_ledger(ledger.path) == []
    assert meter.backend.balances("cus_1")["credits"] == 100 - 3  # type: ignore[attr-defined]


def test_a_journal_that_cannot_be_written_closes_the_hold_at_once(
    ledger: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    meter = Meter(ledger, recover_on_start=False)
    monkeypatch.setattr("agent_meter.backends.settle_journal.os.write", disk_full)
    with meter.guard("cus_1", "web_search", call_id="c1"):
        pass
    assert open_in_ledger(ledger.path) == []  # closed with a commit of its own
    assert ledger.balances("cus_1")["credits"] == 99


def test_a_torn_marker_is_never_read_as_a_key(tmp_path: Path, pricing: Pricing) -> None:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
    torn = tmp_path / "usage.db-settled-0123456789abcdef"
    dead = f"{socket.gethostname()}:999999999:1"  # no such pid here: provably dead
    torn.write_text(f"{dead}\nam1:cus_1::web_search:c1:hold\nam1:cus_1::web_")
    assert backend._journal.ended() == [(torn, ["am1:cus_1::web_search:c1:hold"])]


async def test_an_async_success_is_recorded_on_the_loop_without_a_worker_thread(
    ledger: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    meter = Meter(ledger, recover_on_start=False)
    async with meter.aguard("cus_1", "web_search", call_id="warm"):
        pass
    threads: list[object] = []
    real = asyncio.to_thread

    async def counting(func: object, /, *args: object, **kwargs: object) -> object:
        threads.append(func)
        return await real(func, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(asyncio, "to_thread", counting)
    async with meter.aguard("cus_1", "web_search", call_id="c1"):
        pass
    assert len(threads) == 1  # the reservation; the success is an append on the loop
    assert ledger.balances("cus_1")["credits"] == 98


def test_a_journal_whose_markers_are_all_folded_is_emptied_past_its_size_limit(
    ledger: SQLiteBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("agent_meter.backends.settle_journal._COMPACT_AT", 200)
    meter = Meter(ledger, recover_on_start=False)
    sizes = []
    for n in range(12):
        with meter.guard("cus_1", "web_search", call_id=f"c{n}"):
            pass
        sizes.append(journals(ledger)[0].stat().st_size)
    shrank = [n for n in range(1, len(sizes)) if sizes[n] < sizes[n - 1]]
    assert shrank  # emptied once every marker in it was folded and it passed the limit
    assert max(sizes) < 200 + 100  # so it never grows far past it
    # the last success is still recorded (not folded yet) and is never refunded
    last = journals(ledger)[0].read_text().splitlines()[1:]
    assert last
    assert last[-1].endswith(":hold")
    assert ledger.holds() == []
    assert ledger.balances("cus_1")["credits"] == 100 - 12
