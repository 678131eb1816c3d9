"""What MeteringCallbackHandler adds to one LLM call, on MemoryBackend and on SQLite.

A scripted chat model (no network, so the call itself is LangChain's own overhead, the
worst case for a ratio) is invoked without callbacks, with a do-nothing handler (what any
callback costs in LangChain) and with the metering handler (a gate check before the call,
a track after it). Each figure is the median over rounds of the mean time per call.

Run it with::

    python benchmarks/bench_callback_handler.py
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from agent_meter import Meter, Plan, Pricing, SQLiteBackend
from agent_meter.testing import MemoryBackend

CALLS = 200
ROUNDS = 7
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


def per_call(run: Callable[[], None]) -> float:
    """Median over ROUNDS of the mean seconds per call."""
    run()  # warm up: imports, customer creation, connections
    rounds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(CALLS):
            run()
        rounds.append((time.perf_counter() - start) / CALLS)
    return statistics.median(rounds)


def measure(label: str, meter: Meter, set_balance: Callable[[str, str, float], None]) -> None:
    set_balance(CUSTOMER, "credits", 1e9)
    model = ScriptedChatModel()
    handler = meter.callback_handler()
    metered = {"callbacks": [handler], "metadata": {"customer_id": CUSTOMER}}
    noop = {"callbacks": [NoOpHandler()], "metadata": {"customer_id": CUSTOMER}}

    bare = per_call(lambda: model.invoke("hi"))
    empty = per_call(lambda: model.invoke("hi", config=noop))
    sync = per_call(lambda: model.invoke("hi", config=metered))

    loop = asyncio.new_event_loop()
    abare = per_call(lambda: loop.run_until_complete(model.ainvoke("hi")))
    ametered = per_call(lambda: loop.run_until_complete(model.ainvoke("hi", config=metered)))
    loop.close()

    print(f"\n{label}")
    print(f"  invoke, no callbacks       {bare * 1e6:9.1f} us")
    print(f"  invoke, no-op handler      {empty * 1e6:9.1f} us  ({empty / bare:.2f}x)")
    print(
        f"  invoke, metering handler   {sync * 1e6:9.1f} us  ({sync / bare:.2f}x; "
        f"+{(sync - bare) * 1e6:.1f} us per call)"
    )
    print(f"  ainvoke, no callbacks      {abare * 1e6:9.1f} us")
    print(
        f"  ainvoke, metering handler  {ametered * 1e6:9.1f} us  ({ametered / abare:.2f}x; "
        f"+{(ametered - abare) * 1e6:.1f} us per call)"
    )
    print(f"  calls seen by the handler  {handler.summary.total.calls}")


def main() -> None:
    print(
        f"python {sys.version.split()[0]}, os.cpu_count()={os.cpu_count()}, "
        f"{CALLS} calls x {ROUNDS} rounds, medians"
    )
    memory = MemoryBackend(pricing=PRICING)
    measure("MemoryBackend", Meter(memory), memory.set_balance)
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SQLiteBackend(Path(tmp) / "bench.db", pricing=PRICING)
        measure("SQLiteBackend (tmp file)", Meter(sqlite), sqlite.set_balance)
        sqlite.close()


if __name__ == "__main__":
    main()
