"""Calls whose outcome Autumn left open: a reserve whose answer was lost, a lock gone
before its confirm (issue 13, points 6; issue 12, point 8).

A refused call must never stay billed, nothing may be closed without a trace, and nothing
is retried forever. Everything runs against the local Autumn-shaped server of
:mod:`tests.outage_helpers` through the real :class:`AutumnBackend`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent_meter import BackendUnavailable, Meter
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.engine import (
    CheckRequest,
    FailPolicy,
    MeteredCall,
    Strategy,
    TrackRequest,
    hold_for,
)
from agent_meter.hooks import Billed, Event, LockGone, ReserveInDoubt
from agent_meter.owner import current_owner
from agent_meter.results import TrackResult
from tests.outage_helpers import SECRET, AutumnServer, arun_guarded, pricing, run_guarded


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    with AutumnServer() as running:
        yield running


def autumn(server: AutumnServer) -> AutumnBackend:
    return AutumnBackend(
        SECRET, base_url=server.url, timeout=0.3, max_retries=1, backoff=0.01, max_backoff=0.02
    )


def make_meter(
    server: AutumnServer, tmp_path: Path, policy: FailPolicy, strategy: Strategy
) -> tuple[Meter, list[Event]]:
    meter = Meter(
        autumn(server),
        pricing=pricing(),
        outbox=tmp_path / "outbox.db",
        on_backend_error=policy,
        strategy=strategy,
        recover_on_start=False,
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


# -- a reserve whose answer was lost (issue 13, point 6; issue 12, point 8) ---------------------


def in_doubt(events: list[Event]) -> list[ReserveInDoubt]:
    return [event for event in events if isinstance(event, ReserveInDoubt)]


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_a_refused_reserve_that_landed_is_never_billed_when_the_server_returns(
    server: AutumnServer, tmp_path: Path, policy: FailPolicy
) -> None:
    """The server applies the reserve, then hangs: the caller is refused, and the reserve
    it never saw the answer of is refunded once the server answers, under a key of its own."""
    meter, events = make_meter(server, tmp_path, policy, "reserve")
    assert run_guarded(meter, "cus_h6", "before") == "ran"
    server.set_mode("hang", after_apply=True)
    with pytest.raises(BackendUnavailable, match="billing service is unreachable"):
        run_guarded(meter, "cus_h6", "refused")
    assert server.balance("cus_h6") == 98  # the refused call's reserve did land
    [doubt] = in_doubt(events)
    assert (doubt.customer_id, doubt.units, doubt.reconciled) == ("cus_h6", 1, True)
    assert meter.outbox.holds() == []  # not left open: a void waits in the outbox instead
    assert meter.outbox.pending() == 1
    server.set_mode("up")
    assert meter.flush(timeout=10) == 0
    assert server.balance("cus_h6") == 99  # only the call that ran is billed
    assert server.stats.tracks_applied == {f"{doubt.key}.void": 1}
    meter.close(timeout=2)


def test_a_refused_reserve_that_never_landed_is_not_refunded_and_can_never_land(
    server: AutumnServer, tmp_path: Path
) -> None:
    """The server hangs without applying: nothing to give back (a refund would be free
    credits), and the reserve's key is spent, so a late copy of it deducts nothing."""
    meter, events = make_meter(server, tmp_path, "deny", "reserve")
    assert run_guarded(meter, "cus_n6", "before") == "ran"
    server.set_mode("hang")
    with pytest.raises(BackendUnavailable, match="billing service is unreachable"):
        run_guarded(meter, "cus_n6", "refused")
    server.set_mode("up")
    assert meter.flush(timeout=10) == 0
    assert server.balance("cus_n6") == 99
    assert not server.stats.tracks_received  # no refund was sent
    [doubt] = in_doubt(events)
    late = CheckRequest("cus_n6", "web_search", 1, True, idempotency_key=doubt.key)
    backend = autumn(server)
    with pytest.raises(BackendUnavailable) as info:
        backend.check(late)  # the reserve arriving late: its key is taken
    assert info.value.maybe_applied
    assert server.balance("cus_n6") == 99
    backend.close()
    meter.close(timeout=2)


async def test_a_refused_reserve_that_landed_is_never_billed_async(
    server: AutumnServer, tmp_path: Path
) -> None:
    meter, events = make_meter(server, tmp_path, "deny", "reserve")
    assert await arun_guarded(meter, "cus_a6", "before") == "ran"
    server.set_mode("hang", after_apply=True)
    with pytest.raises(BackendUnavailable, match="billing service is unreachable"):
        await arun_guarded(meter, "cus_a6", "refused")
    server.set_mode("up")
    assert await meter.aflush(timeout=10) == 0
    assert server.balance("cus_a6") == 99
    assert len(in_doubt(events)) == 1
    await meter.aclose(timeout=2)


def test_a_void_waiting_for_the_server_is_tried_again_and_counted_once(
    server: AutumnServer, tmp_path: Path
) -> None:
    """While the server stays down the void waits (no refund sent blind); once it is up the
    refund goes once, however often the void was tried."""
    meter, _ = make_meter(server, tmp_path, "deny", "reserve")
    server.set_mode("hang", after_apply=True)
    with pytest.raises(BackendUnavailable):
        run_guarded(meter, "cus_w6", "refused")
    server.set_mode("503")
    assert meter.flush(timeout=1) == 1  # still waiting, not given up nor set aside
    assert meter.outbox.set_aside_entries() == []
    server.set_mode("up")
    assert meter.flush(timeout=10) == 0
    assert meter.flush(timeout=1) == 0
    assert server.balance("cus_w6") == 100
    assert sum(server.stats.tracks_applied.values()) == 1
    meter.close(timeout=2)


def test_recover_voids_a_reserve_whose_process_died_asking(
    server: AutumnServer, tmp_path: Path
) -> None:
    """Issue 12, point 8: a process died between sending a keyed reserve and its answer. The
    reserve landed; its call never ran. recover() records it and gives it back, once."""
    call = MeteredCall("cus_d8", "code_exec", 1, "died")
    owner = current_owner().split(":")
    owner[2] = "1"  # this pid with another start time: a process that is gone
    hold = hold_for(call, ":".join(owner), time.time(), "dead0001")
    backend = autumn(server)
    reserve = CheckRequest("cus_d8", "code_exec", 1, True, idempotency_key=hold.key)
    assert backend.check(reserve).deducted  # what the dead process sent
    backend.close()
    meter, events = make_meter(server, tmp_path, "deny", "reserve")
    meter.outbox.open_hold(hold)  # journaled before the check; never marked held
    assert server.balance("cus_d8") == 98
    report = meter.recover()
    assert (report.uncertain, report.refunded) == (1, 0)
    assert meter.flush(timeout=10) == 0
    assert server.balance("cus_d8") == 100
    [doubt] = in_doubt(events)
    assert (doubt.key, doubt.reconciled) == (hold.key, True)
    assert meter.recover().uncertain == 0  # voided once
    assert meter.outbox.holds() == []
    meter.close(timeout=2)


def test_a_void_whose_refund_is_lost_is_sent_again_under_its_key(
    server: AutumnServer, tmp_path: Path
) -> None:
    """The probe said 'received', then the refund's answer was lost: the void is tried again,
    asks again (409 again) and resends the refund under the same key: counted once."""
    meter, _ = make_meter(server, tmp_path, "deny", "reserve")
    server.set_mode("hang", after_apply=True)
    with pytest.raises(BackendUnavailable):
        run_guarded(meter, "cus_r6", "refused")
    server.set_mode("up")
    track = meter.backend.track
    lost = {"left": 1}

    def lose_the_first_answer(request: TrackRequest) -> TrackResult:
        result = track(request)
        if lost["left"]:
            lost["left"] -= 1
            raise BackendUnavailable("the answer was lost")
        return result

    meter.backend.track = lose_the_first_answer  # type: ignore[method-assign]
    assert meter.flush(timeout=10) == 0
    assert server.balance("cus_r6") == 100
    [(key, count)] = server.stats.tracks_received.items()
    assert count == 2
    assert key.endswith(".void")
    assert server.stats.tracks_applied[key] == 1
    meter.close(timeout=2)


def test_hold_keys_and_void_keys_never_meet() -> None:
    call = MeteredCall("cus_1", "web_search", 1, "c1")
    hold = hold_for(call, "o", 0.0, "a1")
    void = hold.void()
    keys = {hold.key, hold.refund_key, void.refund().idempotency_key, call.key("track")}
    assert len(keys) == 4
    assert void.idempotency_key == hold.key
    assert dataclasses.astuple(void)[1:] == ("cus_1", "web_search", 1, None, False)


def test_a_void_whose_question_lost_its_answer_never_refunds_a_reserve_that_never_came(
    server: AutumnServer, tmp_path: Path
) -> None:
    """Found by the SIGKILL test under load: a question that spent the reserve's key and
    lost its answer made the next question answer 409, read as 'received', and the void
    refunded credits never taken. Asking now leaves the key free; it is spent afterwards."""
    meter, _ = make_meter(server, tmp_path, "deny", "reserve")
    assert run_guarded(meter, "cus_q8", "before") == "ran"
    server.set_mode("hang")  # the reserve never lands: 503 once the hang ends
    with pytest.raises(BackendUnavailable):
        run_guarded(meter, "cus_q8", "refused")
    server.set_mode("up")
    backend = meter.backend
    assert isinstance(backend, AutumnBackend)
    send = backend._request
    lost = {"left": 1}

    def lose_the_first_keyed_answer(call: Any) -> dict[str, Any]:
        answer = send(call)  # it reached Autumn and did whatever it does
        if call.key is not None and lost["left"]:
            lost["left"] -= 1
            raise BackendUnavailable("the answer was lost")
        return answer

    backend._request = lose_the_first_keyed_answer  # type: ignore[method-assign]
    assert meter.flush(timeout=10) == 0
    assert lost["left"] == 0
    assert not server.stats.tracks_received  # nothing refunded: nothing was taken
    assert server.balance("cus_q8") == 99
    meter.close(timeout=2)
