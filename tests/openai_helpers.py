"""Shared fakes for the OpenAI tests: the example pricing, backends, and a scripted API."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from agent_meter import Plan, Pricing

API_BASE = "http://test/v1"


def example_pricing() -> Pricing:
    """DESIGN.md §7: a credit pool of 100 per month, web_search=1, code_exec=2, tokens=0.001."""
    return Pricing(
        features={
            "web_search": "metered",
            "code_exec": "metered",
            "llm_tokens": "metered",
            "llm_input_tokens": "metered",
            "llm_output_tokens": "metered",
            "premium": "boolean",
        },
        credit_systems={
            "credits": {
                "web_search": 1,
                "code_exec": 2,
                "llm_tokens": 0.001,
                "llm_input_tokens": 0.001,
                "llm_output_tokens": 0.002,
            }
        },
        plans={
            "agent_free": Plan(
                auto_enable=True, interval="month", grants={"credits": 100, "premium": True}
            )
        },
    )


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_completion(
    completion_id: str = "chatcmpl-1",
    *,
    content: str | None = "Hello!",
    tool_calls: list[dict[str, Any]] | None = None,
    usage: tuple[int, int] | None = (1200, 630),
    model: str = "gpt-4o-mini-2024-07-18",
) -> dict[str, Any]:
    """A chat completion in the documented JSON shape."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": 1727900000,
        "model": model,
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "tool_calls" if tool_calls else "stop",
            }
        ],
    }
    if usage is not None:
        body["usage"] = {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        }
    return body


def chunks(
    completion_id: str = "chatcmpl-s1",
    words: Iterable[str] = ("Hel", "lo", "!"),
    usage: tuple[int, int] = (900, 100),
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The content chunks of a streamed completion, and its usage-only last chunk."""
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": 1727900000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_44709d6fcb",
    }
    content = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"content": word}, "logprobs": None, "finish_reason": None}
            ],
        }
        for word in words
    ]
    content[0]["choices"][0]["delta"]["role"] = "assistant"  # type: ignore[index]  # built above
    content.append(
        {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
    )
    last = {
        **base,
        "choices": [],
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
        },
    }
    return content, last


def sse(events: Iterable[dict[str, Any]], *, named: bool = False) -> bytes:
    """A server-sent-event body ending with ``[DONE]`` (``named``: Responses API events)."""
    parts = []
    for event in events:
        prefix = f"event: {event['type']}\n" if named else ""
        parts.append(f"{prefix}data: {json.dumps(event)}\n\n")
    if not named:
        parts.append("data: [DONE]\n\n")
    return "".join(parts).encode()


def response_object(
    response_id: str = "resp_1", usage: tuple[int, int] | None = (300, 200)
) -> dict[str, Any]:
    """A Responses API response in the documented JSON shape."""
    body: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": 1741476542,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": "gpt-4.1-2025-04-14",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Hi there.", "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "temperature": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "metadata": {},
    }
    if usage is not None:
        body["usage"] = {
            "input_tokens": usage[0],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": usage[1],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage[0] + usage[1],
        }
    return body


Reply = Callable[[httpx.Request], httpx.Response]


class ScriptedAPI:
    """An httpx handler that answers from a script and records every request it received."""

    def __init__(self, *replies: httpx.Response | Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(request.content) for request in self.requests]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        reply = self.replies.pop(0)
        return reply(request) if callable(reply) else reply


def json_reply(body: dict[str, Any], status: int = 200) -> httpx.Response:
    return httpx.Response(status, json=body)


def sse_reply(body: bytes) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
