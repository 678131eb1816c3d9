"""What a newcomer reads: messages that say what happened, pricing read exactly as written."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent_meter import (
    BackendError,
    ConfigError,
    Meter,
    Pricing,
    SQLiteBackend,
    UsageLimitExceeded,
)
from agent_meter.cli import cli
from agent_meter.testing import MemoryBackend

BASE = '[features]\nweb_search = "metered"\n'

# -- 10: messages ---------------------------------------------------------------------------


def test_one_credit_is_singular(pricing: Pricing) -> None:
    backend = MemoryBackend(pricing=pricing)
    meter = Meter(backend)
    backend.set_balance("cus_1", "credits", 1)
    with pytest.raises(UsageLimitExceeded) as denied, meter.guard("cus_1", "code_exec"):
        pass
    assert str(denied.value) == "code_exec is unavailable: 1 credit left, 2 needed"
    backend.set_balance("cus_1", "credits", 1.5)
    with pytest.raises(UsageLimitExceeded) as denied, meter.guard("cus_1", "code_exec"):
        pass
    assert str(denied.value) == "code_exec is unavailable: 1.5 credits left, 2 needed"
    meter.close()


def test_a_refused_check_reads_as_english(pricing: Pricing) -> None:
    backend = MemoryBackend(pricing=pricing)
    backend.fail(BackendError("invalid secret key"), method="check")
    meter = Meter(backend)
    with pytest.raises(BackendError) as refused, meter.guard("cus_1", "web_search"):
        pass
    assert str(refused.value).startswith(
        "web_search is unavailable: the billing service refused the check (customer 'cus_1')"
    )
    meter.close()


@pytest.mark.parametrize("backend", [None, "usage.db", object()])
def test_a_meter_without_a_backend_is_refused_at_construction(backend: object) -> None:
    with pytest.raises(ConfigError, match=r"Meter needs a backend with check\(\) and track\(\)"):
        Meter(backend)  # type: ignore[arg-type]


def test_a_closed_meter_says_it_is_closed(tmp_path: Path, pricing: Pricing) -> None:
    meter = Meter(SQLiteBackend(tmp_path / "usage.db", pricing=pricing))
    meter.close()
    for use in (
        lambda: meter.guard("cus_1", "web_search").__enter__(),
        lambda: meter.check("cus_1", "web_search"),
        lambda: meter.track("cus_1", "web_search", 1),
    ):
        with pytest.raises(ConfigError, match="this meter is closed") as closed:
            use()
        assert "billing service" not in str(closed.value)


async def test_a_closed_meter_says_it_is_closed_to_async_callers(pricing: Pricing) -> None:
    meter = Meter(MemoryBackend(pricing=pricing))
    await meter.aclose()
    with pytest.raises(ConfigError, match="this meter is closed"):
        async with meter.aguard("cus_1", "web_search"):
            pass
    with pytest.raises(ConfigError, match="this meter is closed"):
        await meter.atrack("cus_1", "web_search", 1)


def test_a_binary_pricing_file_names_the_file(tmp_path: Path) -> None:
    binary = tmp_path / "pricing.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConfigError) as refused:
        Pricing.from_file(binary)
    assert str(refused.value).startswith(f"{binary}: not a pricing file: not UTF-8 text")
    result = CliRunner().invoke(cli, ["pricing", "check", str(binary)])
    assert result.exit_code == 1
    assert result.stderr == f"error: {binary}: not a pricing file: not UTF-8 text (byte 0)\n"


@pytest.mark.parametrize("credits", ["-5", "nan", "inf", "2000000"])
def test_demo_credits_out_of_range_are_a_usage_error(credits: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["demo", "--db", str(tmp_path / "d.db"), "--credits", credits])
    assert result.exit_code == 2
    assert "Invalid value for '--credits'" in result.stderr
    assert "units" not in result.stderr
    assert not (tmp_path / "d.db").exists()


# -- 11: the pricing loader validates ids and costs as calls are validated -------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        (BASE + "[credit_systems.credits]\nweb_search = true\n", "must be a number, not true"),
        (BASE + '[credit_systems.credits]\nweb_search = "2"\n', 'must be a number, not "2"'),
        (BASE + '[plans.p]\ngrants = { web_search = "2" }\n', "'2' is not an amount"),
        (BASE + '[plans.p]\ngrants = { web_search = "true" }\n', "'true' is not an amount"),
        (BASE + '[plans.p]\nauto_enable = "yes"\n', 'must be true or false, not "yes"'),
        ('[features]\n"" = "metered"\n', "the id '' is not usable: must not be empty"),
        ('[features]\n"  " = "metered"\n', "the id '  ' is not usable: must not be empty"),
        ('[features]\n"a\\u0000b" = "metered"\n', "contains control or separator characters"),
        ('[features]\n"' + "f" * 257 + '" = "metered"\n', "the limit is 256"),
        (BASE + '[credit_systems." "]\nweb_search = 1\n', "credit_systems: the id ' '"),
        (BASE + '[plans."\\t"]\nauto_enable = true\n', "plans: the id '\\t'"),
    ],
)
def test_pricing_rejects_what_no_call_could_use(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        Pricing.from_toml(toml, source="pricing.toml")
    assert str(refused.value).startswith("pricing.toml: ")
    assert message in str(refused.value)


def test_pricing_keeps_numbers_that_are_numbers() -> None:
    pricing = Pricing.from_toml(
        BASE + "[credit_systems.credits]\nweb_search = 2\n"
        "[plans.p]\nauto_enable = true\ngrants = { credits = 10.5 }\n"
    )
    assert pricing.credit_systems["credits"]["web_search"] == 2
    assert pricing.plans["p"].grants["credits"] == 10.5


# -- 12: a key reused with a different value -------------------------------------------------


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_a_key_reused_with_another_value_says_which_value_stands(
    kind: str, tmp_path: Path, pricing: Pricing, caplog: pytest.LogCaptureFixture
) -> None:
    backend = (
        SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
        if kind == "sqlite"
        else MemoryBackend(pricing=pricing)
    )
    meter = Meter(backend)
    first = meter.track("cus_1", "llm_tokens", 1830, idempotency_key="run-7")
    assert (first.value, first.duplicate) == (1830, False)
    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        again = meter.track("cus_1", "llm_tokens", 5000, idempotency_key="run-7")
    assert again.duplicate
    assert again.value == 1830  # the value that stands, not the one just sent
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "was recorded before with 1830 units of 'llm_tokens'" in warnings[0]
    assert "the new value 5000 was not applied" in warnings[0]
    assert backend.balances("cus_1")["credits"] == pytest.approx(100 - 1.83)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="agent_meter"):
        same = meter.track("cus_1", "llm_tokens", 1830, idempotency_key="run-7")
    assert (same.value, same.duplicate) == (1830, True)
    assert not caplog.records  # a plain retry is not worth a warning
    meter.close()
