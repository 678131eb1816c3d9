"""The answers backends give: :class:`CheckResult` and :class:`TrackResult`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["Catalogue", "CatalogueEntry", "CheckResult", "EntryKind", "TrackResult", "UsageEvent"]


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The answer to "may this customer use this feature now?".

    When the feature draws from a credit system the answer is about the pool, as Autumn
    gives it: ``balance`` and ``required`` are in credits and ``balance_feature_id`` names
    the pool.

    Attributes:
        allowed: Whether the use may go ahead.
        customer_id: Who asked.
        feature_id: The feature asked for (``web_search``).
        required: What the use needs, in the units of ``balance_feature_id``.
        balance: What is left (after the deduction when the check sent an event); None
            for a boolean feature or when the backend did not say.
        balance_feature_id: Where the balance lives (``credits`` or the feature itself).
        unlimited: The customer has no limit on this feature.
        included_usage: What the customer's plans include per interval, when known.
        usage: What was used in the current interval, when known.
        entity_id: The entity the check was scoped to, if any.
        deducted: True when the check reserved ``required`` (``send_event=True``, allowed).
        replayed: The call (its hold key) was reserved before: a replay runs without a
            second charge.
    """

    allowed: bool
    customer_id: str
    feature_id: str
    required: float
    balance: float | None = None
    balance_feature_id: str | None = None
    unlimited: bool = False
    included_usage: float | None = None
    usage: float | None = None
    entity_id: str | None = None
    deducted: bool = False
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class TrackResult:
    """The answer to a track.

    Attributes:
        customer_id: Who was billed.
        feature_id: The metered feature tracked.
        value: The units tracked (negative for a refund).
        idempotency_key: The key the track was sent with.
        duplicate: The key had been recorded before, so this track changed nothing
            (Autumn's 409 ``duplicate_idempotency_key``). Still a success.
        queued: Not delivered yet: the track waits in the meter's outbox and will be
            delivered with the same key.
        uncharged: Units of ``value`` the balance could not pay (a track past the balance
            is capped at 0, as Autumn does); 0.0 when all was charged, None when the
            backend does not say (a remote backend, a queued track).
    """

    customer_id: str
    feature_id: str
    value: float
    idempotency_key: str
    duplicate: bool = False
    queued: bool = False
    uncharged: float | None = None


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One line of an embedded backend's ledger: a reservation or a track.

    Attributes:
        at: Unix time it was recorded.
        customer_id: Who was billed.
        entity_id: The entity, if any.
        feature_id: The feature used.
        balance_id: The balance it drew from (a credit system or the feature).
        kind: ``"reserve"`` (a check that deducted), ``"track"``, or ``"denied"`` (a call
            the meter refused; nothing applied).
        value: Units of the feature (negative for a refund).
        credits: What ``value`` costs in ``balance_id`` units.
        applied: What it actually changed on the balance (tracks are capped at 0).
        idempotency_key: The key it was recorded under, if any.
    """

    at: float
    customer_id: str
    entity_id: str | None
    feature_id: str
    balance_id: str
    kind: str
    value: float
    credits: float
    applied: float
    idempotency_key: str | None


EntryKind = Literal["boolean", "metered", "credit_system"]


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One feature as the billing backend knows it.

    Attributes:
        feature_id: The feature's id.
        kind: ``"boolean"``, ``"metered"`` or ``"credit_system"`` (a pool).
        pool: The credit system a metered feature draws from, if any.
        cost: Credits per unit of the feature in ``pool``.
        archived: The backend keeps the feature but no longer bills it.
    """

    feature_id: str
    kind: EntryKind
    pool: str | None = None
    cost: float | None = None
    archived: bool = False


Catalogue = Mapping[str, CatalogueEntry]
"""Feature id to what the backend knows about it."""
