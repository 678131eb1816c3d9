"""What wrap_client adds to an OpenAI request: the gate before, the track after.

Both clients answer from an in-process ``httpx.MockTransport`` (no network), so the figures
are the SDK's own cost plus the meter's; against a real API the request itself (hundreds of
milliseconds) dwarfs both. Baseline, measured in the same run: the unwrapped client.

Run: ``python benchmarks/bench_openai.py``.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent_meter import Meter, Plan, Pricing, SQLiteBackend
from agent_meter.openai import wrap_client
from agent_meter.testing import MemoryBackend
from benchmarks._timing import median_per_call

CALLS = 300
CHUNKS = 50
PRICING = Pricing(
    features={"llm_tokens": "metered"},
    credit_systems={"credits": {"llm_tokens": 0.001}},
    plans={"agent_free": Plan(auto_enable=True, grants={"credits": 10_000_000})},
)
MESSAGES = [{"role": "user", "content": "hi"}]


def handler() -> Callable[[httpx.Request], httpx.Response]:
    ids = itertools.count()

    def answer(request: httpx.Request) -> httpx.Response:
        n = next(ids)
        base = {"id": f"chatcmpl-{n}", "created": 1, "model": "gpt-4o-mini"}
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        if not json.loads(request.content).get("stream"):
            body = {
                **base,
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hello"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            return httpx.Response(200, json=body)
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}]}
            for _ in range(CHUNKS)
        ]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        events.append({**chunk, "choices": [], "usage": usage})
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(
            200, content=text.encode(), headers={"content-type": "text/event-stream"}
        )

    return answer


def client() -> OpenAI:
    return OpenAI(
        api_key="sk-bench",
        base_url="http://bench/v1",
        http_client=httpx.Client(transport=httpx.MockTransport(handler())),
        max_retries=0,
    )


def bench(target: OpenAI) -> tuple[float, float]:
    def plain() -> None:
        target.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)

    def streamed() -> None:
        for _ in target.chat.completions.create(
            model="gpt-4o-mini", messages=MESSAGES, stream=True
        ):
            pass

    return median_per_call(plain, calls=CALLS), median_per_call(streamed, calls=CALLS // 3)


def main() -> None:
    cpus = os.cpu_count()
    print(f"{platform.python_implementation()} {platform.python_version()}, {cpus} cores")
    print(f"{CALLS} completions per batch, median of 5 batches; streams of {CHUNKS} chunks")
    base_plain, base_stream = bench(client())
    with tempfile.TemporaryDirectory() as tmp:
        sqlite = SQLiteBackend(Path(tmp) / "usage.db", pricing=PRICING)
        rows = [("unwrapped", base_plain, base_stream)]
        for name, backend in (("memory", MemoryBackend(pricing=PRICING)), ("sqlite", sqlite)):
            wrapped = wrap_client(client(), Meter(backend), customer_id="cus_bench")
            rows.append((f"wrapped, {name}", *bench(wrapped)))
        sqlite.close()
    print(f"{'client':<18}{'plain ms':>10}{'x':>7}{'stream ms':>11}{'x':>7}")
    for name, plain, streamed in rows:
        print(
            f"{name:<18}{plain * 1e3:>10.3f}{plain / base_plain:>7.2f}"
            f"{streamed * 1e3:>11.3f}{streamed / base_stream:>7.2f}"
        )


if __name__ == "__main__":
    main()
