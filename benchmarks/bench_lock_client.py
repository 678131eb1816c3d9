"""Why the v2 lock routes go over plain httpx: the client's own cost of one lock.

The same local Autumn-shaped server (``tests/outage_helpers.AutumnServer``, no injected
latency) answers a v2 lock check from the official ``autumn-sdk`` client and from
agent_meter's :class:`~agent_meter.backends.autumn_locks.LockClient` (httpx), interleaved.
With no network latency, the median wall time is what each client adds by itself
(building and validating models, connection handling).

``autumn-sdk`` is not a dependency of agent_meter: install it to run this comparison
(``pip install autumn-sdk==1.2.0``); without it only the httpx figure is printed.

Run: ``python benchmarks/bench_lock_client.py``.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from outage_helpers import SECRET, AutumnServer  # noqa: E402

from agent_meter.backends.autumn import AutumnBackend  # noqa: E402
from agent_meter.engine import Hold  # noqa: E402
from benchmarks._timing import machine  # noqa: E402

CALLS = 300
_IDS = itertools.count()


def median_ms(fn: Callable[[], object], calls: int = CALLS, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def ours(url: str) -> Callable[[], object]:
    backend = AutumnBackend(SECRET, base_url=url, lock_expiry=None)

    def one() -> None:
        hold = Hold(f"bench:{next(_IDS)}", "cus_httpx", "web_search", 1.0, None, "r", "o", 0.0)
        backend.lock(hold)

    return one


def sdk(url: str) -> Callable[[], object] | None:
    try:
        import autumn_sdk  # noqa: PLC0415 - optional, for this comparison only
    except ImportError:
        return None
    client = autumn_sdk.Autumn(
        secret_key=SECRET, x_api_version="2.3.0", server_url=url, fail_open=False
    )

    def one() -> None:
        lock = {"lock_id": f"sdk:{next(_IDS)}", "enabled": True}
        client.check(customer_id="cus_sdk", feature_id="web_search", required_balance=1, lock=lock)

    return one


def main() -> None:
    print(f"bench_lock_client: {machine()}, no injected latency, {CALLS} locks each")
    with AutumnServer() as server:
        for customer in ("cus_httpx", "cus_sdk"):
            server.set_balance(customer, 1e9)
        plain = ours(server.url)
        official = sdk(server.url)
        first = median_ms(plain)
        print(f"  httpx LockClient: {first:6.2f} ms per lock (median)")
        if official is None:
            print("  autumn-sdk not installed: pip install autumn-sdk==1.2.0 to compare")
            return
        theirs = median_ms(official)
        again = median_ms(plain)
        print(f"  autumn-sdk 1.2.0: {theirs:6.2f} ms per lock (median)")
        ratio = theirs / min(first, again)
        print(f"  httpx LockClient again: {again:6.2f} ms; sdk / httpx = {ratio:.1f}x")


if __name__ == "__main__":
    main()
