"""Faults of the embedded ledgers (issue 12): what a hold refunds, who owns it, resets,
rates the ledger cannot represent, connections of finished threads, and fork.

Each test reproduces one break found by the fault campaign and failed before its fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.engine import TrackRequest
from agent_meter.errors import ConfigError
from agent_meter.testing import MemoryBackend
from tests.conftest import PRICING_TOML, FakeClock

ROOT = Path(__file__).resolve().parent.parent
MONTH = 31 * 86_400
DEAD_OWNER = f"{socket.gethostname()}:999999999:1"  # no such pid: provably dead


def _pricing(rate: float = 2) -> Pricing:
    return Pricing.from_toml(PRICING_TOML.replace("code_exec = 2", f"code_exec = {rate}"))


@pytest.fixture(params=["sqlite", "memory"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _backend(
    kind: str, tmp_path: Path, pricing: Pricing, clock: FakeClock
) -> SQLiteBackend | MemoryBackend:
    if kind == "sqlite":
        return SQLiteBackend(tmp_path / "usage.db", pricing=pricing, clock=clock)
    return MemoryBackend(pricing=pricing, clock=clock)


# -- 2: a hold refunds exactly the credits it deducted ----------------------------------------


def test_a_refund_gives_back_what_was_deducted_not_todays_price(kind: str, tmp_path: Path) -> None:
    clock = FakeClock()
    backend = _backend(kind, tmp_path, _pricing(rate=2), clock)
    meter = Meter(backend, recover_on_start=False)
    call = meter.guard("cus_1", "code_exec", 10, call_id="c1")
    call.__enter__()
    assert backend.balances("cus_1")["credits"] == 80
    if kind == "sqlite":  # the price changes while the call runs (another process)
        backend.close()
        backend = SQLiteBackend(
            tmp_path / "usage.db", pricing=_pricing(rate=10), clock=clock, replace_pricing=True
        )
        meter = Meter(backend, recover_on_start=False)
        [hold] = backend.holds()
        assert backend.release(hold.key, hold.refund())
    else:
        backend._pricing = _pricing(rate=10)
        call.__exit__(RuntimeError, RuntimeError("tool failed"), None)
    assert backend.balances("cus_1")["credits"] == 100  # not 180


def test_recovery_refunds_a_dead_holds_deduction_after_a_price_change(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=_pricing(rate=2), clock=clock)
    meter = Meter(backend, recover_on_start=False)
    guard = meter.guard("cus_1", "code_exec", 10, call_id="c1")
    guard.__enter__()
    backend.close()
    # the process "died" (its owner is rewritten to a dead one) and the price went up
    with sqlite_conn(tmp_path / "usage.db") as conn:
        conn.execute("UPDATE events SET owner = ? WHERE owner IS NOT NULL", (DEAD_OWNER,))
    backend = SQLiteBackend(
        tmp_path / "usage.db", pricing=_pricing(rate=0.5), clock=clock, replace_pricing=True
    )
    report = Meter(backend, recover_on_start=False).recover()
    assert report.refunded == 1
    assert backend.balances("cus_1")["credits"] == 100  # not 85


# -- 7: a refund of a reservation that spans a reset -----------------------------------------


def test_a_refund_across_a_reset_never_lifts_the_balance_above_the_grant(
    kind: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    backend = _backend(kind, tmp_path, _pricing(), clock)
    meter = Meter(backend, recover_on_start=False)
    guard = meter.guard("cus_1", "code_exec", 1, call_id="c1")
    guard.__enter__()
    assert backend.balances("cus_1")["credits"] == 98
    clock.advance(MONTH)  # the plan resets while the call runs: 100 again
    assert backend.balances("cus_1")["credits"] == 100
    guard.__exit__(RuntimeError, RuntimeError("tool failed"), None)
    assert backend.balances("cus_1")["credits"] == 100  # not 102
    # the refund is recorded, and applied nothing: the reset already restored the grant
    [refund] = [e for e in backend.events("cus_1") if (e.idempotency_key or "").endswith("refund")]
    assert refund.applied == 0


def test_recovery_after_a_reset_never_lifts_the_balance_above_the_grant(tmp_path: Path) -> None:
    clock = FakeClock()
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=_pricing(), clock=clock)
    meter = Meter(backend, recover_on_start=False)
    for n in range(5):
        meter.guard("cus_1", "code_exec", 1, call_id=f"c{n}").__enter__()
    with sqlite_conn(tmp_path / "usage.db") as conn:
        conn.execute("UPDATE events SET owner = ? WHERE owner IS NOT NULL", (DEAD_OWNER,))
    clock.advance(MONTH)
    assert meter.recover().refunded == 5
    assert backend.balances("cus_1")["credits"] == 100  # not 110


def test_a_refund_within_the_period_is_exact_even_above_the_grant(
    kind: str, tmp_path: Path
) -> None:
    """A top-up (admin balance above the grant) keeps every refund: nothing is capped."""
    clock = FakeClock()
    backend = _backend(kind, tmp_path, _pricing(), clock)
    backend.set_balance("cus_1", "credits", 500)
    meter = Meter(backend, recover_on_start=False)
    with pytest.raises(RuntimeError), meter.guard("cus_1", "code_exec", 10, call_id="c1"):
        raise RuntimeError("tool failed")
    assert backend.balances("cus_1")["credits"] == 500


# -- 9: a rate the ledger cannot represent ------------------------------------------------------


@pytest.mark.parametrize("rate", ["1e-12", "0.0000000015", "3e-10"])
def test_a_rate_finer_than_the_ledger_is_refused_at_load(rate: str) -> None:
    with pytest.raises(ConfigError, match=r"credit_systems\.credits\.llm_tokens"):
        Pricing.from_toml(PRICING_TOML.replace("llm_tokens = 0.001", f"llm_tokens = {rate}"))


@pytest.mark.parametrize("grant", ["1e30", "0.0000000001", "5e9"])
def test_a_grant_the_ledger_cannot_hold_is_refused_at_load(grant: str) -> None:
    with pytest.raises(ConfigError, match="grants"):
        Pricing.from_toml(PRICING_TOML.replace("credits = 100", f"credits = {grant}"))


def test_the_finest_rate_the_ledger_holds_bills_exactly(tmp_path: Path) -> None:
    pricing = Pricing.from_toml(PRICING_TOML.replace("llm_tokens = 0.001", "llm_tokens = 1e-9"))
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
    backend.track(TrackRequest("cus_1", "llm_tokens", 10**9, "k"))
    assert backend.balances("cus_1")["credits"] == 99


# -- 12: connections of finished threads are closed ---------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_short_lived_threads_leave_no_connections_open(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=_pricing())
    backend.set_balance("cus_1", "credits", 1000)
    before = _open_fds()
    errors: list[BaseException] = []

    def one_call() -> None:
        try:
            backend.track(TrackRequest("cus_1", "web_search", 1, f"k{threading.get_ident()}"))
        except BaseException as exc:
            errors.append(exc)

    for _ in range(300):
        thread = threading.Thread(target=one_call)
        thread.start()
        thread.join()
    assert errors == []
    assert _open_fds() - before <= 8  # not 2 per finished thread (600)
    backend.close()


# -- 13: fork --------------------------------------------------------------------------------


FORK_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from agent_meter import Meter, SQLiteBackend

    backend = SQLiteBackend(sys.argv[1], busy_timeout=3)
    meter = Meter(backend, recover_on_start=False)
    with meter.guard("cus_1", "web_search", call_id="parent-0"):
        pass
    # the parent holds an open read transaction on its connection while the child works
    conn = backend._conn()
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM events").fetchone()
    pid = os.fork()
    if pid == 0:
        start = time.monotonic()
        code = 0
        try:
            for n in range(3):
                with meter.guard("cus_1", "web_search", call_id=f"child-{n}"):
                    pass
        except Exception as exc:
            print("child failed:", type(exc).__name__, exc, flush=True)
            code = 1
        print(f"child took {time.monotonic() - start:.2f}", flush=True)
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    conn.execute("COMMIT")
    with meter.guard("cus_1", "web_search", call_id="parent-1"):
        pass
    print("balance", backend.balances("cus_1")["credits"], flush=True)
    sys.exit(os.waitstatus_to_exitcode(status))
    """
)


@pytest.mark.slow
def test_a_forked_child_reopens_the_ledger(tmp_path: Path) -> None:
    pricing = _pricing()
    SQLiteBackend(tmp_path / "usage.db", pricing=pricing).close()
    done = subprocess.run(  # our own interpreter, our own script
        [sys.executable, "-c", FORK_CHILD, str(tmp_path / "usage.db")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    took = float(done.stdout.split("child took ")[1].split()[0])
    assert took < 2.0, done.stdout
    assert "balance 95.0" in done.stdout, done.stdout


# -- 6: owners in another PID namespace --------------------------------------------------------


NAMESPACED_CHILD = textwrap.dedent(
    """
    import sys
    from agent_meter import Meter, SQLiteBackend

    meter = Meter(SQLiteBackend(sys.argv[1]), recover_on_start=False)
    with meter.guard("cus_1", "code_exec", call_id="in-a-container"):
        print("holding", flush=True)
        sys.stdin.readline()
    print("done", flush=True)
    """
)


UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, check=False)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _unshare_works(), reason="needs unshare(1) and CAP_SYS_ADMIN")
def test_recovery_never_refunds_a_live_call_in_another_pid_namespace(tmp_path: Path) -> None:
    """Two containers, one hostname, one volume: the child is pid 1 in its own namespace."""
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=_pricing())
    backend.set_balance("cus_1", "credits", 10)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [*UNSHARE, sys.executable, "-c", NAMESPACED_CHILD, str(path)],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        assert line.strip() == "holding", child.stderr.read() if child.stderr else ""
        [hold] = backend.holds()
        assert hold.owner.split(":")[1] == "1"  # pid 1 of its namespace; ours is init
        assert Meter(backend, recover_on_start=False).recover().refunded == 0
        assert backend.balances("cus_1")["credits"] == 8
        out, err = child.communicate("\n", timeout=20)
        assert "done" in out, err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate(timeout=10)
    assert backend.balances("cus_1")["credits"] == 8  # billed once, never refunded
    assert backend.holds() == []


# -- helpers ---------------------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_conn(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to a ledger file (autocommit)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        yield conn
    finally:
        conn.close()


def test_the_unused_rest_of_an_estimate_goes_back_at_the_reservations_price(
    kind: str, tmp_path: Path
) -> None:
    clock = FakeClock()
    backend = _backend(kind, tmp_path, _pricing(rate=2), clock)
    meter = Meter(backend, recover_on_start=False)
    guard = meter.guard("cus_1", "code_exec", 10, call_id="c1")
    call = guard.__enter__()
    assert backend.balances("cus_1")["credits"] == 80
    backend._pricing = _pricing(rate=10)  # the price changes while the call runs
    call.bill(4)  # 6 of the 10 reserved units were not used
    guard.__exit__(None, None, None)
    assert backend.balances("cus_1")["credits"] == 92  # 8 kept, 12 back: not 60 back


# -- 1: a success stays billed whatever happens to its bookkeeping ----------------------------


def test_a_success_whose_hold_cannot_be_closed_is_never_refunded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=_pricing(), busy_timeout=0.2)
    meter = Meter(backend, outbox=tmp_path / "outbox.db", recover_on_start=False)
    # the success cannot be recorded in the settle journal either (a full disk), so the
    # hold must be closed at once, and that times out on the other writer's lock
    monkeypatch.setattr(backend._journal, "record", lambda key: False)
    blocker = sqlite3.connect(path, isolation_level=None)
    with meter.guard("cus_1", "code_exec", 1, call_id="c1"):
        blocker.execute("BEGIN IMMEDIATE")  # closing the hold times out on this lock
    blocker.execute("COMMIT")
    blocker.close()
    assert backend.balances("cus_1")["credits"] == 98  # the caller was told: billed
    assert len(backend.holds()) == 1  # still open in the ledger
    # the process dies; whoever recovers later must not refund a call that succeeded
    with sqlite_conn(path) as conn:
        conn.execute("UPDATE events SET owner = ? WHERE owner IS NOT NULL", (DEAD_OWNER,))
    reopened = SQLiteBackend(path)
    later = Meter(reopened, outbox=tmp_path / "outbox.db", recover_on_start=False)
    assert later.recover().refunded == 0
    assert reopened.holds() == []
    assert reopened.balances("cus_1")["credits"] == 98


def _settle_while_locked(
    tmp_path: Path, strategy: str, *, fails: bool = False, bill: float | None = None
) -> tuple[Meter, sqlite3.Connection]:
    """A code_exec call of 10 units (20 credits) settled while another writer holds the ledger.

    Returns the meter (its deliverer stopped, as if the process were about to die) and the
    blocker, still holding the write lock: commit it to let the ledger be written again.
    """
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=_pricing(), busy_timeout=0.2)
    meter = Meter(
        backend,
        outbox=tmp_path / "outbox.db",
        recover_on_start=False,
        strategy=strategy,  # type: ignore[arg-type]
    )
    meter.deliverer._base = 60.0  # what was queued waits: this process is about to die
    blocker = sqlite3.connect(path, isolation_level=None)
    guard = meter.guard("cus_1", "code_exec", 10, call_id="c1")
    call = guard.__enter__()
    assert backend.balances("cus_1")["credits"] == 80
    if bill is not None:
        call.bill(bill)
    blocker.execute("BEGIN IMMEDIATE")  # closing the hold times out on this lock
    if fails:
        guard.__exit__(RuntimeError, RuntimeError("tool failed"), None)
    else:
        guard.__exit__(None, None, None)
    meter.deliverer.stop()
    # the process dies; its holds now belong to a dead owner
    blocker.execute("UPDATE events SET owner = ? WHERE owner IS NOT NULL", (DEAD_OWNER,))
    return meter, blocker


@pytest.mark.parametrize("strategy", ["reserve", "lock"])
def test_a_partly_used_estimate_whose_hold_cannot_be_closed_keeps_its_bill(
    tmp_path: Path, strategy: str
) -> None:
    _, blocker = _settle_while_locked(tmp_path, strategy, bill=4)
    blocker.execute("COMMIT")
    assert _recovered_balance(tmp_path) == 92  # 8 kept, 12 back; not 100


@pytest.mark.parametrize("strategy", ["reserve", "lock"])
def test_a_success_whose_lock_cannot_be_confirmed_is_never_refunded(
    tmp_path: Path, strategy: str
) -> None:
    _, blocker = _settle_while_locked(tmp_path, strategy)
    blocker.execute("COMMIT")
    assert _recovered_balance(tmp_path) == 80  # not 100


def _recovered_balance(tmp_path: Path) -> float:
    """The balance once a later process has recovered and delivered what the dead one left."""
    ledger = SQLiteBackend(tmp_path / "usage.db")
    later = Meter(ledger, outbox=tmp_path / "outbox.db", recover_on_start=False)
    assert later.recover().refunded == 0
    assert later.flush(timeout=5) == 0
    assert ledger.holds() == []
    return float(ledger.balances("cus_1")["credits"])


@pytest.mark.parametrize("strategy", ["reserve", "lock"])
def test_a_queued_refund_gives_back_what_was_deducted_not_todays_price(
    tmp_path: Path, strategy: str
) -> None:
    _, blocker = _settle_while_locked(tmp_path, strategy, fails=True)
    blocker.execute("COMMIT")
    later = Meter(
        SQLiteBackend(tmp_path / "usage.db", pricing=_pricing(rate=10), replace_pricing=True),
        outbox=tmp_path / "outbox.db",
        recover_on_start=False,
    )
    assert later.flush(timeout=5) == 0  # the queued refund is delivered at today's rate of 10
    later.recover()
    assert later.backend.holds() == []  # type: ignore[attr-defined]
    assert later.backend.balances("cus_1")["credits"] == 100  # type: ignore[attr-defined]
