"""Shared pieces of the LangChain tool wrapper tests: pricing, ledgers, tools, a scripted model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from pydantic import PrivateAttr

from agent_meter import Pricing
from tests.conftest import PRICING_TOML

CUSTOMER = "cus_1"
CONFIG: RunnableConfig = {"configurable": {"customer_id": CUSTOMER}}


def example_pricing() -> Pricing:
    """DESIGN.md §7: a credits pool, web_search=1, code_exec=2, llm_tokens=0.001, premium."""
    return Pricing.from_toml(PRICING_TOML)


def tool_call(name: str, args: dict[str, Any], call_id: str) -> dict[str, Any]:
    """A tool call as a chat model writes it."""
    return {"type": "tool_call", "name": name, "args": args, "id": call_id}


class ToolEvents(BaseCallbackHandler):
    """Records tool callbacks: ("start" | "end" | "error", tool name or output)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, **kwargs: Any) -> None:
        self.events.append(("start", serialized["name"]))

    def on_tool_end(self, output: Any, **kwargs: Any) -> None:
        self.events.append(("end", output))

    def on_tool_error(self, error: BaseException, **kwargs: Any) -> None:
        self.events.append(("error", type(error).__name__))


class ScriptedChatModel(BaseChatModel):
    """A chat model that answers from a script, one message per call; no network.

    ``bind_tools`` returns the model itself, so it works with ``create_agent``.
    """

    script: list[AIMessage]
    _seen: list[list[BaseMessage]] = PrivateAttr(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted"

    @property
    def seen(self) -> list[list[BaseMessage]]:
        """The messages each call received."""
        return self._seen

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: Any = None,
        **kwargs: Any,
    ) -> ChatResult:
        self._seen.append(list(messages))
        message = self.script[len(self._seen) - 1]
        return ChatResult(generations=[ChatGeneration(message=message)])

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChatModel:
        return self
