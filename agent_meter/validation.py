"""Input checks shared by the meter and every backend: bad input never reaches a ledger."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from numbers import Real
from typing import Any

from agent_meter.errors import InvalidUsage

__all__ = [
    "check_customer_id",
    "check_entity_id",
    "check_feature_id",
    "check_key",
    "check_properties",
    "check_units",
]

MAX_ID_LENGTH = 256
MAX_UNITS = float(2**62)
"""More units than any pricing can bill: at the finest rate a ledger keeps (a billionth of
a credit per unit) they would cost more than a ledger holds."""


def _encodable(kind: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no backend can store or send it
        msg = f"{kind} {value!r} is not valid Unicode text ({exc.reason})"
        raise InvalidUsage(msg) from None


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
    if not value.isascii():  # ASCII always encodes
        _encodable(kind, value)
    return value


def check_key(kind: str, value: object, *, feature_id: str) -> str:
    """Return ``value`` if it is a usable call id or idempotency key, else raise InvalidUsage.

    Keys are free text (a tool_call_id, a run id) but must be non-empty valid Unicode: a
    lone surrogate cannot be stored in a ledger nor sent to Autumn.
    """
    if not isinstance(value, str) or not value:
        msg = f"{kind} for {feature_id!r} must be a non-empty string, not {value!r}"
        raise InvalidUsage(msg)
    if not value.isascii():  # ASCII always encodes
        _encodable(f"{kind} for {feature_id!r}", value)
    return value


def check_properties(value: object, *, feature_id: str) -> dict[str, Any] | None:
    """Return ``value`` as a dict if it can be stored as a JSON object, else raise InvalidUsage.

    Values JSON does not know are stored as text (``str()``); circular structures, keys
    that are not strings and text that is not valid Unicode are refused.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        msg = f"properties of a {feature_id!r} track must be a mapping, not {type(value).__name__}"
        raise InvalidUsage(msg)
    properties = dict(value)
    try:
        json.dumps(properties, default=str, allow_nan=False).encode("utf-8")
    except (ValueError, TypeError, RecursionError, UnicodeEncodeError) as exc:
        msg = f"properties of a {feature_id!r} track cannot be stored as JSON: {exc}"
        raise InvalidUsage(msg) from None
    return properties


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
    if (type(value) is float or type(value) is int) and -MAX_UNITS <= value <= MAX_UNITS:
        # the usual case, quickly (NaN, infinities and huge ints take the long way)
        if value < 0 and not allow_negative:
            msg = (
                f"units for {feature_id!r} (customer {customer_id!r}) must not be negative, "
                f"got {float(value)}"
            )
            raise InvalidUsage(msg)
        return float(value)
    if isinstance(value, bool) or not isinstance(value, Real):
        msg = (
            f"units for {feature_id!r} (customer {customer_id!r}) must be a number, "
            f"got {type(value).__name__}: {value!r}"
        )
        raise InvalidUsage(msg)
    try:
        number = float(value)
    except OverflowError:  # an int with hundreds of digits
        number = math.inf
    if not math.isfinite(number) or abs(number) > MAX_UNITS:
        shown = number if math.isfinite(number) else f"{value!r}"[:40]
        msg = (
            f"units for {feature_id!r} (customer {customer_id!r}) must be finite and at most "
            f"{MAX_UNITS:.3g}, got {shown}"
        )
        raise InvalidUsage(msg)
    if number < 0 and not allow_negative:
        msg = (
            f"units for {feature_id!r} (customer {customer_id!r}) must not be negative, "
            f"got {number}"
        )
        raise InvalidUsage(msg)
    return number
