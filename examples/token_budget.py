"""Meter an agent's LLM tokens with a callback handler, and stop it when credit runs out.

What it shows:
- ``meter.callback_handler()`` passed in an agent run's callbacks bills every model call's
  ``total_tokens`` (from ``AIMessage.usage_metadata``) to the ``llm_tokens`` feature, which
  draws 0.001 credit per token from the customer's ``credits``;
- before each model call the handler checks the customer still has credit; when it has
  none the call is refused with ``UsageLimitExceeded`` and the model is never called;
- ``handler.summary`` adds up what the handler saw, per model, over every run.

It runs offline: a scripted chat model stands in for a real one (swap in
``init_chat_model("openai:gpt-4o-mini", stream_usage=True)`` for the real thing) and usage is
kept in a SQLite file in a temporary directory.

Run it with::

    python examples/token_budget.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import tool

from agent_meter import Meter, Pricing, SQLiteBackend, UsageLimitExceeded

PRICING = """
[features]
web_search = "metered"
llm_tokens = "metered"

[credit_systems.credits]
web_search = 1
llm_tokens = 0.001

[plans.agent_free]
auto_enable = true
grants = { credits = 100 }      # cus_small is given less below
"""


class ScriptedChatModel(BaseChatModel):
    """Plays back its replies in turn; each reports its tokens as a real model would."""

    replies: list[AIMessage]
    position: int = 0

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(
        self, messages: list[BaseMessage], stop: Any = None, run_manager: Any = None, **kwargs: Any
    ) -> ChatResult:
        message = self.replies[self.position % len(self.replies)]
        self.position += 1
        metadata = {"model_name": "scripted-gpt"}
        return ChatResult(
            generations=[
                ChatGeneration(message=message.model_copy(update={"response_metadata": metadata}))
            ]
        )

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
def lookup(topic: str) -> str:
    """Look up a topic in the company wiki."""
    return f"The wiki says {topic} ships on Fridays."


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        backend = SQLiteBackend(Path(tmp) / "usage.db", pricing=Pricing.from_toml(PRICING))
        meter = Meter(backend)
        # 2 credits buy 2,000 tokens. The first run uses 1,400 of them; the second is
        # refused before its first model call: 600 tokens are left, and each model call
        # reserves 1,000 (estimate) before it starts, settled to its real usage after.
        backend.set_balance("cus_small", "credits", 2)

        model = ScriptedChatModel(
            replies=[
                AIMessage(
                    "",
                    tool_calls=[{"name": "lookup", "args": {"topic": "billing"}, "id": "c1"}],
                    usage_metadata=usage(600, 40),
                ),
                AIMessage("Billing ships on Fridays.", usage_metadata=usage(700, 60)),
            ]
        )
        agent = create_agent(model, tools=[lookup])
        handler = meter.callback_handler(feature_id="llm_tokens", estimate=1000)
        config: RunnableConfig = {
            "callbacks": [handler],
            "configurable": {"customer_id": "cus_small"},
        }

        answer = agent.invoke({"messages": [("user", "When does billing ship?")]}, config=config)
        print("answer:", answer["messages"][-1].content)
        print("credits left:", backend.balances("cus_small")["credits"])

        try:
            agent.invoke({"messages": [("user", "And search?")]}, config=config)
        except UsageLimitExceeded as denied:
            print("second run refused:", denied.reason)

        print()
        print(handler.summary)
        meter.close()


if __name__ == "__main__":
    main()
