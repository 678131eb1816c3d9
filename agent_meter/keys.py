"""Idempotency keys: deterministic per call, unique across customers.

Autumn scopes keys to the whole organisation, not to the customer, so a key must name the
customer, the feature and the call; the same call always yields the same key, so a retry
or a replay after a crash is recorded once.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from functools import lru_cache
from urllib.parse import quote

__all__ = ["idempotency_key", "new_call_id"]

_PLAIN = re.compile(r"[A-Za-z0-9_.\-]*")
_MAX_LENGTH = 200
_VERSION = "am1"


def new_call_id() -> str:
    """A fresh call id for a call that came with none (32 hex characters)."""
    return secrets.token_hex(16)


_PURPOSES = {purpose: purpose for purpose in ("hold", "lock", "refund", "track", "adjust")}
"""The purposes the meter uses, plain already: no need to look at them on every call."""


def _part(value: str) -> str:
    return value if _PLAIN.fullmatch(value) else quote(value, safe="")


@lru_cache(maxsize=4096)
def _prefix(customer_id: str, entity_id: str, feature_id: str) -> str:
    """The part of a key shared by every call of one customer and feature (cached)."""
    return f"{_VERSION}:{_part(customer_id)}:{_part(entity_id)}:{_part(feature_id)}:"


def idempotency_key(
    customer_id: str,
    feature_id: str,
    call_id: str,
    purpose: str,
    entity_id: str | None = None,
) -> str:
    """The key of one track of one call.

    Parts are joined with ``:`` after percent-encoding any part that is not plain, so two
    different calls never share a key. Keys longer than 200 characters are hashed.

    Args:
        customer_id: Who pays.
        feature_id: The metered feature.
        call_id: The tool call id, run id, or a caller's own key.
        purpose: What the track does for the call: ``track``, ``refund``, ``adjust``.
        entity_id: The entity, if any.

    Example:
        >>> idempotency_key("cus_1", "web_search", "call_42", "refund")
        'am1:cus_1::web_search:call_42:refund'
    """
    tail = call_id if _PLAIN.fullmatch(call_id) else quote(call_id, safe="")
    suffix = _PURPOSES.get(purpose) or _part(purpose)
    key = f"{_prefix(customer_id, entity_id or '', feature_id)}{tail}:{suffix}"
    if len(key) <= _MAX_LENGTH:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{_VERSION}:h:{_part(customer_id)[:64]}:{digest}"
