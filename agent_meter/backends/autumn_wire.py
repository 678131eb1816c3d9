"""What Autumn's two clients share: answer limits, ``Retry-After``, back-off, numbers, checks.

The v1 client (:mod:`agent_meter.backends.autumn`, over autumn-py) and the v2 lock client
(:mod:`agent_meter.backends.autumn_locks`, over httpx) carry requests differently, but
read Autumn's answers by the same rules, written once here (pure functions, no transport):

- an answer is never read past :data:`MAX_ANSWER_BYTES` (Autumn's are a few KB);
- ``429`` and ``503`` refuse a request without running it; ``429`` and any ``5xx`` may
  pass on a retry (:func:`status_class`);
- a ``Retry-After`` is waited for, never less, and a wait longer than the back-off cap is
  not waited at all: the backend is unavailable for now (:func:`retry_wait`);
- a check answer becomes a :class:`~agent_meter.results.CheckResult` with every field it
  gives (:func:`check_result`): v1.2 keeps the balance on the answer, v2 in an object.
"""

from __future__ import annotations

import email.utils
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent_meter.errors import BackendError
from agent_meter.results import CheckResult

__all__ = [
    "MAX_ANSWER_BYTES",
    "V1_BALANCE",
    "V2_BALANCE",
    "AnswerTooLarge",
    "BalanceFields",
    "check_result",
    "number",
    "retry_after",
    "retry_wait",
    "status_class",
    "wire",
]

logger = logging.getLogger("agent_meter.autumn")

MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""The largest answer read from Autumn (its answers are a few KB): a bigger one is refused
before it is held in memory."""
CHUNK = 64 * 1024


class AnswerTooLarge(Exception):
    """The answer was longer than :data:`MAX_ANSWER_BYTES`."""

    @classmethod
    def announced(cls, length: str | None) -> AnswerTooLarge | None:
        """The error for a ``Content-Length`` above the cap, before the body is read."""
        if length is not None and length.isdigit() and int(length) > MAX_ANSWER_BYTES:
            return cls(f"the answer announces {length} bytes")
        return None

    @classmethod
    def check(cls, received: int) -> None:
        """Raise once ``received`` bytes of a body pass the cap."""
        if received > MAX_ANSWER_BYTES:
            raise cls(f"the answer is longer than {MAX_ANSWER_BYTES} bytes")


def retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number of seconds or an HTTP date), if usable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def status_class(status: int | None) -> tuple[bool, bool]:
    """(transient, unsent) for an HTTP status: 429 and 503 refuse without running."""
    if status is None:
        return False, False
    return status == 429 or status >= 500, status in (429, 503)


def retry_wait(
    what: str,
    why: str,
    number: int,
    *,
    retries: int,
    backoff: float,
    max_backoff: float,
    asked: float | None = None,
) -> float | None:
    """Seconds to wait before retry ``number + 1``, or None not to retry at all.

    Exponential back-off with jitter, capped at ``max_backoff``; never sooner than the
    server ``asked`` (``Retry-After``), and not at all when it asked for longer than the
    cap: a caller must not wait that long, the backend is unavailable for now.
    """
    if asked is not None and asked > max_backoff:
        return None
    ceiling = min(max_backoff, backoff * 2.0**number)
    delay = ceiling * (0.5 + random.random() / 2)  # noqa: S311 - jitter, not crypto
    if asked is not None:
        delay = max(delay, asked)
    logger.info(
        "agent_meter: Autumn %s failed (%s); retry %d/%d in %.2fs",
        what,
        why,
        number + 1,
        retries,
        delay,
    )
    return delay


def number(value: object) -> float | None:
    """A JSON number as a float; None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def wire(value: float) -> int | float:
    """Send whole numbers as JSON integers, like autumn-py's int-typed signature does."""
    return int(value) if float(value).is_integer() else float(value)


@dataclass(frozen=True, slots=True)
class BalanceFields:
    """Where a check answer keeps the balance: its field names, and in which object."""

    nested: str | None
    remaining: str
    granted: str


V1_BALANCE = BalanceFields(None, "balance", "included_usage")
"""v1.2: ``balance``, ``included_usage``, ``usage`` and the pool's ``feature_id`` on the answer."""
V2_BALANCE = BalanceFields("balance", "remaining", "granted")
"""v2: the same in a ``balance`` object (``remaining``, ``granted``, ``usage``, ``feature_id``)."""


def check_result(
    what: str,
    raw: Mapping[str, Any],
    fields: BalanceFields,
    *,
    customer_id: str,
    feature_id: str,
    units: float,
    entity_id: str | None,
    deducted: bool,
) -> CheckResult:
    """Autumn's answer to a check as a CheckResult, every field it gives kept.

    Raises:
        BackendError: The answer has no ``allowed`` field (not a check answer).
    """
    if "allowed" not in raw:
        msg = f"Autumn's answer to the {what} has no 'allowed' field"
        raise BackendError(msg)
    allowed = raw["allowed"] is True
    balance = raw if fields.nested is None else raw.get(fields.nested)
    balance = balance if isinstance(balance, Mapping) else {}
    required = number(raw.get("required_balance"))
    pool = balance.get("feature_id")
    return CheckResult(
        allowed=allowed,
        customer_id=customer_id,
        feature_id=feature_id,
        required=required if required is not None else float(units),
        balance=number(balance.get(fields.remaining)),
        balance_feature_id=pool if isinstance(pool, str) and pool else feature_id,
        unlimited=balance.get("unlimited") is True,
        included_usage=number(balance.get(fields.granted)),
        usage=number(balance.get("usage")),
        entity_id=entity_id,
        deducted=deducted and allowed,
    )
