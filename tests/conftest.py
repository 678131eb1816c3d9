"""Fixtures shared by the test suite: the example pricing and a backend of each kind."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_meter import Pricing, SQLiteBackend
from agent_meter.meter import _open_meters
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


@pytest.fixture(autouse=True)
def _private_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Meters on remote backends keep their outbox in the test's own folder, never in $HOME."""
    monkeypatch.setenv("AGENT_METER_OUTBOX", str(tmp_path / "outbox.db"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture(autouse=True)
def _stop_meters_after_each_test() -> Iterator[None]:
    """A meter left open by a test must not deliver into the next test's recordings."""
    yield
    for meter in list(_open_meters):
        meter.deliverer.stop()
        _open_meters.discard(meter)


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
