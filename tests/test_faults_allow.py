"""The ``allow`` cap holds per customer across processes and across flaps (issue 12, point 5).

Under ``on_backend_error="allow"`` a call whose check cannot reach the backend runs
unverified and is billed afterwards; a customer without credits gets that work free (its
track is capped at 0), so the cap bounds what an outage can give away. It is counted in
the outbox, shared by every process that uses it, and it starts again only once the outage
is over for the customer: its queue delivered and a verified check admitting a call.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import BackendUnavailable, Meter, UsageLimitExceeded
from tests.outage_helpers import AutumnServer, autumn_meter

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server() -> Iterator[AutumnServer]:
    """An Autumn-shaped server on which the customer ``broke`` has no credits."""
    with AutumnServer() as running:
        running.set_balance("broke", 0)
        yield running


def _allow(server: AutumnServer, tmp_path: Path, limit: int) -> Meter:
    meter = autumn_meter(server, tmp_path / "outbox.db")
    meter.on_backend_error = "allow"
    meter.unverified_limit = limit
    return meter


def _ran(meter: Meter, customer: str, call_id: str) -> bool:
    try:
        with meter.guard(customer, "web_search", call_id=call_id):
            return True
    except (BackendUnavailable, UsageLimitExceeded):
        return False


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tests.outage_helpers import AutumnServer, autumn_meter

    url, outbox, name = sys.argv[1:]
    server = AutumnServer()
    server._port = int(url.rsplit(":", 1)[1])  # only its url is used
    meter = autumn_meter(server, Path(outbox))
    meter.on_backend_error = "allow"
    meter.unverified_limit = 3
    ran = 0
    for n in range(5):
        try:
            with meter.guard("broke", "web_search", call_id=f"{name}-{n}"):
                ran += 1
        except Exception:
            pass
    print("ran", ran, flush=True)
    """
)


@pytest.mark.slow
def test_four_processes_share_one_cap(server: AutumnServer, tmp_path: Path) -> None:
    server.set_mode("refuse")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, server.url, str(tmp_path / "outbox.db"), f"p{n}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    ran = 0
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        ran += int(out.split()[-1])
    assert ran == 3  # not 12: the cap is the customer's, whichever process runs the call


def test_a_flapping_backend_gives_no_new_allowance(server: AutumnServer, tmp_path: Path) -> None:
    meter = _allow(server, tmp_path, limit=3)
    ran = 0
    for flap in range(4):
        server.set_mode("refuse")
        ran += sum(_ran(meter, "broke", f"down-{flap}-{n}") for n in range(5))
        server.set_mode("up")
        # the queue is delivered (capped at 0), and the verified check refuses the call
        assert not _ran(meter, "broke", f"up-{flap}")
    assert ran == 3  # not 12
    assert meter.flush(timeout=5) == 0
    meter.close(timeout=1)


def test_a_success_while_the_queue_waits_gives_no_new_allowance(
    server: AutumnServer, tmp_path: Path
) -> None:
    """Another process's verified call does not end the outage while this queue waits."""
    down = _allow(server, tmp_path, limit=3)
    other = _allow(server, tmp_path, limit=3)  # another process on the same outbox
    down.deliverer._base = other.deliverer._base = 60.0  # the queue waits
    server.set_mode("refuse")
    assert sum(_ran(down, "cus", f"d{n}") for n in range(5)) == 3
    server.set_mode("up")
    assert _ran(other, "cus", "verified")  # a verified call, while 3 tracks still wait
    server.set_mode("refuse")
    assert not _ran(other, "cus", "again")
    server.set_mode("up")
    assert other.flush(timeout=5) == 0  # the outage is over: its queue is delivered
    assert _ran(other, "cus", "verified-2")
    server.set_mode("refuse")
    assert sum(_ran(other, "cus", f"e{n}") for n in range(5)) == 3  # a new outage
    down.close(timeout=0.5)
    other.close(timeout=0.5)
