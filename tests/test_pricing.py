"""Pricing files: what they define, and a clear ConfigError for every mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent_meter import ConfigError, FeatureType, Plan, Pricing
from tests.conftest import PRICING_TOML


def test_the_example_file_loads(pricing_file: Path) -> None:
    pricing = Pricing.from_file(pricing_file)
    assert pricing.feature_type("premium") is FeatureType.BOOLEAN
    assert pricing.pool_of("llm_tokens") is not None
    assert str(pricing.pool_of("llm_tokens")[1]) == "0.001"  # type: ignore[index]
    assert pricing.pool_of("premium") is None
    assert [plan_id for plan_id, _ in pricing.auto_plans()] == ["agent_free"]


def test_pricing_built_in_python() -> None:
    pricing = Pricing(
        features={"web_search": "metered", "premium": "boolean"},  # strings, as in the docs
        credit_systems={"credits": {"web_search": 1}},
        plans={"free": Plan(auto_enable=True, grants={"credits": 10, "premium": True})},
    )
    assert pricing.describe() == [
        ("web_search", "metered", "1 credit per unit"),
        ("premium", "boolean", "-"),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ('premium = "boolean"', 'premium = "bool"'),
            "features.premium: unknown feature type 'bool'",
        ),
        (
            ("code_exec = 2", "code_exec = -2"),
            "credit_systems.credits.code_exec: the cost must be a positive",
        ),
        (
            ("code_exec = 2", "code_exec = 0"),
            "credit_systems.credits.code_exec: the cost must be a positive",
        ),
        (("code_exec = 2", 'code_exec = "two"'), "credit_systems.credits.code_exec"),
        (
            ("llm_tokens = 0.001", "llm_tokens = 0.001\nimage_gen = 5"),
            "credit_systems.credits.image_gen: feature 'image_gen' is not declared",
        ),
        (
            ("premium = true }", "premium = true, ghost = 3 }"),
            "plans.agent_free.grants.ghost: 'ghost' is neither",
        ),
        (
            ("premium = true }", "premium = 4 }"),
            "plans.agent_free.grants.premium: feature 'premium' is boolean",
        ),
        (("credits = 100", "credits = -5"), "plans.agent_free.grants.credits"),
        (('interval = "month"', 'interval = "fortnight"'), "plans.agent_free.interval"),
        (("[plans.agent_free]", "[plans.agent_free]\nsurprise = 1"), "plans.agent_free.surprise"),
        (("[features]", '[features]\nweb_search = "metered"'), "not valid TOML"),
        (
            ("web_search = 1\n", "web_search = 1\npremium = 1\n"),
            "credit_systems.credits.premium: only metered",
        ),
    ],
)
def test_every_mistake_names_the_file_and_the_key(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    path = tmp_path / "broken.toml"
    old, new = change
    assert old in PRICING_TOML
    path.write_text(PRICING_TOML.replace(old, new, 1))
    with pytest.raises(ConfigError) as error:
        Pricing.from_file(path)
    assert str(error.value).startswith(f"{path}: ")
    assert message in str(error.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the pricing file"):
        Pricing.from_file(tmp_path / "absent.toml")


def test_a_feature_draws_from_one_pool_only() -> None:
    text = PRICING_TOML + "\n[credit_systems.other]\nweb_search = 3\n"
    with pytest.raises(ConfigError, match="already draws from 'credits'"):
        Pricing.from_toml(text)


def test_pricing_round_trips_through_json(pricing: Pricing) -> None:
    again = Pricing.model_validate_json(pricing.model_dump_json())
    assert again == pricing
    assert again.pool_of("code_exec") == pricing.pool_of("code_exec")
