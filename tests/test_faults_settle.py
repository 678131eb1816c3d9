"""A success stays billed whatever happens to its bookkeeping (issue 12, point 1).

The block's own result or exception always reaches the caller: a bookkeeping failure
after it goes to the hooks and the log, and what could not be written is written later
(the next call, ``flush()``, ``close()``). ``meter.close()`` while calls run lets them
settle first. Embedded ledger and the local Autumn-shaped server alike.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.engine import Strategy
from agent_meter.errors import BackendUnavailable
from agent_meter.hooks import Event, SettleFailed
from tests.conftest import PRICING_TOML
from tests.outage_helpers import AutumnServer, autumn_meter

DEAD_OWNER = f"{socket.gethostname()}:999999999:1"  # no such pid: provably dead
STRATEGIES: list[Strategy] = ["reserve", "lock"]


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    """An Autumn-shaped server (customers start with 100 credits)."""
    with AutumnServer() as running:
        yield running


def _failing_once(target: object, name: str) -> None:
    """Make ``target.name`` raise BackendUnavailable on its next call only."""
    real: Callable[..., Any] = getattr(target, name)
    calls = iter([True])

    def fail_once(*args: Any, **kwargs: Any) -> Any:
        if next(calls, False):
            msg = "disk full"
            raise BackendUnavailable(msg)
        return real(*args, **kwargs)

    setattr(target, name, fail_once)


def _events(meter: Meter) -> list[Event]:
    seen: list[Event] = []
    meter.add_hook(seen.append)
    return seen


def _bad_tool(meter: Meter, **guard: Any) -> None:
    with meter.guard("cus", "web_search", 2, call_id="c1", **guard):
        msg = "the tool's own error"
        raise ValueError(msg)


def _good_tool(meter: Meter, **guard: Any) -> str:
    with meter.guard("cus", "web_search", 2, call_id="c1", **guard):
        return "the tool's result"


def _dead_journal(outbox: Path) -> None:
    """The process that wrote the outbox's holds is gone."""
    conn = sqlite3.connect(outbox, isolation_level=None)
    conn.execute("UPDATE holds SET owner = ?", (DEAD_OWNER,))
    conn.close()


# -- the block's outcome is never replaced by a bookkeeping error ----------------------------


def test_a_failing_settle_never_replaces_the_tools_exception(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=Pricing.from_toml(PRICING_TOML))
    meter = Meter(backend, outbox=tmp_path / "outbox.db", recover_on_start=False)
    seen = _events(meter)
    _failing_once(backend, "release")
    _failing_once(meter.outbox, "put")  # the refund cannot even be queued
    with pytest.raises(ValueError, match="the tool's own error"):
        _bad_tool(meter)
    [failed] = [event for event in seen if isinstance(event, SettleFailed)]
    assert "disk full" in failed.error
    assert not failed.succeeded
    assert meter.flush(timeout=5) == 0  # written later: the refund is given
    assert backend.holds() == []
    assert backend.balances("cus")["credits"] == 100
    meter.close()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_success_on_autumn_stays_billed_when_its_hold_cannot_be_closed(
    server: AutumnServer, tmp_path: Path, strategy: Strategy
) -> None:
    meter = autumn_meter(server, tmp_path / "outbox.db", strategy)
    seen = _events(meter)
    _failing_once(meter.outbox, "close_hold" if strategy == "reserve" else "put")
    assert _good_tool(meter) == "the tool's result"  # not the outbox's error
    assert any(isinstance(event, SettleFailed) and event.succeeded for event in seen)
    assert meter.flush(timeout=5) == 0
    meter.close(timeout=1)
    _dead_journal(tmp_path / "outbox.db")  # the process ends
    later = autumn_meter(server, tmp_path / "outbox.db", strategy)
    assert later.recover().refunded == 0
    assert later.flush(timeout=5) == 0
    assert server.balance("cus") == 98  # billed once, never refunded
    assert server.open_locks() == {}
    later.close(timeout=1)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_failure_on_autumn_is_refunded_when_its_settle_fails_at_first(
    server: AutumnServer, tmp_path: Path, strategy: Strategy
) -> None:
    meter = autumn_meter(server, tmp_path / "outbox.db", strategy)
    _failing_once(meter.outbox, "put")
    with pytest.raises(ValueError, match="the tool's own error"):
        _bad_tool(meter)
    assert meter.flush(timeout=5) == 0
    assert server.balance("cus") == 100
    assert server.open_locks() == {}
    assert meter.outbox.holds() == []
    meter.close(timeout=1)


# -- close() while calls run ----------------------------------------------------------------


@pytest.mark.parametrize("close_timeout", [10.0, 0.2])
def test_close_while_calls_run_lets_them_settle_and_bill(
    tmp_path: Path, close_timeout: float
) -> None:
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=Pricing.from_toml(PRICING_TOML))
    meter = Meter(backend, outbox=tmp_path / "outbox.db", recover_on_start=False)
    inside = threading.Barrier(6)
    go = threading.Event()
    outcomes: list[object] = []

    def call(n: int) -> None:
        try:
            with meter.guard("cus", "code_exec", 1, call_id=f"c{n}"):
                inside.wait()
                go.wait()
            outcomes.append("billed")
        except Exception as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=call, args=(n,)) for n in range(5)]
    for thread in threads:
        thread.start()
    inside.wait()  # every call is running its block
    closer = threading.Thread(target=meter.close, kwargs={"timeout": close_timeout})
    closer.start()
    closer.join(0.5)
    go.set()  # the calls finish after close() began (after it returned, at 0.2 s)
    for thread in [*threads, closer]:
        thread.join(10)
    assert outcomes == ["billed"] * 5
    ledger = SQLiteBackend(path)
    assert ledger.holds() == []  # every hold closed: nothing for a recovery to refund
    assert ledger.balances("cus")["credits"] == 90


async def test_aclose_while_async_calls_run_lets_them_settle_and_bill(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    backend = SQLiteBackend(path, pricing=Pricing.from_toml(PRICING_TOML))
    meter = Meter(backend, outbox=tmp_path / "outbox.db", recover_on_start=False)
    go = asyncio.Event()

    async def call(n: int) -> str:
        async with meter.aguard("cus", "code_exec", 1, call_id=f"c{n}"):
            await go.wait()
        return "billed"

    tasks = [asyncio.create_task(call(n)) for n in range(5)]
    await asyncio.sleep(0.3)  # every call is running its block
    closing = asyncio.create_task(meter.aclose(timeout=10))
    await asyncio.sleep(0.2)
    go.set()
    assert await asyncio.gather(*tasks) == ["billed"] * 5
    await closing
    ledger = SQLiteBackend(path)
    assert ledger.holds() == []
    assert ledger.balances("cus")["credits"] == 90
