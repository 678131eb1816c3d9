"""Who pays for an MCP tool call: the request's authenticated identity, never its arguments.

A resolver is a function (sync or async) of fastmcp's ``MiddlewareContext`` that the server
author supplies. It returns the customer id, a ``(customer_id, entity_id)`` pair, a
:class:`~agent_meter.CustomerRef`, or ``None`` when the request has no paying customer
(the call is then refused). :func:`from_access_token` builds the usual one: the bearer
token that fastmcp's auth provider verified.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

from fastmcp.server.dependencies import get_access_token
from fastmcp.server.middleware import MiddlewareContext

from agent_meter.context import CustomerRef
from agent_meter.errors import ConfigError, InvalidUsage

__all__ = ["CustomerResolver", "Resolved", "from_access_token", "resolve_customer"]

Resolved: TypeAlias = CustomerRef | str | tuple[str, str | None] | None
"""What a resolver returns: a customer id, a (customer, entity) pair, a reference, or None."""

CustomerResolver: TypeAlias = Callable[[MiddlewareContext[Any]], Resolved | Awaitable[Resolved]]
"""A function of the call's ``MiddlewareContext`` naming who pays (sync or async)."""


def from_access_token(
    claim: str | None = None, *, entity_claim: str | None = None
) -> CustomerResolver:
    """A resolver that reads the customer from the verified access token of the request.

    Args:
        claim: The token claim that holds the customer id; ``None`` uses the token's
            ``client_id`` (the OAuth client the token was issued to).
        entity_claim: A claim that holds the entity id (a seat, a workspace), if any.

    Returns:
        A resolver giving ``None`` (the call is refused) for a request without a verified
        token or without the claim.

    Example:
        >>> MeteringMiddleware(meter, features={...}, customer=from_access_token("org_id"))
    """
    for name, value in (("claim", claim), ("entity_claim", entity_claim)):
        if value is not None and (not isinstance(value, str) or not value):
            msg = f"{name} must be a non-empty claim name, not {value!r}"
            raise ConfigError(msg)

    def resolve(context: MiddlewareContext[Any]) -> Resolved:
        # fastmcp sets the token only after its auth provider verified it: the client
        # cannot forge it the way it can write request metadata or tool arguments.
        token = get_access_token()
        if token is None:
            return None
        customer = token.client_id if claim is None else token.claims.get(claim)
        if customer is None:
            return None
        entity = None if entity_claim is None else token.claims.get(entity_claim)
        return CustomerRef.of(customer, entity)

    return resolve


async def resolve_customer(
    resolver: CustomerResolver, context: MiddlewareContext[Any]
) -> CustomerRef | None:
    """Run ``resolver`` (awaiting it if needed) and validate what it named.

    Raises:
        InvalidUsage: The resolver named a malformed id, or returned something else.
    """
    found = resolver(context)
    if inspect.isawaitable(found):
        found = await found
    if found is None or isinstance(found, CustomerRef):
        return found
    if isinstance(found, str):
        return CustomerRef.of(found)
    if isinstance(found, tuple) and len(found) == 2:
        return CustomerRef.of(*found)
    msg = (
        "a customer resolver must return a customer id, a (customer_id, entity_id) pair, "
        f"a CustomerRef or None, not {type(found).__name__}"
    )
    raise InvalidUsage(msg)
