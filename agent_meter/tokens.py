"""LLM token usage: one value per LLM call, and which features it is billed to.

One LLM call is one track of ``total_tokens`` (a batch value), or two tracks (input and
output tokens) when those have features of their own. Integrations (the LangChain callback
handler and middleware, the OpenAI client wrapper) read usage into a :class:`TokenUsage`
and hand it to :meth:`agent_meter.Meter.track_tokens`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent_meter.errors import ConfigError, InvalidUsage

__all__ = ["TokenFeatures", "TokenUsage", "check_gate_estimate"]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The tokens of one LLM call.

    Attributes:
        input_tokens: Prompt tokens.
        output_tokens: Completion tokens.
        total_tokens: Their sum as the provider reports it.
        model: The model name, when known (for summaries and warnings).
    """

    input_tokens: int
    output_tokens: int
    total_tokens: int
    model: str | None = None

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens", "total_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                msg = f"{name} must be a non-negative integer, got {value!r}"
                raise InvalidUsage(msg)


@dataclass(frozen=True, slots=True)
class TokenFeatures:
    """Where token usage is billed.

    Attributes:
        total: The feature that receives ``total_tokens`` (``"llm_tokens"``), used when
            ``input`` and ``output`` are not both set.
        input: The feature that receives input tokens, if split.
        output: The feature that receives output tokens, if split.
    """

    total: str | None = "llm_tokens"
    input: str | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        if (self.input is None) != (self.output is None):
            msg = "set both input_feature_id and output_feature_id, or neither"
            raise ConfigError(msg)
        if self.total is None and self.input is None:
            msg = "token metering needs feature_id, or input_feature_id and output_feature_id"
            raise ConfigError(msg)

    @property
    def split(self) -> bool:
        """Whether input and output tokens go to features of their own."""
        return self.input is not None

    @property
    def gate_feature(self) -> str:
        """The feature whose balance decides whether another LLM call may start."""
        return self.input if self.input is not None else self.total  # type: ignore[return-value]

    @property
    def billed(self) -> tuple[str, ...]:
        """Every feature that receives tokens."""
        if self.input is not None and self.output is not None:
            return (self.input, self.output)
        return (self.total,) if self.total is not None else ()

    def values(self, usage: TokenUsage) -> list[tuple[str, int]]:
        """The (feature, tokens) tracks for ``usage``; zero counts are left out."""
        if self.input is not None and self.output is not None:
            pairs = [(self.input, usage.input_tokens), (self.output, usage.output_tokens)]
        else:
            pairs = [(self.total, usage.total_tokens)]  # type: ignore[list-item]
        return [(feature, tokens) for feature, tokens in pairs if tokens]


def check_gate_estimate(value: object) -> float:
    """The tokens an LLM call must have credit for before it starts (a positive number).

    Raises:
        ConfigError: ``value`` is not a positive, finite number.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        msg = f"gate_estimate must be a positive number of tokens, not {value!r}"
        raise ConfigError(msg)
    return float(value)
