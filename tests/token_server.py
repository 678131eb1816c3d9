"""A third-party OpenAI-compatible server that keeps its own ledger of the tokens it served.

Served through ``httpx.MockTransport`` (no network). It counts tokens its own way (not the
way agent_meter estimates them), honours ``max_tokens`` / ``max_completion_tokens``,
streams with a usage chunk when asked, and can break a stream off half-way. Its ledger is
the ground truth the billing tests compare against.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from openai import AsyncOpenAI, OpenAI

API_BASE = "http://ledger-server/v1"


class _Broken(httpx.SyncByteStream, httpx.AsyncByteStream):
    """An SSE body that breaks off after ``parts`` events."""

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def __iter__(self) -> Iterator[bytes]:
        yield from self.parts
        raise httpx.ReadError("connection reset by peer")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part
        raise httpx.ReadError("connection reset by peer")


class TokenServer:
    """The server: answers chat completions and records every token it served.

    Attributes:
        completion_tokens: What the model writes when no limit stops it first.
        served: Total tokens of each answered request, in order.
        requests: Every request received (answered or not).
        break_streams: Break every stream off after its first content chunk.
        delay: Seconds each async answer takes (so that concurrent calls overlap).
    """

    def __init__(self, completion_tokens: int = 120, *, delay: float = 0.0) -> None:
        self.completion_tokens = completion_tokens
        self.delay = delay
        self.break_streams = False
        self.fail_with: int | None = None
        self.served: list[int] = []
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def ledger(self) -> int:
        """Every token served."""
        with self._lock:
            return sum(self.served)

    @staticmethod
    def prompt_tokens(body: dict[str, Any]) -> int:
        """The server's own count: 1 per 4 characters of content, 5 per message."""
        messages = body.get("messages") or []
        return sum(5 + len(str(m.get("content") or "")) // 4 for m in messages)

    def _answer(self, body: dict[str, Any]) -> tuple[int, int]:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        completion = self.completion_tokens if limit is None else min(limit, self.completion_tokens)
        prompt = self.prompt_tokens(body)
        with self._lock:
            self.served.append(prompt + completion)
        return prompt, completion

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        with self._lock:
            self.requests.append(body)
        if self.fail_with is not None:
            error = {"error": {"message": "overloaded", "type": "server_error", "code": None}}
            return httpx.Response(self.fail_with, json=error)
        if self.break_streams and body.get("stream"):
            with self._lock:  # the first chunk went out: the server counts what it sent
                self.served.append(self.prompt_tokens(body) + 1)
            return httpx.Response(
                200,
                stream=_Broken(_sse([_chunk("cmpl", "Hel", None)], done=False)),
                headers={"content-type": "text/event-stream"},
            )
        prompt, completion = self._answer(body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        name = f"cmpl-{len(self.requests)}"
        if body.get("stream"):
            events = [_chunk(name, "Hel", None), _chunk(name, "lo", None), _chunk(name, "", "stop")]
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({**_chunk(name, "", None), "choices": [], "usage": usage})
            return httpx.Response(
                200, content=b"".join(_sse(events)), headers={"content-type": "text/event-stream"}
            )
        return httpx.Response(
            200,
            json={
                "id": name,
                "object": "chat.completion",
                "created": 1727900000,
                "model": body.get("model", "m"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                        "logprobs": None,
                        "finish_reason": "length"
                        if completion < self.completion_tokens
                        else "stop",
                    }
                ],
                "usage": usage,
            },
        )

    async def handle_async(self, request: httpx.Request) -> httpx.Response:
        """The same answer, after ``delay`` seconds."""
        await asyncio.sleep(self.delay)
        return self(request)

    def client(self) -> OpenAI:
        """An unwrapped OpenAI client talking to this server."""
        return OpenAI(
            api_key="sk-test",
            base_url=API_BASE,
            # openai types http_client as its own httpx fork's client; httpx's works the same
            http_client=httpx.Client(transport=httpx.MockTransport(self)),  # type: ignore[arg-type]
            max_retries=0,
        )

    def async_client(self) -> AsyncOpenAI:
        """An unwrapped AsyncOpenAI client talking to this server."""
        return AsyncOpenAI(
            api_key="sk-test",
            base_url=API_BASE,
            http_client=httpx.AsyncClient(transport=httpx.MockTransport(self.handle_async)),  # type: ignore[arg-type]
            max_retries=0,
        )


def _chunk(name: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": name,
        "object": "chat.completion.chunk",
        "created": 1727900000,
        "model": "m",
        "choices": [
            {"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}
        ],
    }


def _sse(events: list[dict[str, Any]], *, done: bool = True) -> list[bytes]:
    parts = [f"data: {json.dumps(event)}\n\n".encode() for event in events]
    return [*parts, b"data: [DONE]\n\n"] if done else parts


class ServerChatModel(BaseChatModel):
    """A LangChain chat model backed by the server, as ``ChatOpenAI`` is by OpenAI.

    ``max_tokens`` is a field, so LangChain passes it in the invocation parameters (the
    callback handler reads it there) and the middleware finds it on the model.
    """

    server: Any
    max_tokens: int | None = None

    @property
    def _llm_type(self) -> str:
        return "ledger-server"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        wire = [{"role": "user", "content": str(m.content)} for m in messages]
        limit = kwargs.get("max_tokens", self.max_tokens)
        completion = self.server.client().chat.completions.create(
            model="m", messages=wire, max_tokens=limit
        )
        usage = completion.usage
        message = AIMessage(
            completion.choices[0].message.content or "",
            id=completion.id,
            usage_metadata={
                "input_tokens": usage.prompt_tokens,
                "output_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Any, **kwargs: Any) -> ServerChatModel:  # type: ignore[override]
        """Tools are not used by these tests' model."""
        return self
