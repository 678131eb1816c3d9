"""A plain OpenAI tool-calling loop, metered by agent_meter.

Every model request goes through a client wrapped by ``wrap_client`` (gated before it is
sent, its tokens billed after), and every tool call the model makes goes through
``run_tool_calls`` (checked, run, billed only if it succeeds). The customer starts with the
100 credits of the ``agent_free`` plan; a web search costs 1 credit, a calculation 2, and
1,000 tokens cost 1.

Run it offline (a scripted stand-in for the API answers)::

    python examples/openai_tools.py

With ``OPENAI_API_KEY`` set, the same loop talks to the real API (model from
``OPENAI_MODEL``, default ``gpt-4o-mini``).
"""

from __future__ import annotations

import ast
import json
import operator
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from openai import OpenAI

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.openai import run_tool_calls, wrap_client

PRICING = """
[features]
web_search = "metered"
code_exec = "metered"
llm_tokens = "metered"

[credit_systems.credits]
web_search = 1
code_exec = 2
llm_tokens = 0.001

[plans.agent_free]
auto_enable = true
interval = "month"
grants = { credits = 100 }
"""

CUSTOMER = "cus_demo"
QUESTION = "What is Autumn, and what is 17 * 23 + 4?"

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "web_search",
            "description": "Search the web and return the top results.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "calculate",
            "description": "Evaluate an arithmetic expression (+, -, *, /, parentheses).",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
]


def web_search(query: str) -> list[dict[str, str]]:
    """A stand-in search engine: real code would call a search API here."""
    return [
        {"title": "Autumn: pricing and billing for AI apps", "url": "https://useautumn.com"},
        {"title": f"More about {query}", "url": "https://docs.useautumn.com"},
    ]


_OPERATORS: dict[type[ast.AST], Callable[..., float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.USub: operator.neg,
}


def calculate(expression: str) -> float:
    """Arithmetic only: the model's text is parsed, never executed."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        msg = f"unsupported expression: {ast.unparse(node)}"
        raise ValueError(msg)

    return value(ast.parse(expression, mode="eval").body)


def scripted_api(request: httpx.Request) -> httpx.Response:
    """Answers like the Chat Completions API would: tool calls first, then the answer."""
    messages = json.loads(request.content)["messages"]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    message: dict[str, Any] = {"role": "assistant", "content": None}
    if not results:
        message["tool_calls"] = [
            {
                "id": "call_search_1",
                "type": "function",
                "function": {"name": "web_search", "arguments": '{"query": "Autumn billing"}'},
            },
            {
                "id": "call_calc_1",
                "type": "function",
                "function": {"name": "calculate", "arguments": '{"expression": "17 * 23 + 4"}'},
            },
        ]
        usage, finish = (180, 52), "tool_calls"
    else:
        message["content"] = (
            "Autumn is a pricing and billing layer for AI apps (useautumn.com). "
            f"17 * 23 + 4 = {results[-1]}."
        )
        usage, finish = (402, 31), "stop"
    body = {
        "id": f"chatcmpl-demo-{len(messages)}",
        "object": "chat.completion",
        "created": 1727900000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        },
    }
    return httpx.Response(200, json=body)


def make_client() -> OpenAI:
    if os.environ.get("OPENAI_API_KEY"):
        return OpenAI()
    return OpenAI(
        api_key="sk-offline",
        base_url="http://scripted/v1",
        # openai types http_client as its own httpx fork's client; httpx's works the same
        http_client=httpx.Client(transport=httpx.MockTransport(scripted_api)),  # type: ignore[arg-type]
        max_retries=0,
    )


def run(db_path: Path) -> str:
    backend = SQLiteBackend(db_path, pricing=Pricing.from_toml(PRICING, source="pricing.toml"))
    with Meter(backend) as meter:
        client = wrap_client(make_client(), meter, customer_id=CUSTOMER)
        model = os.environ.get("OPENAI_MODEL", "gpt-4o-mini")
        messages: list[Any] = [{"role": "user", "content": QUESTION}]
        answer = ""
        for _ in range(5):  # a bound on the loop: a model that keeps calling tools stops here
            completion = client.chat.completions.create(model=model, messages=messages, tools=TOOLS)
            message = completion.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                answer = message.content or ""
                break
            replies = run_tool_calls(
                meter,
                message,
                functions={"web_search": web_search, "calculate": calculate},
                features={"web_search": "web_search", "calculate": "code_exec"},
                customer_id=CUSTOMER,
            )
            for reply in replies:
                print(f"  tool {reply['tool_call_id']}: {reply['content']}")
            messages.extend(replies)
        print(f"answer: {answer}")
        print(f"credits left for {CUSTOMER}: {backend.balances(CUSTOMER)['credits']:g}")
        for event in backend.events(CUSTOMER):
            print(f"  {event.kind:8} {event.feature_id:11} {event.value:>6g}")
    return answer


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        answer = run(Path(tmp) / "usage.db")
    return 0 if answer else 1


if __name__ == "__main__":
    sys.exit(main())
