"""OpenAI integration: tool calls through the guard, and metered (streamed) completions.

- :func:`run_tool_calls` / :func:`arun_tool_calls` run the ``tool_calls`` of an assistant
  message under the meter's guard and return the tool messages to send back.
- :func:`wrap_client` wraps an ``OpenAI`` or ``AsyncOpenAI`` client so every
  ``chat.completions.create`` and ``responses.create`` is gated before it is sent and its
  tokens are billed after, once per response id.
- :func:`usage_from_completion`, :func:`usage_from_chunk`, :func:`usage_from_response`
  read the usage the API reports.
"""

from __future__ import annotations

from agent_meter.extras import require

require("openai", "openai", integration="agent_meter.openai")

from agent_meter.openai.client import wrap_client
from agent_meter.openai.tools import arun_tool_calls, run_tool_calls
from agent_meter.openai.usage import usage_from_chunk, usage_from_completion, usage_from_response

__all__ = [
    "arun_tool_calls",
    "run_tool_calls",
    "usage_from_chunk",
    "usage_from_completion",
    "usage_from_response",
    "wrap_client",
]
