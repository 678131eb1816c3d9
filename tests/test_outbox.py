"""The durable outbox and its deliverer: kept across restarts, retried with back-off, set
aside when rejected for good, delivered before a customer's next check."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent_meter import (
    BackendError,
    BackendUnavailable,
    ConfigError,
    Meter,
    Pricing,
    SQLiteBackend,
)
from agent_meter.delivery import Deliverer, backoff_delay
from agent_meter.engine import Hold, TrackRequest
from agent_meter.meter import default_outbox_path
from agent_meter.outbox import Outbox, Queued
from agent_meter.results import TrackResult
from agent_meter.testing import MemoryBackend

ROOT = Path(__file__).resolve().parent.parent


def request(n: int, customer: str = "cus_1", value: float = 1) -> TrackRequest:
    return TrackRequest(customer, "web_search", value, f"key-{n}", None, {"n": n})


class FlakySend:
    """Delivers into a list; fails as scripted first."""

    def __init__(self, failures: list[Exception] | None = None) -> None:
        self.failures = list(failures or [])
        self.sent: list[str] = []
        self.attempts = 0

    def __call__(self, track: Queued) -> TrackResult:
        self.attempts += 1
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(track.idempotency_key)
        return TrackResult(track.customer_id, track.feature_id, track.value, track.idempotency_key)


# -- the outbox file --------------------------------------------------------------------------


def test_entries_survive_a_restart_with_their_keys(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    first = Outbox(path)
    first.put([request(1), request(2, "cus_2", -2.5)], now=100.0)
    first.put([request(1)], now=101.0)  # the same key again: kept once
    first.close()
    again = Outbox(path)
    entries = again.due(200.0)
    assert [e.request for e in entries] == [request(1), request(2, "cus_2", -2.5)]
    assert again.pending() == 2
    assert again.pending("cus_2") == 1
    again.close()


def test_a_failed_entry_waits_for_its_back_off(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.put([request(1)], now=100.0)
    outbox.retry_later("key-1", "down", at=130.0)
    assert outbox.due(120.0) == []
    assert outbox.next_due() == 130.0
    [entry] = outbox.due(130.0)
    assert (entry.attempts, entry.error) == (1, "down")
    # a customer's drain ignores back-off: the check must see every earlier track
    assert len(outbox.due(120.0, customer_id="cus_1")) == 1


def test_closing_a_hold_queues_its_refund_only_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    hold = Hold("h1", "cus_1", "code_exec", 1, None, "r1", "host:1:1", 0.0)
    outbox.open_hold(hold)
    outbox.mark_held("h1")
    assert outbox.holds() == [(hold, "held")]
    assert outbox.put([hold.refund()], now=1.0, close_hold="h1")
    outbox.delivered("r1")
    # a second settlement of the same hold (a racing recovery) queues nothing
    assert not outbox.put([hold.refund()], now=2.0, close_hold="h1")
    assert outbox.pending() == 0
    assert outbox.holds() == []


def test_backoff_is_exponential_capped_and_jittered() -> None:
    for attempts in range(12):
        ceiling = min(5.0, 0.1 * 2**attempts)
        delays = [backoff_delay(attempts, base=0.1, cap=5.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1  # jitter: processes do not retry in lockstep


def test_the_default_outbox_sits_next_to_the_ledger(tmp_path: Path, pricing: Pricing) -> None:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
    assert default_outbox_path(backend) == tmp_path / "usage.outbox.db"
    assert default_outbox_path(MemoryBackend(pricing=pricing)) is None
    backend.close()


# -- the deliverer ---------------------------------------------------------------------------


def test_delivery_stops_at_an_outage_and_resumes_in_order(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.put([request(n) for n in range(3)], now=0.0)
    send = FlakySend([BackendUnavailable("down")])
    deliverer = Deliverer(outbox, send, clock=lambda: 10.0, base_delay=1.0)
    assert deliverer.run_once() is False
    assert send.attempts == 1  # the rest was not hammered
    # key-0 waits for its back-off, and holds back its customer's later tracks (order
    # matters: a track capped at 0 and a refund give another balance in the other order)
    outbox.put([request(9, "cus_other")], now=5.0)
    assert [e.request.idempotency_key for e in outbox.due(10.0)] == ["key-9"]
    assert deliverer.flush(timeout=5) == 0
    assert send.sent == ["key-0", "key-1", "key-2", "key-9"]
    assert deliverer.delivered == 4


def test_a_rejected_track_is_set_aside_and_reported_once(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.put([request(1), request(2)], now=0.0)
    send = FlakySend([ConfigError("no such feature")])
    deliverer = Deliverer(outbox, send)
    with pytest.raises(ConfigError, match="no such feature"):
        deliverer.flush(timeout=5)
    assert send.sent == ["key-2"]  # the next one was not held back by the bad one
    [aside] = outbox.set_aside_entries()
    assert aside.request.idempotency_key == "key-1"
    assert deliverer.flush(timeout=1) == 0  # reported once, never retried
    assert send.attempts == 2


def test_a_bug_in_the_backend_does_not_lose_the_track(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.put([request(1)], now=0.0)
    send = FlakySend([RuntimeError("bug")])
    deliverer = Deliverer(outbox, send)
    assert deliverer.run_once() is False
    assert outbox.pending() == 1
    assert deliverer.flush(timeout=5) == 0
    assert send.sent == ["key-1"]


def test_flush_gives_up_at_its_timeout_and_keeps_the_tracks(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.put([request(1)], now=0.0)
    deliverer = Deliverer(outbox, FlakySend([BackendUnavailable("down")] * 1000))
    assert deliverer.flush(timeout=0.3) == 1
    assert outbox.pending() == 1


# -- through the meter, on local backends -----------------------------------------------------


def credits(backend: MemoryBackend | SQLiteBackend, customer: str = "cus_1") -> float:
    return float(backend.balances(customer)["credits"])


def test_a_check_delivers_the_customers_queued_tracks_first(memory_backend: MemoryBackend) -> None:
    meter = Meter(memory_backend)
    memory_backend.fail(method="track", times=1)
    queued = meter.track("cus_1", "web_search", 5, idempotency_key="q")
    assert queued.queued
    assert meter.check("cus_1", "web_search").balance == 95  # never looks larger than it is
    assert meter.outbox.pending() == 0


async def test_a_check_delivers_the_customers_queued_tracks_first_async(
    memory_backend: MemoryBackend,
) -> None:
    meter = Meter(memory_backend)
    memory_backend.fail(method="track", times=1)
    assert (await meter.atrack("cus_1", "web_search", 5, idempotency_key="q")).queued
    assert (await meter.acheck("cus_1", "web_search")).balance == 95


def test_a_guard_refuses_when_earlier_usage_cannot_be_delivered(
    memory_backend: MemoryBackend,
) -> None:
    """Under deny, a balance that may be stale must not admit a call."""
    meter = Meter(memory_backend)
    memory_backend.fail(method="track")
    meter.track("cus_1", "web_search", 5, idempotency_key="q")
    with pytest.raises(BackendUnavailable, match="billing service is unreachable"):
        meter.guard("cus_1", "web_search").__enter__()
    memory_backend.heal()
    with meter.guard("cus_1", "web_search"):
        pass
    assert credits(memory_backend) == 94


def test_sqlite_usage_queued_during_a_lock_is_delivered_by_flush(
    sqlite_backend: SQLiteBackend,
) -> None:
    meter = Meter(sqlite_backend)
    usage_key = "am1:cus_1::web_search:busy:track"
    # the ledger is "busy": the inline track fails and waits in the outbox next to it
    original = sqlite_backend.track

    def busy(*args: object, **kwargs: object) -> TrackResult:
        raise BackendUnavailable("database is locked")

    sqlite_backend.track = busy  # type: ignore[method-assign]
    assert meter.track("cus_1", "web_search", 3, idempotency_key="busy").queued
    assert meter.outbox.path == sqlite_backend.path.with_name("usage.outbox.db")
    sqlite_backend.track = original  # type: ignore[method-assign]
    assert meter.flush(timeout=5) == 0
    assert [e.idempotency_key for e in sqlite_backend.events("cus_1")] == [usage_key]
    assert credits(sqlite_backend) == 97


async def test_sync_flush_after_the_async_callers_loop_closed(
    memory_backend: MemoryBackend,
) -> None:
    meter = Meter(memory_backend)
    memory_backend.fail(method="track")

    async def caller() -> None:
        with pytest.raises(RuntimeError):
            async with meter.aguard("cus_1", "code_exec", call_id="c1"):
                raise RuntimeError

    await asyncio.to_thread(asyncio.run, caller())  # a loop of its own, closed after
    assert meter.outbox.pending() == 1  # the refund
    memory_backend.heal()
    assert meter.flush(timeout=5) == 0
    assert credits(memory_backend) == 100


# -- a normal exit says what it leaves behind -------------------------------------------------

EXIT_CHILD = textwrap.dedent(
    """
    import sys
    from agent_meter import Meter, SQLiteBackend
    from agent_meter.errors import BackendUnavailable
    backend = SQLiteBackend(sys.argv[1], pricing=None)
    meter = Meter(backend)
    def down(*args, **kwargs):
        raise BackendUnavailable("ledger unreachable")
    backend.track = down
    meter.track("cus_1", "web_search", 1, idempotency_key="left-behind")
    print("pending", meter.outbox.pending(), flush=True)
    # no close(): the interpreter exits normally with the meter open
    """
)


@pytest.mark.slow
def test_a_normal_exit_with_undelivered_usage_says_so(tmp_path: Path, pricing: Pricing) -> None:
    db = tmp_path / "usage.db"
    SQLiteBackend(db, pricing=pricing).close()
    child = subprocess.run(
        [sys.executable, "-c", EXIT_CHILD, str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert "pending 1" in child.stdout
    assert "1 tracks not delivered yet" in child.stderr
    assert "usage.outbox.db" in child.stderr  # where they wait
    # and the next meter on the same files delivers them
    backend = SQLiteBackend(db)
    meter = Meter(backend)
    assert meter.flush(timeout=5) == 0
    assert credits(backend) == 99
    meter.close()


def test_outbox_failures_are_errors_of_the_tree(tmp_path) -> None:
    outbox = Outbox(tmp_path / "o.db")
    outbox.close()
    operations = (outbox.pending, lambda: outbox.delivered("k"), lambda: outbox.close_hold("k"))
    for operation in operations:
        with pytest.raises(BackendError, match="Outbox"):
            operation()


def test_remote_meters_on_different_accounts_never_share_a_default_outbox(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from agent_meter.backends.autumn import AutumnBackend  # noqa: PLC0415 - optional SDK

    monkeypatch.delenv("AGENT_METER_OUTBOX")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    one = default_outbox_path(AutumnBackend("am_sk_test_one"))
    again = default_outbox_path(AutumnBackend("am_sk_test_one"))
    other_key = default_outbox_path(AutumnBackend("am_sk_test_two"))
    other_server = default_outbox_path(AutumnBackend("am_sk_test_one", base_url="http://x"))
    assert one == again
    assert len({one, other_key, other_server}) == 3
    assert one is not None
    assert one.parent == tmp_path / "agent_meter"
    assert "am_sk" not in str(one)  # the key is hashed, never written into a path
