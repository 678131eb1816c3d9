"""Faults of delivery (issue 12): an unreadable outbox row, and deadlines that are kept.

Each test reproduces one break found by the fault campaign and failed before its fix.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Meter
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import TrackRequest
from agent_meter.errors import AgentMeterError
from agent_meter.testing import MemoryBackend
from tests.outage_helpers import SECRET, AutumnServer, pricing

# -- 10: one bad outbox row never stops delivery ------------------------------------------------


def _queue_with_a_damaged_first_row(meter: Meter, outbox: Path) -> None:
    meter.outbox.put(
        [
            TrackRequest("cus_1", "web_search", 1, "k-bad", properties={"a": 1}),
            TrackRequest("cus_1", "web_search", 2, "k-good"),
            TrackRequest("cus_2", "web_search", 3, "k-other"),
        ],
        now=time.time() - 10,
    )
    conn = sqlite3.connect(outbox, isolation_level=None)
    conn.execute("UPDATE tracks SET properties = '{not json' WHERE key = 'k-bad'")
    conn.close()


def test_an_undecodable_outbox_row_is_set_aside_and_delivery_goes_on(tmp_path: Path) -> None:
    backend = MemoryBackend(pricing=pricing())
    outbox = tmp_path / "outbox.db"
    meter = Meter(backend, outbox=outbox, recover_on_start=False)
    _queue_with_a_damaged_first_row(meter, outbox)
    with pytest.raises(AgentMeterError, match="k-bad"):  # reported like a rejection
        meter.flush(timeout=5)
    assert meter.flush(timeout=5) == 0  # reported once; the rest was delivered
    assert backend.balances("cus_1")["credits"] == 98
    assert backend.balances("cus_2")["credits"] == 97
    [aside] = meter.outbox.set_aside_entries()
    assert aside.request.idempotency_key == "k-bad"
    assert "unreadable" in (aside.error or "")
    meter.close()


def test_recover_and_close_survive_an_undecodable_row(tmp_path: Path) -> None:
    backend = MemoryBackend(pricing=pricing())
    outbox = tmp_path / "outbox.db"
    meter = Meter(backend, outbox=outbox, recover_on_start=False)
    _queue_with_a_damaged_first_row(meter, outbox)
    report = meter.recover()
    assert report.delivered == 2
    assert report.pending == 0
    meter.close(timeout=2)
    assert backend.balances("cus_1")["credits"] == 98


def test_the_background_deliverer_survives_an_undecodable_row(tmp_path: Path) -> None:
    backend = MemoryBackend(pricing=pricing())
    outbox = tmp_path / "outbox.db"
    meter = Meter(backend, outbox=outbox, recover_on_start=False)
    _queue_with_a_damaged_first_row(meter, outbox)
    meter.deliverer.wake()
    deadline = time.monotonic() + 10
    while meter.outbox.pending() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meter.outbox.pending() == 0
    thread = meter.deliverer._thread
    assert thread is not None
    assert thread.is_alive()
    meter.deliverer.stop()


# -- 11: deadlines are deadlines --------------------------------------------------------------


@pytest.fixture
def hung_server() -> Iterator[AutumnServer]:
    with AutumnServer() as server:
        server.set_mode("hang")
        yield server


def _autumn_meter(server: AutumnServer, outbox: Path) -> Meter:
    backend = AutumnBackend(SECRET, base_url=server.url, timeout=3, max_retries=3)
    return Meter(backend, pricing=pricing(), outbox=outbox, recover_on_start=False)


def _queue(meter: Meter, count: int) -> None:
    requests = [TrackRequest("cus_1", "web_search", 1, f"k{n}") for n in range(count)]
    meter.outbox.put(requests, now=time.time())


@pytest.mark.slow
def test_flush_returns_at_its_timeout_while_the_backend_hangs(
    hung_server: AutumnServer, tmp_path: Path
) -> None:
    meter = _autumn_meter(hung_server, tmp_path / "outbox.db")
    _queue(meter, 5)
    start = time.monotonic()
    assert meter.flush(timeout=1) == 5
    assert time.monotonic() - start < 1.5
    start = time.monotonic()
    meter.close(timeout=1)
    assert time.monotonic() - start < 1.5
    assert meter.outbox.path is not None


@pytest.mark.slow
def test_close_keeps_its_timeout_and_the_tracks_while_the_backend_hangs(
    hung_server: AutumnServer, tmp_path: Path
) -> None:
    outbox = tmp_path / "outbox.db"
    meter = _autumn_meter(hung_server, outbox)
    _queue(meter, 3)
    start = time.monotonic()
    meter.close(timeout=2)
    assert time.monotonic() - start < 3
    hung_server.set_mode("up")
    again = _autumn_meter(hung_server, outbox)
    assert again.flush(timeout=30) == 0
    assert hung_server.balance("cus_1") == 97  # every track delivered, each once
    assert all(n == 1 for n in hung_server.stats.tracks_applied.values())
    again.close()


def test_a_flush_still_delivers_what_is_queued(tmp_path: Path) -> None:
    """Waiting for the background thread must not make a healthy flush slower or lossy."""
    backend = MemoryBackend(pricing=pricing())
    meter = Meter(backend, outbox=tmp_path / "outbox.db", recover_on_start=False)
    backend.fail(method="track")
    for n in range(20):
        meter.track("cus_1", "web_search", 1, idempotency_key=f"k{n}")
    assert meter.outbox.pending() == 20
    backend.heal()
    threads = [threading.Thread(target=meter.flush, args=(10,)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert meter.flush(timeout=5) == 0
    assert backend.balances("cus_1")["credits"] == 80
    meter.close()
