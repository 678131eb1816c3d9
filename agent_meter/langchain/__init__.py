"""LangChain integrations: tool wrappers, the token callback handler, agent middleware.

Each is a thin adapter over :class:`agent_meter.Meter`; names are imported on first use so
that ``import agent_meter.langchain`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from agent_meter.extras import require

require("langchain", "langchain_core", integration="agent_meter.langchain")

__all__ = [
    "MeteredSimpleTool",
    "MeteredTool",
    "MeteringCallbackHandler",
    "MeteringMiddleware",
    "ModelUsage",
    "UsageSummary",
    "metered",
    "wrap_tool",
    "wrap_tools",
]

_HOMES = {
    "MeteredTool": "agent_meter.langchain.tools",
    "MeteredSimpleTool": "agent_meter.langchain.tools",
    "metered": "agent_meter.langchain.tools",
    "ModelUsage": "agent_meter.langchain.callbacks",
    "UsageSummary": "agent_meter.langchain.callbacks",
    "wrap_tool": "agent_meter.langchain.tools",
    "wrap_tools": "agent_meter.langchain.tools",
    "MeteringCallbackHandler": "agent_meter.langchain.callbacks",
    "MeteringMiddleware": "agent_meter.langchain.middleware",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        msg = f"module {__name__!r} has no attribute {name!r}"
        raise AttributeError(msg)
    return getattr(importlib.import_module(home), name)
