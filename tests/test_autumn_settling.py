"""Calls whose outcome Autumn left open: a reserve whose answer was lost, a lock gone
before its confirm (issue 13, points 6; issue 12, point 8).

A refused call must never stay billed, nothing may be closed without a trace, and nothing
is retried forever. Everything runs against the local Autumn-shaped server of
:mod:`tests.outage_helpers` through the real :class:`AutumnBackend`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Meter
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import FailPolicy, Strategy
from agent_meter.hooks import Billed, Event, LockGone
from tests.outage_helpers import SECRET, AutumnServer, pricing


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    with AutumnServer() as running:
        yield running


def make_meter(
    server: AutumnServer, tmp_path: Path, policy: FailPolicy, strategy: Strategy
) -> tuple[Meter, list[Event]]:
    backend = AutumnBackend(
        SECRET, base_url=server.url, timeout=0.3, max_retries=1, backoff=0.01, max_backoff=0.02
    )
    meter = Meter(
        backend,
        pricing=pricing(),
        outbox=tmp_path / "outbox.db",
        on_backend_error=policy,
        strategy=strategy,
    )
    events: list[Event] = []
    meter.add_hook(events.append)
    return meter, events


# -- a confirm after the lock expired (issue 13, point 4 of the follow-up) ----------------------


def test_a_confirm_after_the_lock_expired_settles_the_call_unbilled(
    server: AutumnServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    meter, events = make_meter(server, tmp_path, "deny", "lock")
    with meter.guard("cus_exp", "code_exec", call_id="slow"):
        [lock_id] = server.open_locks()
        server.expire_lock(lock_id)  # the call outlived its lock: Autumn released it
    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        assert meter.flush(timeout=5) == 0  # nothing raised, nothing left to retry
    assert server.balance("cus_exp") == 100  # released by Autumn: nothing charged
    assert server.stats.finalized["confirm"] == 0
    gone = [event for event in events if isinstance(event, LockGone)]
    assert [event.request.lock_id for event in gone] == [lock_id]
    assert gone[0].request.action == "confirm"
    assert any(isinstance(event, Billed) for event in events)  # what the caller was told
    assert "stays unbilled" in caplog.text
    assert meter.outbox.set_aside_entries() == []
    meter.close(timeout=2)


def test_a_release_of_a_lock_already_gone_is_no_event(server: AutumnServer, tmp_path: Path) -> None:
    meter, events = make_meter(server, tmp_path, "deny", "lock")

    def fails() -> None:
        with meter.guard("cus_rel", "code_exec", call_id="fails"):
            [lock_id] = server.open_locks()
            server.expire_lock(lock_id)
            raise RuntimeError("tool failed")

    with pytest.raises(RuntimeError):
        fails()
    assert meter.flush(timeout=5) == 0
    assert server.balance("cus_rel") == 100
    assert not [event for event in events if isinstance(event, LockGone)]
    meter.close(timeout=2)
