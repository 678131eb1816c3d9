"""Shared fakes for the token-metering tests: a scripted chat model and the example pricing."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import PrivateAttr

from agent_meter import Plan, Pricing

CUSTOMER = "cus_1"
TOKEN_RATE = Decimal("0.001")
INPUT_RATE = Decimal("0.001")
OUTPUT_RATE = Decimal("0.004")


def make_pricing() -> Pricing:
    """DESIGN.md §7's pricing, plus split input/output token features."""
    return Pricing(
        features={
            "web_search": "metered",
            "code_exec": "metered",
            "llm_tokens": "metered",
            "llm_input": "metered",
            "llm_output": "metered",
            "premium": "boolean",
        },
        credit_systems={
            "credits": {
                "web_search": 1,
                "code_exec": 2,
                "llm_tokens": float(TOKEN_RATE),
                "llm_input": float(INPUT_RATE),
                "llm_output": float(OUTPUT_RATE),
            }
        },
        plans={"agent_free": Plan(auto_enable=True, grants={"credits": 100, "premium": True})},
    )


def usage(input_tokens: int, output_tokens: int) -> UsageMetadata:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "input_token_details": {},
        "output_token_details": {},
    }


def reply(
    content: str = "done",
    *,
    tokens: tuple[int, int] | None = (12, 30),
    tool_calls: Sequence[dict[str, Any]] = (),
) -> AIMessage:
    """A scripted reply; ``tokens=None`` leaves out usage_metadata."""
    return AIMessage(
        content=content,
        tool_calls=list(tool_calls),
        usage_metadata=usage(*tokens) if tokens is not None else None,
    )


def credits_left(start: float | int, *spent: Decimal) -> float:
    """The balance after ``spent``, computed exactly (as the nano-credit ledgers do)."""
    return float(Decimal(str(start)) - sum(spent, Decimal(0)))


class ScriptedChatModel(BaseChatModel):
    """A chat model that plays back ``replies`` in order (cycling) and counts its calls.

    ``stream`` yields the reply word by word and puts its usage on the last chunk only, as
    OpenAI does with ``include_usage``. ``llm_output`` is returned from ``_generate`` to
    exercise the legacy ``llm_output["token_usage"]`` path.
    """

    replies: list[AIMessage]
    model: str = "scripted-1"
    llm_output: dict[str, Any] | None = None
    _calls: int = PrivateAttr(default=0)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def calls(self) -> int:
        """How many times the model was really called (generate or stream)."""
        return self._calls

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _next(self) -> AIMessage:
        with self._lock:
            index = self._calls
            self._calls += 1
        scripted = self.replies[index % len(self.replies)]
        return scripted.model_copy(update={"response_metadata": {"model_name": self.model}})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(
            generations=[ChatGeneration(message=self._next())], llm_output=self.llm_output
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        message = self._next()
        words = str(message.content).split(" ")
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content=word if i == 0 else f" {word}",
                    usage_metadata=message.usage_metadata if last else None,
                    response_metadata=message.response_metadata if last else {},
                )
            )

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        """The script already knows which tools it calls."""
        return self
