"""MCP integration: meter the tools a FastMCP server serves.

:class:`MeteringMiddleware` checks every ``tools/call`` against the caller's balance and
bills only the calls that succeed; :func:`from_access_token` names who pays from the
request's verified bearer token. Needs the ``mcp`` extra (``pip install
'agent-meter[mcp]'``).

On the client side nothing MCP-specific is needed: tools loaded with
``langchain-mcp-adapters`` are ordinary LangChain tools, metered with ``meter.wrap_tools``.
"""

from __future__ import annotations

from agent_meter.extras import require

require("mcp", "fastmcp", integration="agent_meter.mcp")

from agent_meter.mcp.customers import CustomerResolver, Resolved, from_access_token
from agent_meter.mcp.middleware import MeteringMiddleware, Units, UnitsFromResult

__all__ = [
    "CustomerResolver",
    "MeteringMiddleware",
    "Resolved",
    "Units",
    "UnitsFromResult",
    "from_access_token",
]
