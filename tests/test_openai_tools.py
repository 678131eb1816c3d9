"""run_tool_calls / arun_tool_calls: every tool call of a chat completion through the guard."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai.types.chat import ChatCompletion

from agent_meter import ConfigError, Meter, SQLiteBackend
from agent_meter.openai import arun_tool_calls, run_tool_calls
from agent_meter.testing import MemoryBackend
from tests.openai_helpers import chat_completion, example_pricing, tool_call

CUSTOMER = "cus_tools"
FEATURES = {"search": "web_search", "run_python": "code_exec"}


@pytest.fixture(params=["memory", "sqlite"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "memory":
        yield MemoryBackend(pricing=example_pricing())
    else:
        sqlite = SQLiteBackend(tmp_path / "usage.db", pricing=example_pricing())
        yield sqlite
        sqlite.close()


@pytest.fixture
def meter(backend: Any) -> Meter:
    return Meter(backend)


def credits(backend: Any) -> float:
    return float(backend.balances(CUSTOMER)["credits"])


def assistant_message(*calls: dict[str, Any]) -> Any:
    """The assistant message of a ChatCompletion built from the documented JSON."""
    completion = ChatCompletion.model_validate(
        chat_completion(content=None, tool_calls=list(calls))
    )
    return completion.choices[0].message


class Tools:
    """The functions the model may call; records what actually ran."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, dict[str, Any]]] = []

    def search(self, query: str, limit: int = 3) -> dict[str, Any]:
        self.ran.append(("search", {"query": query, "limit": limit}))
        return {"query": query, "hits": [f"{query} #{i}" for i in range(limit)]}

    def run_python(self, code: str) -> str:
        self.ran.append(("run_python", {"code": code}))
        if "raise" in code:
            msg = "division by zero"
            raise ZeroDivisionError(msg)
        return "4"

    def functions(self) -> dict[str, Any]:
        return {"search": self.search, "run_python": self.run_python}


def test_success_returns_the_result_and_bills_one_call(meter: Meter, backend: Any) -> None:
    tools = Tools()
    message = assistant_message(tool_call("call_s1", "search", '{"query": "autumn", "limit": 2}'))

    replies = run_tool_calls(meter, message, tools.functions(), FEATURES, customer_id=CUSTOMER)

    assert replies == [
        {
            "role": "tool",
            "tool_call_id": "call_s1",
            "content": json.dumps({"query": "autumn", "hits": ["autumn #0", "autumn #1"]}),
        }
    ]
    assert credits(backend) == 99
    assert tools.ran == [("search", {"query": "autumn", "limit": 2})]


def test_function_that_raises_is_told_to_the_model_and_not_billed(
    meter: Meter, backend: Any
) -> None:
    message = assistant_message(tool_call("call_r1", "run_python", '{"code": "raise 1/0"}'))

    [reply] = run_tool_calls(meter, message, Tools().functions(), FEATURES, customer_id=CUSTOMER)

    assert reply["tool_call_id"] == "call_r1"
    assert reply["content"] == "Error: run_python failed: ZeroDivisionError: division by zero"
    assert credits(backend) == 100


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"query": "autumn"', "are not valid JSON"),
        ('["autumn"]', "must be a JSON object, not list"),
    ],
)
def test_malformed_arguments_are_rejected_before_the_guard(arguments: str, expected: str) -> None:
    backend = MemoryBackend(pricing=example_pricing())
    tools = Tools()
    message = assistant_message(tool_call("call_m1", "search", arguments))

    [reply] = run_tool_calls(
        Meter(backend), message, tools.functions(), FEATURES, customer_id=CUSTOMER
    )

    assert reply["tool_call_id"] == "call_m1"
    assert str(reply["content"]).startswith("Error: the arguments of search")
    assert expected in reply["content"]
    assert tools.ran == []
    assert backend.calls == []  # neither checked nor billed


def test_unknown_function_is_rejected_before_the_guard() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    message = assistant_message(tool_call("call_u1", "delete_everything", "{}"))

    [reply] = run_tool_calls(
        Meter(backend), message, Tools().functions(), FEATURES, customer_id=CUSTOMER
    )

    assert reply == {
        "role": "tool",
        "tool_call_id": "call_u1",
        "content": "Error: unknown function 'delete_everything'. "
        "Available functions: run_python, search.",
    }
    assert backend.calls == []


def test_denial_is_told_to_the_model_and_the_function_never_runs(
    meter: Meter, backend: Any
) -> None:
    backend.set_balance(CUSTOMER, "credits", 1)
    tools = Tools()
    message = assistant_message(tool_call("call_d1", "run_python", '{"code": "2+2"}'))

    [reply] = run_tool_calls(meter, message, tools.functions(), FEATURES, customer_id=CUSTOMER)

    assert reply["content"] == "Error: code_exec is unavailable: 1 credit left, 2 needed"
    assert tools.ran == []
    assert credits(backend) == 1


def test_every_outcome_in_one_message_keeps_the_order_of_the_calls(
    meter: Meter, backend: Any
) -> None:
    tools = Tools()
    message = assistant_message(
        tool_call("call_1", "search", '{"query": "a", "limit": 1}'),
        tool_call("call_2", "run_python", '{"code": "raise"}'),
        tool_call("call_3", "search", "not json"),
        tool_call("call_4", "nope", "{}"),
        tool_call("call_5", "run_python", '{"code": "2+2"}'),
    )

    replies = run_tool_calls(meter, message, tools.functions(), FEATURES, customer_id=CUSTOMER)

    assert [reply["tool_call_id"] for reply in replies] == [f"call_{i}" for i in range(1, 6)]
    assert [str(reply["content"]).startswith("Error: ") for reply in replies] == [
        False,
        True,
        True,
        True,
        False,
    ]
    assert replies[4]["content"] == "4"
    assert credits(backend) == 100 - 1 - 2  # one search, one successful run_python


def test_the_dict_form_of_the_message_works_the_same(meter: Meter, backend: Any) -> None:
    message = chat_completion(
        content=None, tool_calls=[tool_call("call_x", "run_python", '{"code": "2+2"}')]
    )["choices"][0]["message"]

    [reply] = run_tool_calls(meter, message, Tools().functions(), FEATURES, customer_id=CUSTOMER)

    assert reply == {"role": "tool", "tool_call_id": "call_x", "content": "4"}
    assert credits(backend) == 98


def test_a_custom_tool_receives_the_models_text(meter: Meter, backend: Any) -> None:
    message = assistant_message(
        {"id": "call_c1", "type": "custom", "custom": {"name": "run_python", "input": "2+2"}}
    )
    tools = Tools()

    [reply] = run_tool_calls(meter, message, tools.functions(), FEATURES, customer_id=CUSTOMER)

    assert reply == {"role": "tool", "tool_call_id": "call_c1", "content": "4"}
    assert tools.ran == [("run_python", {"code": "2+2"})]
    assert credits(backend) == 98


def test_a_message_without_tool_calls_runs_nothing() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    message = ChatCompletion.model_validate(chat_completion()).choices[0].message

    assert run_tool_calls(Meter(backend), message, {}, {}, customer_id=CUSTOMER) == []
    assert backend.calls == []


def test_a_function_without_a_feature_is_a_wiring_error() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    message = assistant_message(tool_call("call_1", "search", "{}"))

    with pytest.raises(ConfigError, match="no feature for function"):
        run_tool_calls(
            Meter(backend),
            message,
            Tools().functions(),
            {"search": "web_search"},
            customer_id=CUSTOMER,
        )
    assert backend.calls == []


def test_an_entity_is_billed_under_its_customer() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    message = assistant_message(tool_call("call_e", "search", '{"query": "a"}'))

    run_tool_calls(
        Meter(backend),
        message,
        Tools().functions(),
        FEATURES,
        customer_id=CUSTOMER,
        entity_id="seat_7",
    )

    assert {call.kwargs["entity_id"] for call in backend.calls} == {"seat_7"}
    assert credits(backend) == 99


def test_an_async_function_cannot_run_in_the_sync_version() -> None:
    backend = MemoryBackend(pricing=example_pricing())

    async def lookup(query: str) -> str:
        return query

    message = assistant_message(tool_call("call_a", "search", '{"query": "a"}'))
    [reply] = run_tool_calls(
        Meter(backend), message, {"search": lookup}, {"search": "web_search"}, customer_id=CUSTOMER
    )

    assert "use arun_tool_calls" in reply["content"]
    assert credits(backend) == 100


# -- async -------------------------------------------------------------------------------


async def test_async_success_raise_malformed_and_unknown(meter: Meter, backend: Any) -> None:
    async def search(query: str) -> list[str]:
        await asyncio.sleep(0)
        return [query]

    async def run_python(code: str) -> int:
        if code == "boom":
            msg = "boom"
            raise RuntimeError(msg)
        return 4

    message = assistant_message(
        tool_call("call_1", "search", '{"query": "a"}'),
        tool_call("call_2", "run_python", '{"code": "boom"}'),
        tool_call("call_3", "search", "{"),
        tool_call("call_4", "nope", "{}"),
        tool_call("call_5", "run_python", '{"code": "1"}'),
    )

    replies = await arun_tool_calls(
        meter,
        message,
        {"search": search, "run_python": run_python},
        FEATURES,
        customer_id=CUSTOMER,
    )

    assert [reply["tool_call_id"] for reply in replies] == [f"call_{i}" for i in range(1, 6)]
    assert [reply["content"] for reply in replies[:2]] == [
        '["a"]',
        "Error: run_python failed: RuntimeError: boom",
    ]
    assert "not valid JSON" in replies[2]["content"]
    assert "unknown function 'nope'" in replies[3]["content"]
    assert replies[4]["content"] == "4"
    assert credits(backend) == 100 - 1 - 2


async def test_async_parallel_calls_share_the_balance_without_overspending(
    meter: Meter, backend: Any
) -> None:
    backend.set_balance(CUSTOMER, "credits", 5)

    async def run_python(code: str) -> str:
        await asyncio.sleep(0.01)
        return code

    calls = [tool_call(f"call_{i}", "run_python", f'{{"code": "{i}"}}') for i in range(4)]
    replies = await arun_tool_calls(
        meter, assistant_message(*calls), {"run_python": run_python}, FEATURES, customer_id=CUSTOMER
    )

    # 5 credits pay for two runs at 2 credits; which two is up to the scheduler.
    denied = [r for r in replies if str(r["content"]).startswith("Error: code_exec is unavailable")]
    assert len(denied) == 2
    assert sorted(str(r["content"]) for r in replies if r not in denied) == sorted(
        [r["tool_call_id"].removeprefix("call_") for r in replies if r not in denied]
    )
    assert credits(backend) == 1


async def test_async_parallel_calls_run_concurrently() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    second_started = asyncio.Event()

    async def first(**_: Any) -> str:
        # Finishes only once the second call has started: a sequential loop would time out.
        await asyncio.wait_for(second_started.wait(), timeout=2)
        return "first"

    async def second(**_: Any) -> str:
        second_started.set()
        return "second"

    message = assistant_message(
        tool_call("call_1", "first", "{}"), tool_call("call_2", "second", "{}")
    )
    replies = await arun_tool_calls(
        Meter(backend),
        message,
        {"first": first, "second": second},
        {"first": "web_search", "second": "web_search"},
        customer_id=CUSTOMER,
    )

    assert [reply["content"] for reply in replies] == ["first", "second"]
    assert credits(backend) == 98


async def test_async_runs_plain_functions_in_a_worker_thread() -> None:
    backend = MemoryBackend(pricing=example_pricing())
    threads: list[int] = []

    def blocking(query: str) -> dict[str, str]:
        threads.append(threading.get_ident())
        return {"query": query}

    message = assistant_message(tool_call("call_t", "search", '{"query": "q"}'))
    [reply] = await arun_tool_calls(
        Meter(backend),
        message,
        {"search": blocking},
        {"search": "web_search"},
        customer_id=CUSTOMER,
    )

    assert reply["content"] == '{"query": "q"}'
    assert len(threads) == 1
    assert threads[0] != threading.get_ident()
    assert credits(backend) == 99


async def test_async_denial_when_the_customer_is_out_of_credit(meter: Meter, backend: Any) -> None:
    backend.set_balance(CUSTOMER, "credits", 0)
    ran: list[str] = []

    async def search(query: str) -> str:
        ran.append(query)
        return query

    message = assistant_message(tool_call("call_d", "search", '{"query": "a"}'))
    [reply] = await arun_tool_calls(
        meter, message, {"search": search}, {"search": "web_search"}, customer_id=CUSTOMER
    )

    assert reply["content"] == "Error: web_search is unavailable: 0 credits left, 1 needed"
    assert ran == []
    assert credits(backend) == 0


# -- the example -------------------------------------------------------------------------


def test_the_example_runs_a_complete_metered_loop_offline() -> None:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    env["PYTHONPATH"] = str(root)

    done = subprocess.run(
        [sys.executable, str(root / "examples" / "openai_tools.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=60,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert "17 * 23 + 4 = 395" in done.stdout
    # 665 tokens (0.665 credits) + one search (1) + one calculation (2)
    assert "credits left for cus_demo: 96.335" in done.stdout
