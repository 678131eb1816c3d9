"""Input checks shared by the meter and every backend: bad input never reaches a ledger."""

from __future__ import annotations

import math
from numbers import Real

from agent_meter.errors import InvalidUsage

__all__ = ["check_customer_id", "check_entity_id", "check_feature_id", "check_units"]

MAX_ID_LENGTH = 256


def _check_id(kind: str, value: object) -> str:
    if not isinstance(value, str):
        msg = f"{kind} must be a string, got {type(value).__name__}: {value!r}"
        raise InvalidUsage(msg)
    if not value.strip():
        msg = f"{kind} must not be empty"
        raise InvalidUsage(msg)
    if len(value) > MAX_ID_LENGTH:
        msg = f"{kind} is {len(value)} characters long; the limit is {MAX_ID_LENGTH}"
        raise InvalidUsage(msg)
    if not value.isprintable():
        msg = f"{kind} {value!r} contains control or separator characters"
        raise InvalidUsage(msg)
    return value


def check_customer_id(value: object) -> str:
    """Return ``value`` if it is a usable customer id, else raise InvalidUsage."""
    return _check_id("customer_id", value)


def check_feature_id(value: object) -> str:
    """Return ``value`` if it is a usable feature id, else raise InvalidUsage."""
    return _check_id("feature_id", value)


def check_entity_id(value: object) -> str | None:
    """Return ``value`` if it is None or a usable entity id, else raise InvalidUsage."""
    return None if value is None else _check_id("entity_id", value)


def check_units(
    value: object, *, feature_id: str, customer_id: str, allow_negative: bool = False
) -> float:
    """Return ``value`` as a float if it is a finite amount of units.

    Args:
        value: The units to check or track.
        feature_id: Named in the error message.
        customer_id: Named in the error message.
        allow_negative: Tracks may be negative (a refund); checks may not.

    Raises:
        InvalidUsage: ``value`` is not a real number (strings and bools included), is NaN
            or infinite, or is negative where that is not allowed.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        msg = (
            f"units for {feature_id!r} (customer {customer_id!r}) must be a number, "
            f"got {type(value).__name__}: {value!r}"
        )
        raise InvalidUsage(msg)
    number = float(value)
    if not math.isfinite(number):
        msg = f"units for {feature_id!r} (customer {customer_id!r}) must be finite, got {number}"
        raise InvalidUsage(msg)
    if number < 0 and not allow_negative:
        msg = (
            f"units for {feature_id!r} (customer {customer_id!r}) must not be negative, "
            f"got {number}"
        )
        raise InvalidUsage(msg)
    return number
