"""Estimating an LLM call before it runs: prompt tokens, completion limit, the options."""

from __future__ import annotations

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from agent_meter.errors import ConfigError
from agent_meter.estimate import (
    DEFAULT_MAX_TOKENS,
    MESSAGE_OVERHEAD,
    REPLY_OVERHEAD,
    Estimator,
    TokenEstimate,
    completion_limit,
    count_text_tokens,
    estimator,
    prompt_texts,
)


def test_default_counter_is_utf8_bytes_over_three_rounded_up() -> None:
    assert count_text_tokens("") == 0
    assert count_text_tokens("abc") == 1
    assert count_text_tokens("abcd") == 2
    assert count_text_tokens("é") == 1  # 2 bytes
    assert count_text_tokens("日本語") == 3  # 9 bytes: about one token per CJK character


def test_prompt_texts_reads_langchain_messages_and_openai_dicts() -> None:
    call = {"name": "search", "args": {"q": "weather"}, "id": "c1", "type": "tool_call"}
    messages = [
        SystemMessage("be brief"),
        HumanMessage(
            content=[
                {"type": "text", "text": "hello"},
                {"type": "image_url", "image_url": {"url": "x" * 999}},
            ]
        ),
        AIMessage("", tool_calls=[call]),
    ]
    assert prompt_texts(messages) == ["be brief", "hello", "search", '{"q": "weather"}']
    openai = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    assert prompt_texts(openai) == ["be brief", "hi"]
    assert prompt_texts("plain") == ["plain"]


def test_estimate_counts_the_prompt_and_the_limit() -> None:
    messages = [{"role": "user", "content": "a" * 30}]
    estimate = Estimator().estimate(messages, limit=200)
    assert estimate == TokenEstimate(10 + MESSAGE_OVERHEAD + REPLY_OVERHEAD, 200)
    assert estimate.total_tokens == 10 + MESSAGE_OVERHEAD + REPLY_OVERHEAD + 200


def test_a_call_without_limit_reserves_the_default_budget() -> None:
    assert Estimator().estimate("hi").output_tokens == DEFAULT_MAX_TOKENS
    assert estimator(None, default_max_tokens=50).estimate("hi").output_tokens == 50


def test_a_users_token_counter_is_used_for_every_text() -> None:
    seen: list[str] = []

    def words(text: str) -> int:
        seen.append(text)
        return len(text.split())

    estimate = estimator(words).estimate(["one two", "three"], limit=5)
    assert seen == ["one two", "three"]
    assert estimate == TokenEstimate(3 + 2 * MESSAGE_OVERHEAD + REPLY_OVERHEAD, 5)


def test_a_fixed_estimate_ignores_the_prompt() -> None:
    assert estimator(700).estimate(["x" * 10_000], limit=5) == TokenEstimate(700, 0)


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        (({"max_tokens": 100},), 100),
        (({"max_completion_tokens": 50},), 50),
        (({"max_output_tokens": 70},), 70),
        (({"max_tokens": None, "max_completion_tokens": 9},), 9),  # LangChain's "not set"
        (({}, None, {"max_tokens": 12}), 12),  # the first source that sets one wins
        (({"max_tokens": 1}, {"max_tokens": 12}), 1),
        (({"max_tokens": True},), None),
        (({"max_tokens": 0},), None),
        (({"temperature": 0.2},), None),
    ],
)
def test_completion_limit(
    sources: tuple[dict[str, object] | None, ...], expected: int | None
) -> None:
    assert completion_limit(*sources) == expected


@pytest.mark.parametrize(
    ("estimate", "budget", "match"),
    [
        (0, 10, "at least 1 token"),
        (-5, 10, "estimate"),
        (1.5, 10, "estimate"),
        ("lots", 10, "estimate must be"),
        (None, -1, "default_max_tokens"),
        (None, float("nan"), "default_max_tokens"),
    ],
)
def test_bad_options_are_config_errors(estimate: object, budget: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        estimator(estimate, default_max_tokens=budget)  # type: ignore[arg-type]


def test_a_counter_returning_nonsense_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="token counter returned"):
        estimator(lambda text: -1).estimate("hi")
