"""What MeteringCallbackHandler adds to one LLM call, on MemoryBackend and on SQLite.

A scripted chat model (no network, so the call itself is LangChain's own overhead, the
worst case for a ratio) is invoked without callbacks, with a do-nothing handler (what any
callback costs in LangChain), with the check-only gate (``reserve=False, estimate=1``:
the handler before reservations, a check before the call and a track after it) and with
the reserving handler (the default: the prompt plus the completion budget reserved before
the call, settled to the reported usage after it). The variants run interleaved, round
after round, so that a slow moment of the machine hits them all; each figure is the
median over rounds of the mean time per call.

The figure to watch is the reserving handler's overhead (its time minus the bare call's)
against the check-only gate's, in the same run: the target is at most 1.5x on SQLite.
Each round gives one such ratio from batches run back to back; the ratio reported is the
median of those, in wall-clock time and in CPU time (``time.process_time``: every thread
of this process, so the executor threads of ``ainvoke`` too). On a shared machine other
processes stretch wall-clock batches at random; CPU time counts only this process's work.

Run it with::

    python benchmarks/bench_callback_handler.py
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from agent_meter import Meter, Plan, Pricing, SQLiteBackend
from agent_meter.testing import MemoryBackend
from benchmarks._timing import machine

CALLS = 200
ROUNDS = 9
CUSTOMER = "cus_bench"
PRICING = Pricing(
    features={"llm_tokens": "metered"},
    credit_systems={"credits": {"llm_tokens": 0.001}},
    plans={"free": Plan(auto_enable=True, grants={"credits": 100})},
)


class ScriptedChatModel(BaseChatModel):
    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kw: Any
    ) -> ChatResult:
        message = AIMessage(
            "ok",
            usage_metadata={"input_tokens": 12, "output_tokens": 3, "total_tokens": 15},
            response_metadata={"model_name": "scripted"},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


class NoOpHandler(BaseCallbackHandler):
    pass


@dataclass
class Samples:
    """Mean seconds per call of each round: wall-clock and CPU."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self, clock: str) -> float:
        return statistics.median(getattr(self, clock))


def interleaved(variants: dict[str, Callable[[], object]]) -> dict[str, Samples]:
    """Mean seconds per call of each variant, per round, the variants run in turns."""
    for run in variants.values():
        run()  # warm up: imports, customer creation, connections
    samples = {name: Samples() for name in variants}
    for _ in range(ROUNDS):
        for name, run in variants.items():
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(CALLS):
                run()
            samples[name].cpu.append((time.process_time() - cpu) / CALLS)
            samples[name].wall.append((time.perf_counter() - start) / CALLS)
    return samples


def overhead_ratio(samples: dict[str, Samples], clock: str, prefix: str = "") -> float:
    """Median over rounds of (reserving - bare) / (check-only - bare), one round at a time."""
    bare, check, reserve = (
        getattr(samples[prefix + name], clock) for name in ("bare", "check", "reserve")
    )
    return statistics.median(
        (r - b) / (c - b) for b, c, r in zip(bare, check, reserve, strict=True)
    )


def measure(
    label: str, meter: Meter, set_balance: Callable[[str, str, float], None]
) -> dict[str, float]:
    """Print one backend's figures; return the reserving/check-only overhead ratios."""
    set_balance(CUSTOMER, "credits", 1e9)
    model = ScriptedChatModel()
    reserving = meter.callback_handler()
    check_only = meter.callback_handler(reserve=False, estimate=1)

    def config(handler: BaseCallbackHandler) -> Any:
        return {"callbacks": [handler], "metadata": {"customer_id": CUSTOMER}}

    loop = asyncio.new_event_loop()
    samples = interleaved(
        {
            "bare": lambda: model.invoke("hi"),
            "noop": lambda: model.invoke("hi", config=config(NoOpHandler())),
            "check": lambda: model.invoke("hi", config=config(check_only)),
            "reserve": lambda: model.invoke("hi", config=config(reserving)),
            "abare": lambda: loop.run_until_complete(model.ainvoke("hi")),
            "acheck": lambda: loop.run_until_complete(
                model.ainvoke("hi", config=config(check_only))
            ),
            "areserve": lambda: loop.run_until_complete(
                model.ainvoke("hi", config=config(reserving))
            ),
        }
    )
    loop.close()
    figures = {name: runs.median("wall") for name, runs in samples.items()}

    def line(name: str, base: str, text: str) -> str:
        value, bare = figures[name], figures[base]
        return (
            f"  {text:<32}{value * 1e6:9.1f} us  ({value / bare:.2f}x; "
            f"+{(value - bare) * 1e6:.1f} us per call)"
        )

    ratios = {
        f"{api} {clock}": overhead_ratio(samples, clock, prefix)
        for clock in ("wall", "cpu")
        for api, prefix in (("invoke", ""), ("ainvoke", "a"))
    }
    cpu = {name: runs.median("cpu") for name, runs in samples.items()}
    print(f"\n{label}")
    print(f"  {'invoke, no callbacks':<32}{figures['bare'] * 1e6:9.1f} us")
    print(line("noop", "bare", "invoke, no-op handler"))
    print(line("check", "bare", "invoke, check-only gate"))
    print(line("reserve", "bare", "invoke, reserving handler"))
    print(f"  {'ainvoke, no callbacks':<32}{figures['abare'] * 1e6:9.1f} us")
    print(line("acheck", "abare", "ainvoke, check-only gate"))
    print(line("areserve", "abare", "ainvoke, reserving handler"))
    print(
        f"  CPU per call: invoke bare {cpu['bare'] * 1e6:.0f} us, check {cpu['check'] * 1e6:.0f}, "
        f"reserve {cpu['reserve'] * 1e6:.0f}; ainvoke bare {cpu['abare'] * 1e6:.0f}, "
        f"check {cpu['acheck'] * 1e6:.0f}, reserve {cpu['areserve'] * 1e6:.0f}"
    )
    print(
        "  reserving / check-only overhead (median of rounds): "
        + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in ratios.items())
    )
    print(f"  calls seen by the reserving handler: {reserving.summary.total.calls}")
    return ratios


def main() -> None:
    print(f"{machine()}, {CALLS} calls x {ROUNDS} rounds, interleaved, medians")
    memory = MemoryBackend(pricing=PRICING)
    measure("MemoryBackend", Meter(memory), memory.set_balance)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SQLiteBackend(Path(tmp) / "bench.db", pricing=PRICING)
        ratios = measure("SQLiteBackend (tmp file)", Meter(sqlite), sqlite.set_balance)
        sqlite.close()
    print("\ntarget: reserving overhead <= 1.5x the check-only gate's on SQLite:")
    for name, ratio in ratios.items():
        print(f"  {name:<13}{ratio:.2f}x  {'met' if ratio <= 1.5 else 'MISSED'}")


if __name__ == "__main__":
    main()
