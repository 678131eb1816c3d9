"""Start-up verification: does every feature the app meters exist where it is billed?

:meth:`Meter.verify <agent_meter.meter.Meter.verify>` calls :func:`verify`. It compares
what the meter expects (its :class:`~agent_meter.pricing.Pricing`, when it has one) with
the catalogue of the backend:

- a backend with a remote catalogue (:class:`~agent_meter.backends.base.RemoteCatalogue`, e.g.
  :class:`~agent_meter.backends.autumn.AutumnBackend`) is asked once for its features;
- an embedded backend (:class:`~agent_meter.backends.base.CatalogueBackend`: SQLite,
  memory) answers from the pricing it bills by.

Every problem is collected and reported at once, in one :class:`ConfigError`, so a
deployment with three misnamed features learns about all three on the first start.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Protocol

from agent_meter.backends.base import (
    CatalogueBackend,
    FullBackend,
    RemoteBackend,
    RemoteCatalogue,
)
from agent_meter.errors import ConfigError
from agent_meter.pricing import FeatureType, Pricing
from agent_meter.results import Catalogue, CatalogueEntry

__all__ = [
    "Catalogue",
    "CatalogueEntry",
    "Metered",
    "RemoteCatalogue",
    "catalogue_from_pricing",
    "find_problems",
    "verify",
]


class Metered(Protocol):
    """What :func:`verify` reads of a meter: its backend and the pricing it expects."""

    @property
    def backend(self) -> FullBackend:
        """The billing backend."""
        ...

    @property
    def pricing(self) -> Pricing | None:
        """The feature catalogue the meter expects, when it has one."""
        ...


def catalogue_from_pricing(pricing: Pricing) -> dict[str, CatalogueEntry]:
    """The catalogue an embedded backend bills by: its pricing, as entries."""
    entries: dict[str, CatalogueEntry] = {}
    for feature_id, kind in pricing.features.items():
        pool = pricing.pool_of(feature_id)
        entries[feature_id] = CatalogueEntry(
            feature_id,
            "boolean" if kind is FeatureType.BOOLEAN else "metered",
            pool=pool[0] if pool else None,
            cost=float(pool[1]) if pool else None,
        )
    for pool_id in pricing.credit_systems:
        entries[pool_id] = CatalogueEntry(pool_id, "credit_system")
    return entries


def find_problems(
    features: Iterable[str],
    catalogue: Catalogue,
    expected: Pricing | None,
    *,
    where: str = "the backend",
) -> list[str]:
    """Compare the features an app meters with a backend's catalogue (no I/O).

    Args:
        features: The feature ids the app meters.
        catalogue: What the backend knows.
        expected: The app's pricing, when it has one: each feature's type, credit system
            and cost are then compared too.
        where: Names the backend in the messages (``"Autumn"``).

    Returns:
        One sentence per problem, in the order of ``features``; empty when all is well.
    """
    problems: list[str] = []
    for feature_id in dict.fromkeys(features):
        entry = catalogue.get(feature_id)
        if entry is None:
            problems.append(f"feature {feature_id!r} does not exist in {where}")
            continue
        if entry.archived:
            problems.append(f"feature {feature_id!r} is archived in {where}")
        if entry.kind == "credit_system":
            problems.append(
                f"{feature_id!r} is a credit system in {where}: meter the features that "
                "draw from it, not the pool"
            )
            continue
        if expected is not None:
            problems.extend(_compare(feature_id, entry, expected, where))
    return problems


def _compare(  # noqa: PLR0911 - one sentence per kind of mismatch
    feature_id: str, entry: CatalogueEntry, expected: Pricing, where: str
) -> list[str]:
    kind = expected.feature_type(feature_id)
    if kind is None:
        return [f"feature {feature_id!r} exists in {where} but not in the meter's pricing"]
    want_kind = "boolean" if kind is FeatureType.BOOLEAN else "metered"
    if entry.kind != want_kind:
        return [f"feature {feature_id!r} is {entry.kind} in {where}, the pricing says {want_kind}"]
    pool = expected.pool_of(feature_id)
    if pool is None:
        if entry.pool is not None:
            return [
                f"feature {feature_id!r} draws from {entry.pool!r} in {where}, the pricing "
                "has it draw from no credit system"
            ]
        return []
    pool_id, cost = pool
    if entry.pool is None:
        return [
            f"feature {feature_id!r} draws from no credit system in {where}, expected {pool_id!r}"
        ]
    if entry.pool != pool_id:
        return [
            f"feature {feature_id!r} draws from {entry.pool!r} in {where}, expected {pool_id!r}"
        ]
    if entry.cost is not None and not math.isclose(entry.cost, float(cost), rel_tol=1e-9):
        return [
            f"feature {feature_id!r} costs {entry.cost:g} {pool_id} per unit in {where}, "
            f"the pricing says {float(cost):g}"
        ]
    return []


def verify(meter: Metered, features: Iterable[str] | None = None) -> None:
    """Confirm that each feature the meter bills exists in its backend, drawing as expected.

    Args:
        meter: The meter whose backend (and pricing, if any) is checked.
        features: The features the app meters. None means every feature of the meter's
            pricing; with no pricing either, only the catalogue is fetched (which still
            proves the backend is reachable and accepts the key).

    Raises:
        ConfigError: Every problem found, one per line, in one error; or the backend has
            no catalogue to verify against.
        BackendError: The catalogue could not be fetched (unreachable, wrong key).
    """
    expected = meter.pricing
    if features is None:
        wanted = list(expected.features) if expected is not None else []
    else:
        wanted = [features] if isinstance(features, str) else list(features)
    backend = meter.backend
    if isinstance(backend, RemoteCatalogue):
        catalogue = backend.catalogue()
        where = backend.service_name if isinstance(backend, RemoteBackend) else ""
        where = where or type(backend).__name__
    elif isinstance(backend, CatalogueBackend):
        catalogue = catalogue_from_pricing(backend.pricing)
        where = f"{type(backend).__name__}'s pricing"
    else:
        msg = (
            f"cannot verify features against {type(backend).__name__}: it exposes neither "
            "catalogue() nor pricing"
        )
        raise ConfigError(msg)
    problems = find_problems(wanted, catalogue, expected, where=where)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        msg = f"feature verification found {count}:\n" + "\n".join(f"  - {p}" for p in problems)
        raise ConfigError(msg)
