"""tool.invoke through MeteredTool against the bare tool, on MemoryBackend and SQLite.

Every figure is a ratio measured in the same run: batches of invocations alternate between
the bare tool and each wrapped tool, and the medians of the per-call times are compared.
The SQLite ledger is a temporary file in its normal durable mode (WAL, synchronous=NORMAL),
checked and printed below; each wrapped call reserves with a write transaction.

Targets: at most 1.25x the bare tool on memory, 1.5x on SQLite.

Run:  python benchmarks/bench_tool_wrapper.py [--batches 40] [--calls 50] [--breakdown]
      [--profile] [--strict]   (--strict: exit 1 when a ratio misses its target)
"""

from __future__ import annotations

import argparse
import cProfile
import itertools
import os
import platform
import pstats
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import langchain_core
from langchain_core.tools import BaseTool, tool

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.context import customer_from_config
from agent_meter.engine import CheckRequest
from agent_meter.langchain.tools import MeteredTool
from agent_meter.pricing import Plan
from agent_meter.testing import MemoryBackend

PRICING = Pricing(
    features={"web_search": "metered", "premium": "boolean"},
    credit_systems={"credits": {"web_search": 1}},
    plans={"agent_free": Plan(auto_enable=True, grants={"credits": 100, "premium": True})},
)
CUSTOMER = "cus_bench"
CONFIG: Any = {"configurable": {"customer_id": CUSTOMER}}
TARGETS = {"memory": 1.25, "sqlite": 1.5}


@tool
def search(query: str) -> str:
    """Search the web (a trivial body, so the wrapper's cost is not hidden by work)."""
    return f"results for {query}"


_IDS = itertools.count()


def per_call(tool_: BaseTool, calls: int, as_tool_call: bool) -> float:
    """Seconds per invoke over one batch."""
    if as_tool_call:
        # Fresh ids, as a model gives: a repeated id is a replay, reserved only once.
        inputs: list[Any] = [
            {"type": "tool_call", "name": "search", "args": {"query": "q"}, "id": f"c{next(_IDS)}"}
            for _ in range(calls)
        ]
    else:
        inputs = [{"query": "q"}] * calls
    invoke = tool_.invoke
    start = time.perf_counter()
    for item in inputs:
        invoke(item, config=CONFIG)
    return (time.perf_counter() - start) / calls


def measure(
    contenders: dict[str, BaseTool], batches: int, calls: int, as_tool_call: bool
) -> dict[str, list[float]]:
    """Seconds per call of each contender, one sample per batch.

    Each round runs one batch of every contender, in a rotating order, so that a burst of
    load from elsewhere on the machine hits all of them alike.
    """
    for contender in contenders.values():  # warm up: schema memos, SQLite pages, customer
        per_call(contender, 20, as_tool_call)
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(batches):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(per_call(contenders[name], calls, as_tool_call))
    return samples


def sqlite_mode(path: Path, backend: SQLiteBackend) -> str:
    journal = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    # synchronous is per connection: read it on the backend's own connection.
    level = backend._conn().execute("PRAGMA synchronous").fetchone()[0]
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    return f"journal_mode={journal}, synchronous={names.get(level, level)}"


def timed(action: Callable[[], object], calls: int, batches: int) -> float:
    """Median seconds per call of ``action``."""
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(calls):
            action()
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


def breakdown(meter: Meter, label: str, calls: int, batches: int) -> None:
    """Where a wrapped call's extra time goes: each step of the guard on its own."""
    backend: Any = meter.backend

    def guard_only() -> None:
        with meter.guard(CUSTOMER, "web_search"):
            pass

    steps: dict[str, Callable[[], object]] = {
        "customer_from_config(config)": lambda: customer_from_config(CONFIG),
        "meter.metered_call(...) (validation)": lambda: meter.metered_call(CUSTOMER, "web_search"),
        "backend.check(send_event=True)": lambda: backend.check(
            CheckRequest(CUSTOMER, "web_search", required_balance=1, send_event=True)
        ),
        "meter.guard(...) enter+exit, no work": guard_only,
    }
    print(f"\nbreakdown on {label}: median us/call")
    for name, action in steps.items():
        print(f"  {name:<40} {timed(action, calls, batches) * 1e6:8.1f}")


def profile(target: Callable[[], object], label: str) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    target()
    profiler.disable()
    print(f"\n-- cProfile: {label} (top 15 by own time)")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--profile", action="store_true", help="profile the wrapped calls")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 when a ratio is over its target"
    )
    parser.add_argument(
        "--breakdown", action="store_true", help="time each step of the guard on its own"
    )
    options = parser.parse_args()

    print(
        f"cpu_count={os.cpu_count()} python={platform.python_version()} "
        f"langchain_core={langchain_core.__version__} "
        f"batches={options.batches} calls/batch={options.calls}"
    )
    # Enough credits for every call of the run: no denial in the measured path.
    total = (options.batches + 2) * options.calls * 10
    memory = MemoryBackend(pricing=PRICING)
    memory.set_balance(CUSTOMER, "credits", total)
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "usage.db"
        sqlite = SQLiteBackend(path, pricing=PRICING)
        sqlite.set_balance(CUSTOMER, "credits", total)
        print(f"sqlite ledger: {sqlite_mode(path, sqlite)}")
        contenders: dict[str, BaseTool] = {
            "bare": search,
            "memory": Meter(memory).wrap_tool(search, "web_search"),
            "sqlite": Meter(sqlite).wrap_tool(search, "web_search"),
        }
        for as_tool_call in (False, True):
            kind = "tool call -> ToolMessage" if as_tool_call else "plain args"
            samples = measure(contenders, options.batches, options.calls, as_tool_call)
            bare = statistics.median(samples["bare"])
            print(f"\ninvoke with {kind}: median us/call")
            print(f"  bare tool         {bare * 1e6:8.1f}")
            for name in ("memory", "sqlite"):
                median = statistics.median(samples[name])
                ratio = median / bare
                # The same ratio taken round by round (each against the bare batch of its
                # own round), less sensitive to load that drifts during the run.
                paired = statistics.median(
                    w / b for w, b in zip(samples[name], samples["bare"], strict=True)
                )
                verdict = "ok" if ratio <= TARGETS[name] else "OVER TARGET"
                failed = failed or ratio > TARGETS[name]
                print(
                    f"  wrapped, {name:<8} {median * 1e6:8.1f}   ratio {ratio:5.2f}x "
                    f"(paired {paired:4.2f}x; target <= {TARGETS[name]}x: {verdict})"
                )
        if options.breakdown:
            for name in ("memory", "sqlite"):
                wrapped = contenders[name]
                assert isinstance(wrapped, MeteredTool)
                breakdown(wrapped.meter, name, options.calls, options.batches)
        if options.profile:
            for name in ("memory", "sqlite"):
                wrapped = contenders[name]
                profile(lambda w=wrapped: per_call(w, 2000, False), f"wrapped on {name}")
        sqlite.close()
    return 1 if failed and options.strict else 0


if __name__ == "__main__":
    sys.exit(main())
