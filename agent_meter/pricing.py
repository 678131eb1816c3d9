"""Pricing: the features, the credit systems they draw from, and the plans that grant them.

The same catalogue drives the embedded backends and lets the meter refuse an unknown
feature before anything is written. It is loaded from TOML (see :meth:`Pricing.from_file`)
or built in Python::

    pricing = Pricing(
        features={"web_search": "metered", "premium": "boolean"},
        credit_systems={"credits": {"web_search": 1}},
        plans={"agent_free": Plan(auto_enable=True, grants={"credits": 100, "premium": True})},
    )
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping
from decimal import Decimal
from enum import Enum
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Strict,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from agent_meter.errors import ConfigError, InvalidUsage
from agent_meter.validation import check_feature_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["FeatureKind", "FeatureType", "Plan", "Pricing", "Rate", "ResetInterval"]

ResetInterval = Literal["day", "week", "month", "year", "never"]
FeatureKind = Literal["metered", "boolean"]
"""A feature type written as a string, as in a pricing file: ``"metered"`` or ``"boolean"``."""
StrictCost = Annotated[float, Strict()]
"""Credits per unit: a number, never a string or a bool (``true`` is not 1 credit)."""
UNLIMITED = "unlimited"
_SUBKEY = "@"  # marks a validator message that names a key below the field's location


class FeatureType(str, Enum):
    """What kind of thing a feature is."""

    BOOLEAN = "boolean"
    """Access yes or no; gated, never tracked."""
    METERED = "metered"
    """Units with a balance, tracked per use."""


class Rate(NamedTuple):
    """What one unit of a feature costs, and where it is paid from."""

    balance_id: str
    """The credit system it draws from, or the feature itself."""
    per_unit: Decimal
    """Units of ``balance_id`` per unit of the feature."""
    boolean: bool
    """The feature is access only: it costs nothing and is never tracked."""
    nano_per_unit: int
    """``per_unit`` in billionths (exact for any rate with up to 9 decimals)."""

    @classmethod
    def of(cls, balance_id: str, per_unit: Decimal, *, boolean: bool = False) -> Rate:
        """A rate, with its integer form worked out."""
        return cls(balance_id, per_unit, boolean, int(per_unit.scaleb(9).to_integral_value()))


class Plan(BaseModel):
    """A plan: what it grants, whether every new customer gets it, when grants reset.

    Attributes:
        grants: Feature or credit-system id to an included amount, ``True`` for a boolean
            feature, or ``"unlimited"``.
        auto_enable: Attached to every customer on first use.
        interval: When included balances reset (``"never"`` for one-off grants).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    grants: dict[str, float | bool | Literal["unlimited"]] = {}
    auto_enable: StrictBool = False
    interval: ResetInterval = "month"

    @field_validator("grants", mode="before")
    @classmethod
    def _grants_are_typed(cls, grants: object) -> object:
        # Before pydantic coerces: "2" or "true" in a TOML file is a mistake, not 2 or True.
        if isinstance(grants, Mapping):
            for key, amount in grants.items():
                if not isinstance(amount, (bool, int, float)) and amount != UNLIMITED:
                    msg = (
                        f"{_SUBKEY}{key}: {amount!r} is not an amount, true/false or {UNLIMITED!r}"
                    )
                    raise ValueError(msg)
        return grants

    @field_validator("grants")
    @classmethod
    def _grants_are_amounts(
        cls, grants: dict[str, float | bool | str]
    ) -> dict[str, float | bool | str]:
        for key, amount in grants.items():
            if isinstance(amount, bool) or amount == UNLIMITED:
                continue
            if not isinstance(amount, (int, float)) or not math.isfinite(amount) or amount < 0:
                msg = f"{_SUBKEY}{key}: {amount!r} is not a non-negative amount"
                raise ValueError(msg)
        return grants


class Pricing(BaseModel):
    """The feature catalogue, the credit systems and the plans.

    Attributes:
        features: Feature id to its type (``"metered"`` or ``"boolean"``).
        credit_systems: Pool id to ``{feature_id: credits per unit}``.
        plans: Plan id to :class:`Plan`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    features: dict[str, FeatureType]
    credit_systems: dict[str, dict[str, StrictCost]] = {}
    plans: dict[str, Plan] = {}

    if TYPE_CHECKING:  # what callers may pass: feature types as strings, as the docs do

        def __init__(
            self,
            *,
            features: Mapping[str, FeatureType | FeatureKind],
            credit_systems: Mapping[str, Mapping[str, float]] = ...,
            plans: Mapping[str, Plan] = ...,
        ) -> None: ...

    @model_validator(mode="before")
    @classmethod
    def _ids_are_usable(cls, data: object) -> object:
        # An id no call could name (empty, blank, NUL, too long) is a mistake in the file.
        if not isinstance(data, Mapping):
            return data
        for section in ("features", "credit_systems", "plans"):
            entries = data.get(section)
            if isinstance(entries, Mapping):
                for key in entries:
                    try:
                        check_feature_id(key)
                    except InvalidUsage as exc:
                        problem = str(exc).removeprefix("feature_id ")
                        msg = f"{section}: the id {key!r} is not usable: {problem}"
                        raise ValueError(msg) from None
        return data

    @cached_property
    def rate_table(self) -> dict[str, Rate]:
        """Every feature's price, worked out once: what a check or a track reads on each call."""
        table: dict[str, Rate] = {}
        for feature_id, kind in self.features.items():
            table[feature_id] = Rate.of(feature_id, Decimal(1), boolean=kind is FeatureType.BOOLEAN)
        for pool, rates in self.credit_systems.items():
            for feature_id, rate in rates.items():
                table[feature_id] = Rate.of(pool, Decimal(repr(rate)))
        return table

    @model_validator(mode="after")
    def _consistent(self) -> Pricing:  # noqa: PLR0912 - one flat list of checks reads best
        for pool, rates in self.credit_systems.items():
            if pool in self.features:
                msg = f"credit_systems.{pool}: the id is already used by a feature"
                raise ValueError(msg)
            for feature_id, rate in rates.items():
                where = f"credit_systems.{pool}.{feature_id}"
                if feature_id not in self.features:
                    msg = f"{where}: feature {feature_id!r} is not declared in [features]"
                    raise ValueError(msg)
                if self.features[feature_id] is not FeatureType.METERED:
                    msg = f"{where}: only metered features can draw from a credit system"
                    raise ValueError(msg)
                if isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0:
                    msg = f"{where}: the cost must be a positive number of credits, not {rate!r}"
                    raise ValueError(msg)
        pools_of: dict[str, str] = {}
        for pool, rates in self.credit_systems.items():
            for feature_id in rates:
                if feature_id in pools_of:
                    msg = (
                        f"credit_systems.{pool}.{feature_id}: the feature already draws from "
                        f"{pools_of[feature_id]!r}; a feature draws from one pool"
                    )
                    raise ValueError(msg)
                pools_of[feature_id] = pool
        for plan_id, plan in self.plans.items():
            for key, amount in plan.grants.items():
                where = f"plans.{plan_id}.grants.{key}"
                if key in self.credit_systems:
                    if isinstance(amount, bool):
                        msg = f"{where}: a credit system is granted an amount, not {amount!r}"
                        raise ValueError(msg)
                    continue
                if key not in self.features:
                    msg = f"{where}: {key!r} is neither a declared feature nor a credit system"
                    raise ValueError(msg)
                is_boolean = self.features[key] is FeatureType.BOOLEAN
                if is_boolean != isinstance(amount, bool):
                    kind = "true or false" if is_boolean else "an amount"
                    msg = f"{where}: feature {key!r} is {self.features[key].value}; grant {kind}"
                    raise ValueError(msg)
        return self

    # -- loading -----------------------------------------------------------------------

    @classmethod
    def example(cls) -> Pricing:
        """The example pricing shipped with agent_meter, to start from anywhere.

        Four features (``web_search`` 1 credit, ``code_exec`` 2, ``llm_tokens`` 0.001,
        ``premium`` access), one ``credits`` pool and a plan granting 100 credits to every
        new customer. ``agent-meter init`` writes the same file, commented, to edit.
        """
        return cls.from_toml(example_toml(), source="agent_meter/data/pricing.toml")

    @classmethod
    def from_file(cls, path: str | Path) -> Pricing:
        """Load pricing from a TOML file (format in the README and DESIGN.md §7).

        Raises:
            ConfigError: The file is missing, is not valid TOML, or defines something
                inconsistent. The message names the file and the key.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            msg = f"{path}: cannot read the pricing file ({exc.strerror or exc})"
            raise ConfigError(msg) from exc
        except UnicodeDecodeError as exc:
            msg = f"{path}: not a pricing file: not UTF-8 text (byte {exc.start})"
            raise ConfigError(msg) from None
        return cls.from_toml(text, source=str(path))

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>") -> Pricing:
        """Parse pricing from TOML text; ``source`` names it in error messages."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            msg = f"{source}: not valid TOML: {exc}"
            raise ConfigError(msg) from exc
        return cls.from_dict(data, source=source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>") -> Pricing:
        """Build pricing from the parsed TOML structure, mapping errors to ConfigError."""
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise ConfigError(_describe(exc, source)) from None

    # -- questions the ledger asks -------------------------------------------------------

    def feature_type(self, feature_id: str) -> FeatureType | None:
        """The type of ``feature_id``, or None when it is not declared."""
        return self.features.get(feature_id)

    def pool_of(self, feature_id: str) -> tuple[str, Decimal] | None:
        """The credit system ``feature_id`` draws from and its cost per unit, if any."""
        rate = self.rate_table.get(feature_id)
        if rate is None or rate.balance_id == feature_id:
            return None
        return rate.balance_id, rate.per_unit

    def auto_plans(self) -> list[tuple[str, Plan]]:
        """The plans every new customer gets, in declaration order."""
        return [(plan_id, plan) for plan_id, plan in self.plans.items() if plan.auto_enable]

    def describe(self) -> list[tuple[str, str, str]]:
        """Rows of (feature, type, what it costs) for printing."""
        rows = []
        for feature_id, kind in self.features.items():
            pool = self.pool_of(feature_id)
            unit = pool[0][:-1] if pool and pool[1] == 1 and pool[0].endswith("s") else ""
            cost = f"{pool[1].normalize():f} {unit or pool[0]} per unit" if pool else "-"
            rows.append((feature_id, kind.value, cost))
        return rows


def example_toml() -> str:
    """The text of the example pricing file shipped in the package (with its comments)."""
    return (resources.files("agent_meter") / "data" / "pricing.toml").read_text(encoding="utf-8")


def _toml(value: object) -> str:
    """A value as it was written in the file: ``true``, ``"2"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def _describe(exc: ValidationError, source: str) -> str:
    problems = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"] if not str(part).startswith("function"))
        message = error["msg"].removeprefix("Value error, ")
        if message.startswith(_SUBKEY):
            key, message = f"{key}.{message[1:].split(': ', 1)[0]}", message.split(": ", 1)[1]
        if error["type"] == "enum":
            message = f"unknown feature type {error['input']!r} (use 'metered' or 'boolean')"
        elif error["type"] == "float_type":
            message = f"must be a number, not {_toml(error['input'])}"
        elif error["type"] == "bool_type":
            message = f"must be true or false, not {_toml(error['input'])}"
        problems.append(f"{key}: {message}" if key else message)
    return f"{source}: " + "; ".join(problems)
