"""Optional integrations and the extras that install them.

The core (the meter, the embedded ledgers, the CLI's read commands) needs only pydantic,
rich and click. Each integration lives in its own package and needs its own extra::

    pip install 'agent-meter[langchain]'   # agent_meter.langchain, the demo
    pip install 'agent-meter[openai]'      # agent_meter.openai
    pip install 'agent-meter[autumn]'      # agent_meter.backends.autumn (AutumnBackend)
    pip install 'agent-meter[mcp]'         # agent_meter.mcp (MeteringMiddleware)

Every integration calls :func:`require` before importing its dependencies, so that using
it without its extra fails at once with a :class:`~agent_meter.errors.MissingExtra` that
says what to install, rather than with a bare ``ModuleNotFoundError`` from deep inside.
"""

from __future__ import annotations

import importlib.util

from agent_meter.errors import MissingExtra

__all__ = ["require"]


def require(extra: str, *modules: str, integration: str) -> None:
    """Raise :class:`MissingExtra` unless every module the integration imports is installed.

    Only looks the modules up (nothing is imported), so the check costs microseconds.

    Args:
        extra: The extra that installs them (``"langchain"``).
        modules: Top-level module names the integration imports (``"langchain_core"``).
        integration: What needs them, for the message (``"agent_meter.langchain"``).

    Raises:
        MissingExtra: A module is not installed; names the extra and the pip command.
    """
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken or half-removed install
            found = False
        if not found:
            raise MissingExtra(extra, integration=integration, module=module)
