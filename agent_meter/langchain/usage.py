"""Read the token usage of one LangChain LLM call into a :class:`~agent_meter.tokens.TokenUsage`.

Usage comes from ``AIMessage.usage_metadata`` (every chat model in langchain-core 1.x; a
streamed reply carries it once the stream is merged, when the model was asked for it with
``stream_usage=True`` or OpenAI's ``include_usage``), else from the legacy
``llm_output["token_usage"]`` (OpenAI-style ``prompt_tokens``/``completion_tokens``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult

from agent_meter.tokens import TokenUsage

__all__ = ["model_name_of", "usage_from_message", "usage_from_result"]

_INPUT_KEYS = ("input_tokens", "prompt_tokens")
_OUTPUT_KEYS = ("output_tokens", "completion_tokens")


def _count(values: Mapping[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = values.get(key)
        # Providers report integers; a float like 12.0 from a JSON round trip is accepted.
        if (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and value >= 0
            and value == int(value)
        ):
            return int(value)
    return None


def _usage(values: Mapping[str, Any] | None, model: str | None) -> TokenUsage | None:
    if not values:
        return None
    input_tokens = _count(values, _INPUT_KEYS)
    output_tokens = _count(values, _OUTPUT_KEYS)
    total = _count(values, ("total_tokens",))
    if input_tokens is None and output_tokens is None and total is None:
        return None
    input_tokens = input_tokens or 0
    output_tokens = output_tokens or 0
    if total is None:
        total = input_tokens + output_tokens
    return TokenUsage(input_tokens, output_tokens, total, model)


def model_name_of(message: BaseMessage) -> str | None:
    """The model that wrote ``message``, from its ``response_metadata``, if it says."""
    metadata = message.response_metadata or {}
    for key in ("model_name", "model", "model_id"):
        value = metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def usage_from_message(message: BaseMessage, model: str | None = None) -> TokenUsage | None:
    """The tokens of the call that produced ``message``, or None if it carries none.

    Args:
        message: A reply of a chat model (an ``AIMessage`` or a merged ``AIMessageChunk``).
        model: The model name to record when the message does not name one.
    """
    if not isinstance(message, AIMessage):
        return None
    name = model_name_of(message) or model
    return _usage(message.usage_metadata, name)


def usage_from_result(response: LLMResult, model: str | None = None) -> TokenUsage | None:
    """The tokens of one LLM run, as ``on_llm_end`` receives it, or None if unreported.

    The first generation's ``usage_metadata`` wins (as in langchain-core's own
    ``UsageMetadataCallbackHandler``; with ``n > 1`` providers repeat the call's usage on
    every generation, so adding them up would overcount); ``llm_output["token_usage"]``
    is the fallback for models that only report it there.

    Args:
        response: The result passed to ``on_llm_end``.
        model: The model name to record when the result does not name one.
    """
    for generations in response.generations:
        for generation in generations:
            if isinstance(generation, ChatGeneration):
                usage = usage_from_message(generation.message, model)
                if usage is not None:
                    return usage
                model = model_name_of(generation.message) or model
    llm_output = response.llm_output or {}
    name = llm_output.get("model_name") or llm_output.get("model") or model
    token_usage = llm_output.get("token_usage") or llm_output.get("usage")
    if not isinstance(token_usage, Mapping):
        return None
    return _usage(token_usage, name if isinstance(name, str) else model)
