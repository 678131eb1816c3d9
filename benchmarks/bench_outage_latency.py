"""What billing adds to a guarded call against a remote (Autumn-shaped) server, and how fast
the outbox delivers.

A local server on 127.0.0.1 (``tests/outage_helpers.AutumnServer``) answers like Autumn's v1
API with 20 ms of injected latency per request. Measured in the same run:

- **seed pattern**, written by hand with autumn-py: ``check`` → work → blocking ``track``
  (two round trips on the caller's path);
- **agent_meter**, ``strategy="reserve"``: one ``check(send_event=True)`` that reserves,
  the work, and nothing more on success (the hold is journaled in the local outbox);
- **agent_meter**, ``strategy="lock"`` (the default on Autumn): one v2 lock check over
  plain HTTP (httpx), the work, and the confirm queued to the outbox, delivered in the
  background (the lock's journal entry is closed in the same commit).

The work is empty, so each figure is the latency billing adds to the call. Target:
agent_meter adds one round trip, ratio <= 0.55 of the seed pattern, for both. Also: the caller's
cost of ``meter.track_tokens`` (queued to the outbox, delivered in the background; target
< 1 ms), and the outbox's delivery rate with and without latency.

Run: ``python benchmarks/bench_outage_latency.py``.
"""

from __future__ import annotations

import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import autumn  # noqa: E402
from outage_helpers import SECRET, AutumnServer, pricing  # noqa: E402

from agent_meter import Meter  # noqa: E402
from agent_meter.backends.autumn import AutumnBackend  # noqa: E402
from agent_meter.tokens import TokenUsage  # noqa: E402
from benchmarks._timing import machine  # noqa: E402

LATENCY = 0.020
CALLS = 60
TOKEN_TRACKS = 300
DELIVERY_TRACKS = {0.0: 400, LATENCY: 100}
_SEED_KEYS = itertools.count()
USAGE = TokenUsage(input_tokens=900, output_tokens=300, total_tokens=1200)


def median_ms(fn: Callable[[], object], calls: int, warmup: int = 5) -> float:
    """Median milliseconds of single calls of ``fn``."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def seed_pattern(url: str) -> Callable[[], object]:
    """The pattern the project started from: check, work, then a blocking track."""
    client = autumn.Client(token=SECRET, base_url=url, max_retries=0)

    def one() -> None:
        answer = client.check(customer_id="cus_seed", feature_id="web_search")
        if not answer.allowed:
            raise RuntimeError("denied")
        # ... the tool's work (none: we measure what billing adds) ...
        client.track(
            customer_id="cus_seed",
            feature_id="web_search",
            value=1,
            idempotency_key=f"seed-{next(_SEED_KEYS)}",
        )

    return one


def metered(meter: Meter, customer: str = "cus_meter") -> Callable[[], object]:
    counter = itertools.count()

    def one() -> None:
        with meter.guard(customer, "web_search", call_id=f"g{next(counter)}"):
            pass  # the tool's work

    return one


def token_tracks(meter: Meter) -> Callable[[], object]:
    counter = itertools.count()

    def one() -> None:
        meter.track_tokens("cus_tokens", USAGE, call_id=f"run-{next(counter)}")

    return one


def delivery_rate(latency: float, tracks: int, folder: Path) -> float:
    """Tracks per second the background deliverer gets acknowledged."""
    with AutumnServer(latency=latency) as server:
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=5)
        meter = Meter(backend, pricing=pricing(), outbox=folder / f"rate-{latency}.db")
        server.set_balance("cus_rate", 1e9)
        start = time.perf_counter()
        for n in range(tracks):
            meter.track_tokens("cus_rate", USAGE, call_id=f"rate-{n}")
        left = meter.flush(timeout=120)
        elapsed = time.perf_counter() - start
        applied = sum(server.stats.tracks_applied.values())
        meter.close(timeout=5)
    if left or applied != tracks:
        raise RuntimeError(f"delivered {applied} of {tracks}, {left} left")
    return tracks / elapsed


def main() -> None:
    print(f"bench_outage_latency: {machine()}, server latency {LATENCY * 1000:.0f} ms/request")
    with tempfile.TemporaryDirectory() as tmp, AutumnServer(latency=LATENCY) as server:
        for customer in ("cus_seed", "cus_meter", "cus_lock", "cus_tokens"):
            server.set_balance(customer, 1e9)
        backend = AutumnBackend(SECRET, base_url=server.url, timeout=5)
        meter = Meter(
            backend, strategy="reserve", pricing=pricing(), outbox=Path(tmp) / "outbox.db"
        )
        locks = Meter(
            AutumnBackend(SECRET, base_url=server.url, timeout=5),
            strategy="lock",
            pricing=pricing(),
            outbox=Path(tmp) / "locks.db",
        )
        seed = median_ms(seed_pattern(server.url), CALLS)
        ours = median_ms(metered(meter), CALLS)
        locked = median_ms(metered(locks, "cus_lock"), CALLS)
        seed_again = median_ms(seed_pattern(server.url), CALLS)  # interleaved: same conditions
        seed = min(seed, seed_again)
        tokens = median_ms(token_tracks(meter), TOKEN_TRACKS)
        left = meter.flush(timeout=60) + locks.flush(timeout=60)
        held = server.open_locks()
        meter.close(timeout=5)
        locks.close(timeout=5)
        ratio, lock_ratio = ours / seed, locked / seed
        print(f"  seed pattern (check, work, blocking track): {seed:7.2f} ms added per call")
        print(f"  agent_meter reserve (one reserving check):  {ours:7.2f} ms added per call")
        print(f"  agent_meter lock (one lock, confirm queued): {locked:6.2f} ms added per call")
        print(f"  ratio reserve / seed: {ratio:.2f}  (target <= 0.55)")
        print(f"  ratio lock / seed:    {lock_ratio:.2f}  (target <= 0.55)")
        print(f"  locks left held after flush: {len(held)}")
        print(f"  meter.track_tokens on the caller's path: {tokens:.3f} ms (target < 1 ms)")
        print(f"  token tracks left undelivered after flush: {left}")
    with tempfile.TemporaryDirectory() as tmp:
        for latency, tracks in DELIVERY_TRACKS.items():
            rate = delivery_rate(latency, tracks, Path(tmp))
            print(
                f"  outbox delivery rate, {latency * 1000:.0f} ms latency: "
                f"{rate:8.1f} tracks/s ({tracks} tracks)"
            )
    ok = ratio <= 0.55 and lock_ratio <= 0.55 and tokens < 1.0 and not held
    print("  targets met" if ok else "  TARGET MISSED")


if __name__ == "__main__":
    main()
