"""Many concurrent calls against an Autumn that fails open, or is merely busy.

Issue 13, measured on a real server: 200 concurrent guarded calls on a new customer were
answered ``202 allowed`` (no balance, nothing deducted) and ran free, and refunds of those
"reservations" handed out credits never taken (point 1); with many concurrent calls on
one customer, the meter reported a healthy Autumn unreachable (point 5). Here the local
Autumn-shaped server fails open the first checks of every new customer while 200 threads
guard calls, on both reserving strategies.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from agent_meter import BackendUnavailable, Meter, UsageLimitExceeded
from agent_meter.backends.autumn import AutumnBackend
from agent_meter.delivery import Deliverer
from agent_meter.engine import Strategy, TrackRequest
from agent_meter.outbox import Outbox, Queued
from tests.outage_helpers import SECRET, AutumnServer, pricing

THREADS = 200


def _meter(url: str, tmp_path: Path, strategy: Strategy, policy: str, **options: object) -> Meter:
    backend = AutumnBackend(SECRET, base_url=url, timeout=5, max_retries=1, backoff=0.01)
    return Meter(
        backend,
        pricing=pricing(),
        outbox=tmp_path / f"{strategy}-{policy}.db",
        strategy=strategy,
        on_backend_error=policy,  # type: ignore[arg-type]
        **options,  # type: ignore[arg-type]
    )


def _storm(meter: Meter, customer: str) -> dict[str, int]:
    """200 threads, one guarded call each; every 5th call fails after running."""
    outcomes: dict[str, int] = {"ran": 0, "succeeded": 0, "unverified": 0}
    refused: dict[str, int] = {"denied": 0, "unavailable": 0}
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def one(n: int) -> None:
        barrier.wait()
        try:
            with meter.guard(customer, "web_search", call_id=f"storm-{n}") as call:
                with lock:
                    outcomes["ran"] += 1
                    outcomes["unverified"] += call.check is None
                if n % 5 == 0:
                    raise RuntimeError("the tool failed")
            with lock:
                outcomes["succeeded"] += 1
        except RuntimeError:
            pass
        except UsageLimitExceeded:
            with lock:
                refused["denied"] += 1
        except BackendUnavailable:
            with lock:
                refused["unavailable"] += 1

    threads = [threading.Thread(target=one, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes | refused


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["reserve", "lock"])
def test_failopen_answers_under_deny_never_let_a_call_run_unbilled(
    strategy: Strategy, tmp_path: Path
) -> None:
    with AutumnServer(failopen_first=30) as server:
        meter = _meter(server.url, tmp_path, strategy, "deny")
        seen = _storm(meter, "cus_new")
        assert meter.flush(timeout=30) == 0
        billed = 100 - server.balance("cus_new")
        open_locks = server.open_locks()
        failed_open = server.stats.failed_open
        meter.close(timeout=5)
    assert failed_open >= 30  # the server did fail open
    assert seen["unverified"] == 0  # under deny, a 202 never admits a call
    assert seen["unavailable"] > 0  # some were refused as unreachable instead
    assert billed == seen["succeeded"]  # every call that ran and succeeded billed, once
    assert billed <= 100  # and never more than the balance
    assert seen["ran"] <= 100 + seen["ran"] - seen["succeeded"]
    assert open_locks == {}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["reserve", "lock"])
def test_failopen_answers_under_allow_stay_within_the_unverified_cap(
    strategy: Strategy, tmp_path: Path
) -> None:
    with AutumnServer(failopen_first=10_000) as server:  # every check fails open
        meter = _meter(server.url, tmp_path, strategy, "allow", unverified_limit=10)
        seen = _storm(meter, "cus_new")
        assert meter.flush(timeout=30) == 0
        billed = 100 - server.balance("cus_new")
        meter.close(timeout=5)
    assert seen["ran"] == seen["unverified"] == 10  # the cap, then fail closed
    assert seen["unavailable"] == THREADS - 10
    assert billed == seen["succeeded"]  # unverified successes billed by a keyed track


# -- point 5: a busy customer is not an outage ---------------------------------------------


@pytest.mark.slow
def test_concurrent_calls_on_one_customer_never_report_a_false_outage(tmp_path: Path) -> None:
    """check_then_track queues each call's track; the next check delivers it first."""
    with AutumnServer() as server:
        server.set_balance("cus_busy", 10_000)
        meter = _meter(server.url, tmp_path, "check_then_track", "deny")
        errors: list[BaseException] = []
        barrier = threading.Barrier(20)

        def worker(n: int) -> None:
            barrier.wait()
            for m in range(30):
                try:
                    with meter.guard("cus_busy", "web_search", call_id=f"b{n}-{m}"):
                        pass
                except BackendUnavailable as exc:
                    errors.append(exc)

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert meter.flush(timeout=30) == 0
        billed = 10_000 - server.balance("cus_busy")
        meter.close(timeout=5)
    assert errors == []
    assert billed == 600


def test_drain_is_not_a_failure_when_another_thread_queued_meanwhile(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox.db")
    sent: list[str] = []

    def send(request: Queued) -> object:
        sent.append(request.idempotency_key)
        if len(sent) == 1:  # another call queues a track while this one is delivered
            outbox.put([TrackRequest("cus", "web_search", 1, "later")], now=0)
        return None

    deliverer = Deliverer(outbox, send)
    outbox.put([TrackRequest("cus", "web_search", 1, "first")], now=0)
    assert deliverer.drain("cus") is True  # the backend took everything it was given
    assert sent[0] == "first"
    outbox.close()
