"""The ledgers' books under random sequences of faults (issue 12).

Random sequences of guarded calls (succeeding, failing, replayed), direct tracks, price
changes, plan resets and crashes (a reservation abandoned, then recovered) run on the
in-memory and the SQLite ledger side by side. Both must end every step with the same
balance, equal to a model of the rules: conservation (balance = grant - billed + refunded
within the period), never below 0, and never above the grant (a refund gives back exactly
what its reservation deducted, and nothing across a reset).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.errors import UsageLimitExceeded
from agent_meter.testing import MemoryBackend
from tests.conftest import PRICING_TOML, FakeClock

NANO = 10**9
GRANT = 100 * NANO
MONTH = 31 * 86_400
RATES = (1, 2, 3)  # credits per unit of code_exec, as the price changes


def _pricing(rate: int) -> Pricing:
    return Pricing.from_toml(PRICING_TOML.replace("code_exec = 2", f"code_exec = {rate}"))


@dataclass
class Model:
    """What the books must say: one balance, in nano, and the abandoned reservations."""

    balance: int = GRANT
    period: int = 0
    rate: int = 2
    crashed: list[tuple[int, int]] = field(default_factory=list)  # (deducted, period)

    def cost(self, units: int) -> int:
        return units * self.rate * NANO


class Books:
    """The two ledgers and their meters, driven together."""

    def __init__(self, folder: Path) -> None:
        self.clock = FakeClock()
        self.folder = folder
        self.memory = MemoryBackend(pricing=_pricing(2), clock=self.clock)
        self.sqlite = SQLiteBackend(folder / "usage.db", pricing=_pricing(2), clock=self.clock)
        self.meters = [Meter(b, recover_on_start=False) for b in (self.memory, self.sqlite)]
        self.abandoned: list[list[Any]] = [[], []]

    def backends(self) -> tuple[Any, Any]:
        return self.memory, self.sqlite

    def reprice(self, rate: int) -> None:
        self.memory._pricing = _pricing(rate)
        self.meters[0].pricing = self.memory.pricing
        self.sqlite.close()
        self.sqlite = SQLiteBackend(
            self.folder / "usage.db",
            pricing=_pricing(rate),
            clock=self.clock,
            replace_pricing=True,
        )
        self.meters[1] = Meter(self.sqlite, recover_on_start=False)

    def balances(self) -> list[float]:
        return [float(b.balances("cus_p")["credits"]) for b in self.backends()]


operation = st.one_of(
    st.tuples(st.just("succeed"), st.integers(1, 6)),
    st.tuples(st.just("fail"), st.integers(1, 6)),
    st.tuples(st.just("track"), st.integers(1, 60)),
    st.tuples(st.just("replay"), st.integers(0, 30)),
    st.tuples(st.just("reprice"), st.sampled_from(RATES)),
    st.tuples(st.just("reset"), st.just(0)),
    st.tuples(st.just("crash"), st.integers(1, 6)),
    st.tuples(st.just("recover"), st.just(0)),
)


def _guard(meter: Meter, units: int, call_id: str, *, fail: bool) -> bool:
    """Run one guarded call; True when it was admitted."""
    try:
        with meter.guard("cus_p", "code_exec", units, call_id=call_id):
            if fail:
                raise RuntimeError("the tool failed")
    except UsageLimitExceeded:
        return False
    except RuntimeError:
        return True
    return True


def _step(books: Books, model: Model, op: str, arg: int, n: int, succeeded: list[str]) -> None:
    if op in ("succeed", "fail"):
        cost = model.cost(arg)
        admitted = [_guard(m, arg, f"c{n}", fail=op == "fail") for m in books.meters]
        assert admitted[0] == admitted[1] == (model.balance >= cost)
        if admitted[0] and op == "succeed":
            model.balance -= cost
            succeeded.append(f"c{n}")
    elif op == "track":
        for meter in books.meters:
            meter.track("cus_p", "code_exec", arg, idempotency_key=f"t{n}")
        model.balance = max(model.balance - model.cost(arg), 0)
    elif op == "replay":
        if succeeded:
            call_id = succeeded[arg % len(succeeded)]
            for meter in books.meters:
                assert _guard(meter, 1, call_id, fail=False)  # replayed: runs, not billed
    elif op == "reprice":
        books.reprice(arg)
        model.rate = arg
    elif op == "reset":
        books.clock.advance(MONTH)
        model.balance, model.period = GRANT, model.period + 1
    elif op == "crash":  # reserved, then the process died before settling
        cost = model.cost(arg)
        entered = []
        for index, meter in enumerate(books.meters):
            guard = meter.guard("cus_p", "code_exec", arg, call_id=f"x{n}")
            try:
                guard.__enter__()
            except UsageLimitExceeded:
                entered.append(False)
                continue
            entered.append(True)
            books.abandoned[index].append(guard)
        assert entered[0] == entered[1] == (model.balance >= cost)
        if entered[0]:
            model.balance -= cost
            model.crashed.append((cost, model.period))
    elif op == "recover":  # what recover() does for a dead owner: release with the refund
        for backend in books.backends():
            for hold in backend.holds():
                assert backend.release(hold.key, hold.refund())
        for cost, period in model.crashed:
            if period == model.period:
                model.balance += cost
        model.crashed.clear()
        books.abandoned = [[], []]


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(ops=st.lists(operation, min_size=1, max_size=25))
@example(ops=[("crash", 2), ("reset", 0), ("recover", 0)])  # a refund across a reset
@example(ops=[("crash", 5), ("reprice", 3), ("recover", 0)])  # a refund after a new price
@example(ops=[("succeed", 3), ("replay", 0), ("fail", 4), ("track", 200), ("fail", 1)])
def test_memory_and_sqlite_keep_the_same_conserved_books(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        books = Books(Path(folder))
        model = Model()
        succeeded: list[str] = []
        books.memory.set_balance("cus_p", "credits", 100)  # both start from the grant
        books.sqlite.set_balance("cus_p", "credits", 100)
        for n, (op, arg) in enumerate(ops):
            _step(books, model, op, arg, n, succeeded)
            memory, sqlite = books.balances()
            assert memory == sqlite, (n, op, arg)
            assert memory == model.balance / NANO, (n, op, arg)
            assert 0 <= memory <= GRANT / NANO  # never below 0, never above the grant
        books.sqlite.close()
