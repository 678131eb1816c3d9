"""Read the token usage the OpenAI API reports into a :class:`~agent_meter.tokens.TokenUsage`.

Chat Completions report ``prompt_tokens`` / ``completion_tokens`` / ``total_tokens`` on
``completion.usage``; a stream reports them once, on its last chunk, and only when the
request asked for ``stream_options={"include_usage": True}``. The Responses API reports
``input_tokens`` / ``output_tokens`` / ``total_tokens`` on ``response.usage``, and a stream
carries the finished response on its ``response.completed`` event. Each reader accepts the
SDK object or its dict form and answers None when the usage is absent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent_meter.tokens import TokenUsage

__all__ = ["usage_from_chunk", "usage_from_completion", "usage_from_response"]


def field(obj: object, name: str) -> Any:
    """``obj.name`` for an SDK object, ``obj[name]`` for its dict form; None when absent."""
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _usage(obj: object, input_name: str, output_name: str) -> TokenUsage | None:
    usage = field(obj, "usage")
    if usage is None:
        return None
    input_tokens = field(usage, input_name) or 0
    output_tokens = field(usage, output_name) or 0
    total = field(usage, "total_tokens")
    model = field(obj, "model")
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        # Older and third-party servers omit the total; the sum is what it would say.
        total_tokens=input_tokens + output_tokens if total is None else total,
        model=model if isinstance(model, str) and model else None,
    )


def usage_from_completion(completion: object) -> TokenUsage | None:
    """The tokens of a ``ChatCompletion`` (or its dict form), None when it has no usage.

    Example:
        >>> usage_from_completion(client.chat.completions.create(...)).total_tokens
        1830
    """
    return _usage(completion, "prompt_tokens", "completion_tokens")


def usage_from_chunk(chunk: object) -> TokenUsage | None:
    """The tokens on a ``ChatCompletionChunk``, None on all but a stream's last chunk.

    A stream reports usage only when it was asked for with
    ``stream_options={"include_usage": True}``, on a last chunk whose ``choices`` is empty.
    """
    return _usage(chunk, "prompt_tokens", "completion_tokens")


def usage_from_response(response: object) -> TokenUsage | None:
    """The tokens of a Responses API ``Response`` (or its dict form), None when absent."""
    return _usage(response, "input_tokens", "output_tokens")
