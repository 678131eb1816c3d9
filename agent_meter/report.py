"""Usage reports: what each customer used, per feature, read from an embedded ledger.

An embedded backend (:class:`~agent_meter.SQLiteBackend`,
:class:`~agent_meter.testing.MemoryBackend`) keeps every reservation and track as a
:class:`~agent_meter.UsageEvent`. This module folds those events into one
:class:`FeatureUsage` row per customer and feature, answering "what did customer X spend,
on what?"::

    report = usage_report(backend, since=time.time() - 86_400)
    print(report.table())                    # a table (rich: Console().print(report.table()))
    json.dumps(report.to_dict())             # the same numbers, for scripts

How a guarded call appears in the ledger, and how it is counted:

==============================================  =========================================
events                                          counted as
==============================================  =========================================
``reserve`` (key ``...:hold``)                  one call billed (``reserve`` strategy)
``reserve`` + ``track`` < 0 (key ``...:refund``)  a failed call: refunded, not billed
``track`` (key ``...:track``), value > 0        one call billed (``check_then_track``,
                                                a token batch, a plain ``meter.track``)
``track`` (key ``...:adjust``)                  the real count of a billed call: units
                                                and credits only, no extra call
``track`` < 0 with any other key                a refund given by hand
``denied``                                      one call denied (nothing charged)
==============================================  =========================================

Denied calls are counted from ``denied`` events, which the embedded backends record
(:class:`~agent_meter.backends.base.DenialRecorder`); over events from a source that
does not record them, the denied count is unknown (``None``), never a misleading 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol

from rich.text import Text

from agent_meter.backends.base import DenialRecorder
from agent_meter.results import UsageEvent
from agent_meter.tables import PrintableTable
from agent_meter.wording import amount

__all__ = [
    "EventRole",
    "EventSource",
    "FeatureUsage",
    "UsageReport",
    "build_report",
    "event_role",
    "usage_report",
]

EventRole = Literal["reserve", "track", "refund", "adjust", "denied"]
"""What one ledger event did for its call (see the module docstring)."""

_PLACES = 9  # the ledgers count in billionths of a unit: anything finer is float noise


class EventSource(Protocol):
    """Anything that lists usage events: the embedded backends do."""

    def events(
        self,
        customer_id: str | None = None,
        *,
        since: float | None = None,
        feature_id: str | None = None,
    ) -> list[UsageEvent]:
        """The ledger's events in order, optionally for one customer, feature or period."""
        ...


def event_role(event: UsageEvent) -> EventRole:
    """What ``event`` did for its call, from its kind, its key and the sign of its value.

    Example:
        >>> event_role(refund_event)   # a track with key "am1:cus_1::code_exec:c7:refund"
        'refund'
    """
    if event.kind == "denied":
        return "denied"
    if event.kind == "reserve":
        return "reserve"
    key = event.idempotency_key or ""
    if key.endswith(":refund"):
        return "refund"
    if key.endswith(":adjust"):
        return "adjust"
    if event.value < 0:
        return "refund"
    return "track"


@dataclass(frozen=True, slots=True)
class FeatureUsage:
    """What one customer used of one feature.

    Attributes:
        customer_id: Who was billed (``"*"`` in a total over several customers).
        feature_id: The feature used (``"total"`` in a total row).
        balance_id: Where ``credits`` were drawn from: the credit system (``credits``) or
            the feature itself; ``"*"`` when a total mixes several.
        units: Units of the feature that stayed billed (refunds subtracted); None in a
            total over several features (their units do not add up).
        credits: What those units took off the balance, in ``balance_id`` units (a track
            capped at 0 takes less than it costs).
        billed: Calls billed (a token batch counts as one call).
        refunded: Calls refunded after they failed (and refunds given by hand).
        denied: Calls refused for want of credit; None when the ledger does not record
            denials.
    """

    customer_id: str
    feature_id: str
    balance_id: str
    units: float | None = 0.0
    credits: float = 0.0
    billed: int = 0
    refunded: int = 0
    denied: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row as plain JSON-ready values."""
        return asdict(self)


@dataclass(slots=True)
class _Tally:
    balance_id: str
    units: Decimal = Decimal(0)
    credits: Decimal = Decimal(0)
    billed: int = 0
    refunded: int = 0
    denied: int = 0

    def add(self, event: UsageEvent) -> None:
        role = event_role(event)
        if role == "denied":
            self.denied += 1
            return
        self.units += Decimal(repr(event.value))
        self.credits -= Decimal(repr(event.applied))
        if role == "reserve" or (role == "track" and event.value > 0):
            self.billed += 1
        elif role == "refund":
            self.refunded += 1
            key = event.idempotency_key or ""
            if key.endswith(":refund"):
                self.billed -= 1  # the failed call's reservation is given back


def _number(value: Decimal) -> float:
    return float(round(value, _PLACES)) + 0.0  # + 0.0 turns -0.0 into 0.0


@dataclass(frozen=True, slots=True)
class UsageReport:
    """Usage per customer and feature, with totals.

    Attributes:
        rows: One row per customer and feature, sorted by customer then feature.
        since: The Unix time the report starts at, if it does not cover the whole ledger.
        denials_recorded: Whether the ledger records denied calls (else ``denied`` is
            None everywhere).
        events: How many ledger events the report was built from.
    """

    rows: tuple[FeatureUsage, ...] = ()
    since: float | None = None
    denials_recorded: bool = False
    events: int = 0

    @property
    def customers(self) -> list[str]:
        """The customers in the report, sorted."""
        return sorted({row.customer_id for row in self.rows})

    def for_customer(self, customer_id: str) -> list[FeatureUsage]:
        """The rows of one customer."""
        return [row for row in self.rows if row.customer_id == customer_id]

    def row(self, customer_id: str, feature_id: str) -> FeatureUsage | None:
        """The row of one customer and feature, if it used it."""
        for row in self.rows:
            if row.customer_id == customer_id and row.feature_id == feature_id:
                return row
        return None

    def total(self, customer_id: str | None = None) -> FeatureUsage:
        """Every row of ``customer_id`` (or of everyone) added up.

        ``credits`` adds up only rows of one balance; ``balance_id`` is ``"*"`` when the
        rows draw from several (then ``credits`` mixes units and is a rough figure).
        """
        rows = self.rows if customer_id is None else self.for_customer(customer_id)
        balances = {row.balance_id for row in rows}
        return FeatureUsage(
            customer_id if customer_id is not None else "*",
            "total",
            balances.pop() if len(balances) == 1 else "*",
            units=_number(sum((Decimal(repr(r.units or 0)) for r in rows), Decimal(0)))
            if len({r.feature_id for r in rows}) == 1
            else None,
            credits=_number(sum((Decimal(repr(r.credits)) for r in rows), Decimal(0))),
            billed=sum(r.billed for r in rows),
            refunded=sum(r.refunded for r in rows),
            denied=sum(r.denied or 0 for r in rows) if self.denials_recorded else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"since", "denials_recorded", "events", "rows": [...], "customers": {...}}``.

        ``rows`` carry units (a number, always); ``customers`` maps each customer to its
        total, which has no units: units of different features do not add up.
        """
        totals = {}
        for cus in self.customers:
            total = self.total(cus).to_dict()
            del total["units"]
            totals[cus] = total
        return {
            "since": self.since,
            "denials_recorded": self.denials_recorded,
            "events": self.events,
            "rows": [row.to_dict() for row in self.rows],
            "customers": totals,
        }

    def table(self, title: str = "Usage per customer and feature") -> PrintableTable:
        """A rich table of the rows, with a total line per customer.

        ``print(report.table())`` prints it as text; a rich console prints it in colour.
        """
        table = PrintableTable(title=Text(title))
        table.add_column("customer")
        table.add_column("feature")
        table.add_column("units", justify="right")
        table.add_column("charged", justify="right")
        table.add_column("billed", justify="right")
        table.add_column("refunded", justify="right")
        table.add_column("denied", justify="right")
        for cus in self.customers:
            rows = self.for_customer(cus)
            for index, row in enumerate(rows):
                table.add_row(
                    Text(cus if index == 0 else ""),  # ids as text, never read as markup
                    Text(row.feature_id),
                    "" if row.units is None else f"{row.units:g}",
                    Text(amount(row.credits, row.balance_id)),
                    str(row.billed),
                    str(row.refunded),
                    "?" if row.denied is None else str(row.denied),
                    style="red" if row.denied else None,
                )
            if len(rows) > 1:
                total = self.total(cus)
                charged = (
                    amount(total.credits, total.balance_id)
                    if total.balance_id != "*"
                    else f"{total.credits:g}"
                )
                table.add_row(
                    "",
                    "total",
                    "",
                    Text(charged),
                    str(total.billed),
                    str(total.refunded),
                    "?" if total.denied is None else str(total.denied),
                    style="bold",
                    end_section=True,
                )
        if not self.denials_recorded and self.rows:
            table.caption = "denied: ? = this ledger does not record denied calls"
        return table

    def __str__(self) -> str:
        return str(self.table())


def build_report(
    events: Iterable[UsageEvent],
    *,
    since: float | None = None,
    denials_recorded: bool | None = None,
) -> UsageReport:
    """Fold ledger events into a :class:`UsageReport` (no I/O).

    Args:
        events: The events, in any order.
        since: Kept in the report to say what period it covers; events are not filtered.
        denials_recorded: Whether the source records denied calls; when None, it is
            assumed to if any ``denied`` event is present.
    """
    tallies: dict[tuple[str, str], _Tally] = {}
    denials = bool(denials_recorded)
    count = 0
    for event in events:
        count += 1
        denials = denials or (denials_recorded is None and event.kind == "denied")
        key = (event.customer_id, event.feature_id)
        tally = tallies.get(key)
        if tally is None:
            tally = tallies[key] = _Tally(event.balance_id)
        tally.add(event)
    rows = tuple(
        FeatureUsage(
            cus,
            feature,
            tally.balance_id,
            units=_number(tally.units),
            credits=_number(tally.credits),
            billed=tally.billed,
            refunded=tally.refunded,
            denied=tally.denied if denials else None,
        )
        for (cus, feature), tally in sorted(tallies.items())
    )
    return UsageReport(rows, since=since, denials_recorded=denials, events=count)


def usage_report(
    source: EventSource,
    customers: Sequence[str] | None = None,
    *,
    since: float | None = None,
    feature_id: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> UsageReport:
    """Read a ledger's events and report them per customer and feature.

    Args:
        source: An embedded backend (anything with ``events(...)``).
        customers: Only these customers, read one by one (``progress`` is called after
            each); every customer, in one read, when omitted.
        since: Only events recorded at or after this Unix time.
        feature_id: Only this feature.
        progress: Called with each customer id once its events are read.

    Raises:
        BackendError: The ledger could not be read.
    """
    recorded = True if isinstance(source, DenialRecorder) else None
    if customers is None:
        events = source.events(since=since, feature_id=feature_id)
        if progress is not None:
            for cus in sorted({event.customer_id for event in events}):
                progress(cus)
        return build_report(events, since=since, denials_recorded=recorded)
    collected: list[UsageEvent] = []
    for cus in customers:
        collected.extend(source.events(cus, since=since, feature_id=feature_id))
        if progress is not None:
            progress(cus)
    return build_report(collected, since=since, denials_recorded=recorded)
