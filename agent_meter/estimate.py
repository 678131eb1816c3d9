"""What an LLM call may cost, known before it runs: its prompt's tokens plus its limit.

An LLM call is reserved before it starts (:mod:`agent_meter.reservation`), so its cost
must be estimated from what the call will send:

- **input tokens**: the prompt's text counted with a :data:`TokenCounter`. The default,
  :func:`count_text_tokens`, needs no tokenizer: ``ceil(UTF-8 bytes / 3)`` per text, plus
  :data:`MESSAGE_OVERHEAD` tokens per message and :data:`REPLY_OVERHEAD` for the reply's
  priming (OpenAI's chat format). Byte-level BPE tokenizers (GPT, Claude, Llama) spend
  about 4 bytes per token on English and 2-3 on code or other scripts, so the default
  errs on the high side for most text; a reservation that is too high only holds credit
  until the call ends (the rest is given back), one too low is charged after the call.
  A model's own tokenizer counts exactly: pass ``estimate=`` a function of the text,
  e.g. ``lambda text: len(encoding.encode(text))`` with a ``tiktoken`` encoding. tiktoken
  downloads its encodings on first use (they do not ship in the package) and agent_meter
  never downloads anything, so it is not the default;
- **output tokens**: the completion limit the call sets (``max_tokens``,
  ``max_completion_tokens`` or ``max_output_tokens``: :func:`completion_limit`), else a
  default budget (:data:`DEFAULT_MAX_TOKENS`, configurable).

Only text is counted: images, audio and files in a prompt are not (their cost is charged
after the call, from the usage the provider reports).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent_meter.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "LIMIT_PARAMS",
    "MESSAGE_OVERHEAD",
    "REPLY_OVERHEAD",
    "Estimator",
    "TokenCounter",
    "TokenEstimate",
    "completion_limit",
    "count_text_tokens",
    "estimator",
    "prompt_texts",
]

TokenCounter = Callable[[str], int]
"""Counts the tokens of one text (a model's tokenizer, or :func:`count_text_tokens`)."""

DEFAULT_MAX_TOKENS = 1024
"""Output tokens reserved for a call that sets no completion limit."""

MESSAGE_OVERHEAD = 4
"""Tokens each message adds around its text (role and separators in OpenAI's format)."""

REPLY_OVERHEAD = 3
"""Tokens that prime the reply."""

LIMIT_PARAMS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
"""The parameters that limit a completion: OpenAI chat (old and new names), Anthropic,
Responses API and Google."""

_BYTES_PER_TOKEN = 3
# Prompt parts that are not text the model reads as tokens (binary payloads, links); the
# provider reports what they cost after the call.
_NOT_TEXT = frozenset({"image_url", "data", "url", "file_data", "file_id", "audio", "source"})
# Metadata keys of a message that are not sent to the model as text.
_METADATA = frozenset({"id", "type", "role", "tool_call_id", "index", "status", "name"})


def count_text_tokens(text: str) -> int:
    """The default token count of ``text``: ``ceil(UTF-8 bytes / 3)`` (see the module)."""
    return math.ceil(len(text.encode("utf-8")) / _BYTES_PER_TOKEN)


def _walk(value: object, out: list[str]) -> None:
    # Runs before every LLM call: the common shapes (texts, lists, dicts, messages) are
    # tested first, and a message's tool calls read from its fields, because a missing
    # attribute of a pydantic model costs a raised and caught AttributeError.
    if isinstance(value, str):
        if value:
            out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _walk(item, out)
    elif isinstance(value, (dict, Mapping)):  # dict first: no ABC check for the common case
        for key, item in value.items():
            if key not in _NOT_TEXT and key not in _METADATA:
                _walk(item, out)
    elif hasattr(value, "content"):  # a LangChain message
        _walk(value.content, out)
        fields = getattr(value, "__dict__", None)
        calls = (
            fields.get("tool_calls") if fields is not None else getattr(value, "tool_calls", None)
        )
        for call in calls or ():
            _walk(call.get("name"), out)
            out.append(json.dumps(call.get("args") or {}, default=str))
    elif value is not None and not isinstance(value, (int, float, bool)):
        dump = getattr(value, "model_dump", None)  # an OpenAI SDK object
        if callable(dump):
            _walk(dump(exclude_none=True), out)


def prompt_texts(prompt: object) -> list[str]:
    """The texts of a prompt: a string, messages (LangChain, OpenAI dicts) or nested lists."""
    out: list[str] = []
    _walk(prompt, out)
    return out


def _messages(prompt: object) -> int:
    """How many messages ``prompt`` holds (1 for a plain string)."""
    if isinstance(prompt, (list, tuple)):
        count = 0
        for item in prompt:
            count += _messages(item)
        return count
    return 0 if prompt is None else 1


def completion_limit(*sources: Mapping[str, Any] | None) -> int | None:
    """The first completion limit set in ``sources`` (request, settings, model), if any.

    A limit is a positive integer under one of :data:`LIMIT_PARAMS`; ``None`` and other
    values are skipped (LangChain passes ``max_tokens=None`` for "not set").
    """
    for source in sources:
        if not source:
            continue
        for name in LIMIT_PARAMS:
            value = source.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """The tokens an LLM call is expected to use at most.

    Attributes:
        input_tokens: The prompt's tokens.
        output_tokens: The completion's limit (or the default budget).
    """

    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        """Input and output together."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class Estimator:
    """Estimates an LLM call's tokens before it runs.

    Attributes:
        count: Counts the tokens of one text (:func:`count_text_tokens` by default).
        default_max_tokens: Output tokens reserved for a call that sets no limit.
        fixed: Reserve exactly this many tokens per call, whatever the prompt (as input
            tokens); None to count the prompt and the limit.
    """

    count: TokenCounter = count_text_tokens
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    fixed: int | None = None

    def estimate(self, prompt: object, limit: int | None = None) -> TokenEstimate:
        """The tokens a call sending ``prompt`` with completion limit ``limit`` may use.

        Raises:
            ConfigError: The counter returned something other than a non-negative int.
        """
        if self.fixed is not None:
            return TokenEstimate(self.fixed, 0)
        texts = prompt_texts(prompt)
        tokens = MESSAGE_OVERHEAD * _messages(prompt) + REPLY_OVERHEAD
        for text in texts:
            counted = self.count(text)
            if isinstance(counted, bool) or not isinstance(counted, int) or counted < 0:
                msg = f"the token counter returned {counted!r}; it must return an int >= 0"
                raise ConfigError(msg)
            tokens += counted
        return TokenEstimate(tokens, limit if limit is not None else self.default_max_tokens)


def _tokens(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        msg = f"{name} must be a whole number of tokens, not {value!r}"
        raise ConfigError(msg)
    if value < 0 or int(value) != value:
        msg = f"{name} must be a whole number of tokens >= 0, not {value!r}"
        raise ConfigError(msg)
    return int(value)


def estimator(
    estimate: Estimator | TokenCounter | float | None = None,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Estimator:
    """Build the :class:`Estimator` of an adapter's ``estimate`` option.

    Args:
        estimate: None (count the prompt with :func:`count_text_tokens`), a token counter
            (a model's tokenizer), a number of tokens to reserve per call whatever the
            prompt, or an :class:`Estimator`.
        default_max_tokens: Output tokens reserved for a call that sets no limit.

    Raises:
        ConfigError: ``estimate`` or ``default_max_tokens`` is not one of those.
    """
    budget = _tokens(default_max_tokens, "default_max_tokens")
    if isinstance(estimate, Estimator):
        return estimate
    if estimate is None:
        return Estimator(default_max_tokens=budget)
    if isinstance(estimate, (int, float)) and not isinstance(estimate, bool):
        fixed = _tokens(estimate, "estimate")
        if fixed == 0:
            msg = "estimate must reserve at least 1 token (0 would let every call start free)"
            raise ConfigError(msg)
        return Estimator(default_max_tokens=budget, fixed=fixed)
    if callable(estimate):
        return Estimator(count=estimate, default_max_tokens=budget)
    msg = (
        "estimate must be None, a token counter (a function of a text), a number of "
        f"tokens or an Estimator, not {estimate!r}"
    )
    raise ConfigError(msg)
