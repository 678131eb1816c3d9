"""Crashes and recovery: nothing lost, nothing billed twice, no reservation left open.

The crash tests start a child process that makes guarded calls in a loop and kill it with
SIGKILL at random moments, many times; afterwards ``meter.recover()`` must leave the books
balanced: every call the child saw complete is billed, every call that failed is refunded,
each kill leaves at most one call billed that the child never saw finish, and no hold is
open. The other tests prove that recovery never touches a live process's reservation and
refunds a dead one's exactly once, however many recoveries race.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.owner import current_owner, owner_is_alive
from agent_meter.testing import MemoryBackend
from tests.outage_helpers import SECRET, AutumnServer, pricing

ROOT = Path(__file__).resolve().parent.parent
CUSTOMER = "cus_crash"
START_CREDITS = 100_000.0

# A child that makes guarded calls forever, writing one line per completed call (after the
# guard has exited) with fsync, so that the parent knows exactly which calls completed.
LOOP_CHILD = textwrap.dedent(
    """
    import os, random, sys
    sys.path.insert(0, "tests")
    from agent_meter import Meter, SQLiteBackend
    from agent_meter.backends.autumn import AutumnBackend
    from outage_helpers import SECRET, pricing  # type: ignore[import-not-found]  # a child process

    kind, target, outbox, log, seed = sys.argv[1:]
    rng = random.Random(int(seed))
    if kind == "sqlite":
        meter = Meter(SQLiteBackend(target))      # recovers earlier children on start
    else:
        backend = AutumnBackend(SECRET, base_url=target, timeout=2, max_retries=0)
        strategy = "lock" if kind == "autumn-lock" else "reserve"
        meter = Meter(backend, pricing=pricing(), outbox=outbox, strategy=strategy)
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    n = 0
    while True:
        call_id = f"s{seed}n{n}"
        failing = rng.random() < 0.3
        try:
            with meter.guard("cus_crash", "web_search", call_id=call_id):
                if failing:
                    raise RuntimeError("the tool failed")
        except RuntimeError:
            outcome = "F"
        else:
            outcome = "S"
        os.write(fd, f"{outcome} {call_id}\\n".encode())
        os.fsync(fd)
        n += 1
    """
)

# A child that enters one guard and waits there until told to finish (or is killed).
HOLDING_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, "tests")
    from agent_meter import Meter, SQLiteBackend
    from agent_meter.backends.autumn import AutumnBackend
    from outage_helpers import SECRET, pricing  # type: ignore[import-not-found]  # a child process

    kind, target, outbox, call_id = sys.argv[1:]
    if kind == "sqlite":
        meter = Meter(SQLiteBackend(target), recover_on_start=False)
    else:
        backend = AutumnBackend(SECRET, base_url=target, timeout=2, max_retries=0)
        meter = Meter(
            backend, pricing=pricing(), outbox=outbox, recover_on_start=False, strategy="reserve"
        )
    with meter.guard("cus_crash", "code_exec", call_id=call_id):
        print("holding", flush=True)
        sys.stdin.readline()
    meter.close(timeout=5)
    print("done", flush=True)
    """
)


def spawn(script: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(  # our own interpreter, our own script
        [sys.executable, "-c", script, *args],
        cwd=ROOT,
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def completed_calls(log: Path) -> tuple[set[str], set[str]]:
    """The calls the children saw succeed and fail (whole lines only)."""
    succeeded: set[str] = set()
    failed: set[str] = set()
    if not log.exists():
        return succeeded, failed
    for line in log.read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            continue  # a line cut by the kill: that call was not reported
        outcome, call_id = line.split()
        (succeeded if outcome == "S" else failed).add(call_id)
    return succeeded, failed


def kill_repeatedly(kind: str, target: str, outbox: Path, log: Path, kills: int, seed: int) -> None:
    """Start the loop child ``kills`` times and SIGKILL it at a random moment each time."""
    rng = random.Random(seed)
    for round_ in range(kills):
        before = log.stat().st_size if log.exists() else 0
        child = spawn(LOOP_CHILD, kind, target, str(outbox), str(log), str(seed * 1000 + round_))
        deadline = time.monotonic() + 20
        # wait until the child is making calls, then let it run a random little while
        while (log.stat().st_size if log.exists() else 0) == before:
            if child.poll() is not None or time.monotonic() > deadline:
                _, err = child.communicate(timeout=5)
                pytest.fail(f"the child stopped before its first call: {err}")
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.08))
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
        assert child.returncode == -signal.SIGKILL


def call_of(key: str) -> tuple[str, str]:
    """(call_id, purpose) of an idempotency key ``am1:<customer>:<entity>:<feature>:<call>:<p>``.

    A refund's call part also names the attempt (``<call>.r<12 hex>``): it is left out.
    """
    parts = key.split(":")
    return re.sub(r"\.r[0-9a-f]{12}$", "", parts[-2]), parts[-1]


@pytest.fixture
def crash_pricing() -> Pricing:
    return pricing()


# -- the crash tests ---------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_at_random_moments_conserves_credits_on_sqlite(
    tmp_path: Path, crash_pricing: Pricing
) -> None:
    db, log = tmp_path / "usage.db", tmp_path / "calls.log"
    setup = SQLiteBackend(db, pricing=crash_pricing)
    setup.set_balance(CUSTOMER, "credits", START_CREDITS)
    setup.close()
    kills = 20

    kill_repeatedly("sqlite", str(db), tmp_path / "unused.db", log, kills, seed=6)

    backend = SQLiteBackend(db)
    meter = Meter(backend, recover_on_start=False)
    report = meter.recover()
    assert report.refunded <= kills
    assert backend.holds() == []  # no reservation is left open
    assert meter.recover().refunded == 0  # a second recovery finds nothing

    succeeded, failed = completed_calls(log)
    assert len(succeeded) > kills  # the children did real work between kills
    assert failed  # and some of it failed
    reserved: set[str] = set()
    refunded: set[str] = set()
    for event in backend.events(CUSTOMER):
        call_id, purpose = call_of(event.idempotency_key or "")
        target = reserved if purpose == "hold" else refunded
        assert call_id not in target  # never reserved or refunded twice
        target.add(call_id)
    billed = reserved - refunded
    assert succeeded <= billed  # every call the agent saw succeed is billed
    assert not failed & billed  # every call that failed was refunded
    assert len(billed - succeeded) <= kills  # a kill leaves at most one unseen call billed
    spent = START_CREDITS - float(backend.balances(CUSTOMER)["credits"])
    assert spent == len(billed)
    assert len(succeeded) <= spent <= len(succeeded) + kills
    meter.close()


@pytest.mark.slow
def test_sigkill_at_random_moments_conserves_credits_on_autumn(tmp_path: Path) -> None:
    """The same against a remote backend: holds journaled in the outbox, refunds queued."""
    outbox, log = tmp_path / "outbox.db", tmp_path / "calls.log"
    kills = 15
    # the customer holds its plan's grant: Autumn drops a refund above the grant (fact 16),
    # so a balance set above it would lose every refund and hide what this test counts
    with AutumnServer(grant=START_CREDITS) as server:
        server.set_balance(CUSTOMER, START_CREDITS)

        kill_repeatedly("autumn", server.url, outbox, log, kills, seed=7)

        backend = AutumnBackend(SECRET, base_url=server.url, timeout=2, max_retries=1)
        meter = Meter(
            backend, pricing=pricing(), outbox=outbox, recover_on_start=False, strategy="reserve"
        )
        report = meter.recover()
        assert report.refunded + report.uncertain <= kills
        assert meter.outbox.holds() == []
        assert meter.flush(timeout=10) == 0
        assert report.pending == 0
        spent = START_CREDITS - server.balance(CUSTOMER)
        applied = server.stats.tracks_applied
        meter.close(timeout=2)

    succeeded, failed = completed_calls(log)
    assert len(succeeded) > kills
    assert failed
    assert all(count == 1 for count in applied.values())  # each refund counted once
    refunded = {call_of(key)[0] for key in applied}
    assert failed <= refunded  # every failed call was refunded (some by a later process)
    assert not succeeded & refunded
    assert len(refunded - failed) <= kills  # refunds of calls cut by a kill
    assert len(succeeded) <= spent <= len(succeeded) + kills


@pytest.mark.slow
def test_sigkill_at_random_moments_conserves_credits_on_autumn_locks(tmp_path: Path) -> None:
    """The same on the lock strategy: finalizes queued, dead processes' locks released."""
    outbox, log = tmp_path / "outbox.db", tmp_path / "calls.log"
    kills = 15
    with AutumnServer() as server:
        server.set_balance(CUSTOMER, START_CREDITS)

        kill_repeatedly("autumn-lock", server.url, outbox, log, kills, seed=8)

        backend = AutumnBackend(SECRET, base_url=server.url, timeout=2, max_retries=1)
        meter = Meter(
            backend, pricing=pricing(), outbox=outbox, recover_on_start=False, strategy="lock"
        )
        report = meter.recover()
        assert report.refunded <= kills  # locks of killed calls, released by id
        assert meter.outbox.holds() == []
        assert meter.flush(timeout=10) == 0
        assert server.open_locks() == {}  # no lock is left holding credits
        assert meter.recover().refunded == 0  # a second recovery finds nothing
        spent = START_CREDITS - server.balance(CUSTOMER)
        finalized = list(server.stats.finalize_log)
        tracks = dict(server.stats.tracks_applied)
        meter.close(timeout=2)

    succeeded, failed = completed_calls(log)
    assert len(succeeded) > kills
    assert failed
    assert not tracks  # a lock needs no track and no refund
    lock_ids = [lock_id for lock_id, _ in finalized]
    assert len(lock_ids) == len(set(lock_ids))  # each lock finalized once
    confirmed = {call_of(lock_id)[0] for lock_id, action in finalized if action == "confirm"}
    released = {call_of(lock_id)[0] for lock_id, action in finalized if action == "release"}
    assert succeeded <= confirmed  # every call seen to succeed is billed, once
    assert failed <= released  # every failed call was given back exactly
    assert not succeeded & released
    assert len(confirmed - succeeded) <= kills  # a kill leaves at most one unseen call billed
    assert spent == len(confirmed)
    assert len(succeeded) <= spent <= len(succeeded) + kills


# -- recovery never touches a live reservation ----------------------------------------------


@pytest.fixture
def ledger(tmp_path: Path, crash_pricing: Pricing) -> Iterator[SQLiteBackend]:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=crash_pricing)
    backend.set_balance(CUSTOMER, "credits", 10)
    yield backend
    backend.close()


def credits(backend: SQLiteBackend | MemoryBackend) -> float:
    return float(backend.balances(CUSTOMER)["credits"])


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_recover_leaves_a_call_running_in_another_thread_alone(
    ledger: SQLiteBackend, crash_pricing: Pricing, kind: str
) -> None:
    backend = ledger if kind == "sqlite" else MemoryBackend(pricing=crash_pricing)
    if kind == "memory":
        backend.set_balance(CUSTOMER, "credits", 10)
    meter = Meter(backend, recover_on_start=False)
    inside, finish = threading.Event(), threading.Event()

    def tool_call() -> None:
        with meter.guard(CUSTOMER, "code_exec", call_id="long-running"):
            inside.set()
            finish.wait(10)

    worker = threading.Thread(target=tool_call)
    worker.start()
    assert inside.wait(10)
    [hold] = backend.holds()
    assert owner_is_alive(hold.owner)
    assert hold.owner == current_owner()
    report = meter.recover()
    assert report.refunded == 0
    assert backend.holds() == [hold]
    assert credits(backend) == 8  # still reserved
    finish.set()
    worker.join(10)
    assert backend.holds() == []
    assert credits(backend) == 8  # the call succeeded: it stays billed, once
    assert meter.recover().refunded == 0


async def test_arecover_leaves_a_call_running_in_another_task_alone(ledger: SQLiteBackend) -> None:
    import asyncio  # noqa: PLC0415 - only this test needs it

    meter = Meter(ledger, recover_on_start=False)
    inside, finish = asyncio.Event(), asyncio.Event()

    async def tool_call() -> None:
        async with meter.aguard(CUSTOMER, "code_exec", call_id="long-running"):
            inside.set()
            await finish.wait()

    task = asyncio.create_task(tool_call())
    await inside.wait()
    assert (await meter.arecover()).refunded == 0
    assert len(ledger.holds()) == 1
    finish.set()
    await task
    assert ledger.holds() == []
    assert credits(ledger) == 8


def wait_for_line(child: subprocess.Popen[str], expected: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline()
    if line.strip() != expected:
        _, err = child.communicate(timeout=10)
        pytest.fail(f"child said {line!r}, not {expected!r}: {err}")


@pytest.mark.slow
def test_recover_leaves_another_live_process_alone_then_refunds_it_once_dead(
    ledger: SQLiteBackend, tmp_path: Path
) -> None:
    child = spawn(HOLDING_CHILD, "sqlite", str(ledger.path), "", "held-call", stdin=True)
    try:
        wait_for_line(child, "holding")
        assert credits(ledger) == 8
        meter = Meter(ledger, recover_on_start=False)
        assert meter.recover().refunded == 0  # its owner is alive
        [hold] = ledger.holds()
        assert hold.owner.split(":")[1] == str(child.pid)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)
    assert not owner_is_alive(hold.owner)

    # two recoveries race, each with its own connection: exactly one refunds
    barrier = threading.Barrier(2)
    reports = []

    def recover() -> None:
        backend = SQLiteBackend(ledger.path)
        racer = Meter(backend, recover_on_start=False)
        barrier.wait()
        reports.append(racer.recover())
        racer.close()

    racers = [threading.Thread(target=recover) for _ in range(2)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(20)
    assert sorted(report.refunded for report in reports) == [0, 1]
    assert credits(ledger) == 10
    assert ledger.holds() == []
    refunds = [e for e in ledger.events(CUSTOMER) if (e.idempotency_key or "").endswith(":refund")]
    assert len(refunds) == 1


@pytest.mark.slow
def test_a_live_process_finishing_after_a_recovery_is_billed_once(ledger: SQLiteBackend) -> None:
    child = spawn(HOLDING_CHILD, "sqlite", str(ledger.path), "", "held-call", stdin=True)
    wait_for_line(child, "holding")
    meter = Meter(ledger, recover_on_start=False)
    assert meter.recover().refunded == 0
    out, err = child.communicate("\n", timeout=20)
    assert "done" in out, err
    assert credits(ledger) == 8
    assert ledger.holds() == []
    assert meter.recover().refunded == 0


@pytest.mark.slow
def test_racing_recoveries_on_a_shared_outbox_refund_a_dead_holder_once(tmp_path: Path) -> None:
    """The remote path: the hold lives in the outbox's journal, not in the ledger."""
    outbox = tmp_path / "outbox.db"
    with AutumnServer() as server:
        server.set_balance(CUSTOMER, 10)
        child = spawn(HOLDING_CHILD, "autumn", server.url, str(outbox), "held-call", stdin=True)
        try:
            wait_for_line(child, "holding")
            assert server.balance(CUSTOMER) == 8
            watcher = Meter(
                AutumnBackend(SECRET, base_url=server.url, timeout=2),
                pricing=pricing(),
                outbox=outbox,
                recover_on_start=False,
            )
            assert watcher.recover().refunded == 0  # alive: left alone
            [(_hold, state)] = watcher.outbox.holds()
            assert state == "held"
            watcher.close(timeout=1)
        finally:
            child.send_signal(signal.SIGKILL)
            child.communicate(timeout=10)

        barrier = threading.Barrier(3)
        reports = []

        def recover() -> None:
            racer = Meter(
                AutumnBackend(SECRET, base_url=server.url, timeout=2),
                pricing=pricing(),
                outbox=outbox,
                recover_on_start=False,
            )
            barrier.wait()
            reports.append(racer.recover())
            racer.flush(timeout=10)
            racer.close(timeout=5)

        racers = [threading.Thread(target=recover) for _ in range(3)]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(30)
        assert sorted(report.refunded for report in reports) == [0, 0, 1]
        assert server.balance(CUSTOMER) == 10
        # one refund, counted once; meters sharing an outbox may each send it (the second
        # send answers 409 duplicate and changes nothing)
        assert list(server.stats.tracks_applied.values()) == [1]
        [key] = server.stats.tracks_received
        assert server.stats.duplicates[key] == server.stats.tracks_received[key] - 1
    assert os.path.exists(outbox)
