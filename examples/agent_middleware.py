"""Bill an agent's tool calls and tokens with MeteringMiddleware on ``create_agent``.

What it shows:
- ``MeteringMiddleware(meter, features={"web_search": "web_search"})`` guards each call of
  the ``web_search`` tool (1 credit, billed only when the tool succeeds) and gates and
  meters each model call (0.001 credit per token, from ``AIMessage.usage_metadata``);
- after a run that searches once and answers, the customer's balance went down by exactly
  the search plus the tokens;
- a customer without credit for the search gets an error tool result the model can read
  ("web_search is unavailable: ..."), the tool never runs, and the run still finishes.

It runs offline: a scripted chat model stands in for a real one and usage is kept in a
SQLite file in a temporary directory.

Run it with::

    python examples/agent_middleware.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import tool

from agent_meter import Meter, Pricing, SQLiteBackend
from agent_meter.langchain.middleware import MeteringMiddleware

PRICING = """
[features]
web_search = "metered"
llm_tokens = "metered"

[credit_systems.credits]
web_search = 1
llm_tokens = 0.001

[plans.agent_free]
auto_enable = true
grants = { credits = 100 }
"""


class ScriptedChatModel(BaseChatModel):
    """Searches once, then answers; each reply reports its tokens as a real model would."""

    position: int = 0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        self.position += 1
        if self.position % 2:
            call = {
                "name": "web_search",
                "args": {"query": "agent billing"},
                "id": f"call_{self.position}",
            }
            message = AIMessage("", tool_calls=[call], usage_metadata=usage(500, 25))
        else:
            found = messages[-1].content if isinstance(messages[-1], ToolMessage) else ""
            message = AIMessage(f"Here is what I found: {found}", usage_metadata=usage(800, 75))
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        """The script already knows which tool it calls."""
        return self


def usage(input_tokens: int, output_tokens: int) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
    }


@tool
def web_search(query: str) -> str:
    """Search the web."""
    return f"3 articles about {query}."


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "usage.db", pricing=Pricing.from_toml(PRICING))
        meter = Meter(backend)
        # Tool name -> feature; model calls bill their tokens to llm_tokens (the default).
        # Each model call reserves its prompt's tokens plus its max_tokens before it
        # starts (this scripted model sets none: 200 are reserved), and is settled to
        # the tokens it reports when it ends.
        middleware = MeteringMiddleware(
            meter, features={"web_search": "web_search"}, default_max_tokens=200
        )
        agent = create_agent(ScriptedChatModel(), tools=[web_search], middleware=[middleware])

        # A customer on the free plan: 100 credits.
        result = agent.invoke(
            {"messages": [("user", "What is agent billing?")]},
            config={"configurable": {"customer_id": "cus_free"}},
        )
        print("answer:", result["messages"][-1].content)
        left = backend.balances("cus_free")["credits"]
        print(f"cus_free: 100 - 1 (search) - 1.4 (1,400 tokens) = {left}")

        # A customer with 1.5 credits: after the first model call (0.525) less than the
        # 1 credit a search costs is left, but enough for the tokens of the answer.
        backend.set_balance("cus_broke", "credits", 1.5)
        result = agent.invoke(
            {"messages": [("user", "What is agent billing?")]},
            config={"configurable": {"customer_id": "cus_broke"}},
        )
        denial = next(m for m in result["messages"] if isinstance(m, ToolMessage))
        print(f"cus_broke's search: [{denial.status}] {denial.content}")
        print("answer:", result["messages"][-1].content)
        print("cus_broke credits left:", backend.balances("cus_broke")["credits"])
        meter.close()


if __name__ == "__main__":
    main()
