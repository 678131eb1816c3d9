"""Fixtures shared by the test suite: the example pricing and a backend of each kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Pricing, SQLiteBackend
from agent_meter.testing import MemoryBackend

PRICING_TOML = """
[features]
web_search = "metered"
code_exec = "metered"
llm_tokens = "metered"
premium = "boolean"

[credit_systems.credits]      # feature -> credits per unit
web_search = 1
code_exec = 2
llm_tokens = 0.001

[plans.agent_free]
auto_enable = true            # attached to every new customer
interval = "month"            # when included balances reset
grants = { credits = 100, premium = true }
"""


class FakeClock:
    """A clock tests move by hand, to cross plan resets."""

    def __init__(self, now: float = 1_790_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def pricing_file(tmp_path: Path) -> Path:
    path = tmp_path / "pricing.toml"
    path.write_text(PRICING_TOML)
    return path


@pytest.fixture
def pricing() -> Pricing:
    return Pricing.from_toml(PRICING_TOML, source="pricing.toml")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def memory_backend(pricing: Pricing) -> MemoryBackend:
    return MemoryBackend(pricing=pricing)


@pytest.fixture
def sqlite_backend(pricing: Pricing, tmp_path: Path) -> Iterator[SQLiteBackend]:
    backend = SQLiteBackend(tmp_path / "usage.db", pricing=pricing)
    yield backend
    backend.close()


@pytest.fixture(params=["memory", "sqlite"])
def backend(
    request: pytest.FixtureRequest, pricing: Pricing, tmp_path: Path, clock: FakeClock
) -> Iterator[MemoryBackend | SQLiteBackend]:
    """Each embedded backend in turn, on a fake clock."""
    if request.param == "memory":
        yield MemoryBackend(pricing=pricing, clock=clock)
        return
    sqlite = SQLiteBackend(tmp_path / "contract.db", pricing=pricing, clock=clock)
    yield sqlite
    sqlite.close()
