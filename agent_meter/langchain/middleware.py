"""Meter an agent built with ``langchain.agents.create_agent``, as LangChain v1 middleware.

:class:`MeteringMiddleware` guards both kinds of work an agent pays for:

- each **tool call** whose tool has a feature: checked (and, under the default
  ``reserve`` strategy, reserved) before the tool runs, billed only if it succeeds, keyed
  by the model's ``tool_call_id``. A denial does not stop the run: the model receives an
  error ``ToolMessage`` that says why (``"web_search is unavailable: 0 credits left, 1
  needed"``) and can tell the user. An exception, or a ``ToolMessage`` with
  ``status="error"``, is a failure and is not billed;
- each **model call**: its estimate (the prompt's tokens plus the completion limit set in
  ``model_settings`` or on the model) is reserved before it starts and settled to the
  tokens its ``AIMessage.usage_metadata`` reports; a failed call gives it back. A
  customer who cannot pay the estimate is refused before the model is called:
  :class:`~agent_meter.UsageLimitExceeded` ends the run, or with ``on_denied="message"``
  the refusal becomes the model's answer. See :mod:`agent_meter.llm_billing` for
  ``estimate``, ``default_max_tokens``, ``on_denied`` and ``reserve``.

Use it instead of the tool wrapper and the callback handler on the same agent, not with
them: each of the three bills what it sees.

This module imports ``langchain`` (v1); nothing else in agent_meter imports it eagerly.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack, ExitStack
from typing import Any

from agent_meter.extras import require

# langchain-core alone (checked by the package) does not bring the agents package.
require("langchain", "langchain", "langgraph", integration="agent_meter.langchain.middleware")

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain.agents.middleware.types import ExtendedModelResponse
from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.config import get_config
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from agent_meter.context import CustomerRef
from agent_meter.errors import BackendError, UsageLimitExceeded
from agent_meter.estimate import (
    DEFAULT_MAX_TOKENS,
    LIMIT_PARAMS,
    Estimator,
    TokenCounter,
    completion_limit,
)
from agent_meter.integration import (
    call_key,
    check_features,
    default_customer,
    is_error_result,
    langgraph_scope,
    refusal_text,
    resolve_customer,
)
from agent_meter.keys import new_call_id
from agent_meter.langchain.usage import usage_from_message
from agent_meter.llm_billing import LLMBilling, llm_billing, unmetered
from agent_meter.meter import GuardedCall, Meter
from agent_meter.tokens import TokenFeatures, TokenUsage, check_gate_estimate

__all__ = ["MeteringMiddleware"]

ToolResult = ToolMessage | Command[Any]
ModelResult = ModelResponse[Any] | AIMessage | ExtendedModelResponse[Any]


class MeteringMiddleware(AgentMiddleware):
    """Guard an agent's tool calls and meter its model calls, for ``create_agent``.

    Who pays comes from the run's config (``configurable`` or ``metadata``
    ``customer_id``), else from the runtime context (``context={"customer_id": ...}`` or
    an object with a ``customer_id`` attribute), else from ``meter.customer(...)``, else
    from ``customer_id`` (see :func:`agent_meter.integration.resolve_customer`). A tool
    call is keyed as :func:`agent_meter.integration.call_key` says: a retry after a
    failure is billed, a replay of a success is not, an id reused in another turn is a
    new call.

    Args:
        meter: The meter to bill through.
        features: Tool name to the feature a call of it uses (one unit per call). Tools
            not named here run unmetered.
        token_feature_id: The feature that receives a model call's ``total_tokens``;
            None to leave model calls unmetered.
        input_feature_id: The feature for input tokens, to split the bill (set with
            ``output_feature_id``).
        output_feature_id: The feature for output tokens.
        estimate: How a model call is estimated before it runs: None (count the prompt,
            add the completion limit), your tokenizer (a function of a text), or a
            number of tokens per call.
        default_max_tokens: Output tokens reserved for a call that sets no limit.
        on_denied: ``"raise"`` (``UsageLimitExceeded`` ends the run) or ``"message"``
            (the refusal is returned as the model's answer, and the run ends there).
        reserve: True reserves the estimate until the call ends; False only checks
            that the balance covers it.
        gate_estimate: The older name of a fixed ``estimate``.
        customer_id: Who pays when the run names nobody.
        entity_id: The entity of ``customer_id``.

    Raises:
        ConfigError: A feature the meter's pricing does not declare.

    Example:
        >>> agent = create_agent(model, tools=[search],
        ...     middleware=[MeteringMiddleware(meter, features={"search": "web_search"})])
        >>> agent.invoke(inputs, config={"configurable": {"customer_id": "cus_1"}})
    """

    def __init__(
        self,
        meter: Meter,
        features: Mapping[str, str] | None = None,
        token_feature_id: str | None = "llm_tokens",  # noqa: S107 - a feature id
        *,
        input_feature_id: str | None = None,
        output_feature_id: str | None = None,
        estimate: Estimator | TokenCounter | float | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        on_denied: str = "raise",
        reserve: bool = True,
        gate_estimate: float | None = None,
        customer_id: str | None = None,
        entity_id: str | None = None,
    ) -> None:
        super().__init__()
        self.meter = meter
        self.features = dict(features or {})
        check_features(meter, self.features)  # a typo fails here, not on the first tool call
        self.customer = default_customer(customer_id, entity_id)
        self.tokens: TokenFeatures | None = None
        self.billing: LLMBilling | None = None
        if gate_estimate is not None:
            estimate = check_gate_estimate(gate_estimate)
        if token_feature_id is not None or input_feature_id is not None:
            self.tokens = TokenFeatures(token_feature_id, input_feature_id, output_feature_id)
            self.billing = llm_billing(
                meter,
                self.tokens,
                estimate=estimate,
                default_max_tokens=default_max_tokens,
                reserve=reserve,
                on_denied=on_denied,
            )

    def __repr__(self) -> str:
        return f"MeteringMiddleware(features={self.features!r}, tokens={self.tokens!r})"

    # -- who pays ------------------------------------------------------------------------

    def _customer(self, config: Mapping[str, Any] | None, context: object) -> CustomerRef:
        return resolve_customer(config, context=context, default=self.customer)

    @staticmethod
    def _run_config() -> Mapping[str, Any] | None:
        try:
            return get_config()
        except RuntimeError:  # called outside a runnable (a unit test of the middleware)
            return None

    # -- tool calls ----------------------------------------------------------------------

    def _tool_guard(self, request: ToolCallRequest) -> tuple[str, CustomerRef, str] | None:
        feature = self.features.get(request.tool_call["name"])
        if feature is None:
            return None
        runtime = request.runtime
        config = getattr(runtime, "config", None) or self._run_config()
        customer = self._customer(config, getattr(runtime, "context", None))
        key = call_key(
            request.tool_call["id"] or None,
            request.tool_call["args"],
            scope=langgraph_scope(config),
        )
        return feature, customer, key

    @staticmethod
    def _refusal(
        request: ToolCallRequest, feature: str, exc: UsageLimitExceeded | BackendError
    ) -> ToolMessage:
        return ToolMessage(
            content=refusal_text(exc, feature),
            tool_call_id=request.tool_call["id"] or "",
            name=request.tool_call["name"],
            status="error",
        )

    @staticmethod
    def _judge(call: GuardedCall, result: ToolResult) -> None:
        if is_error_result(result):
            call.fail("the tool reported an error")

    def wrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], ToolResult],
    ) -> ToolResult:
        """Check, run the tool, bill it only if it succeeded; a denial is an error result."""
        guarded = self._tool_guard(request)
        if guarded is None:
            return handler(request)
        feature, customer, key = guarded
        with ExitStack() as stack:
            try:
                call = stack.enter_context(
                    self.meter.guard(
                        customer.customer_id, feature, call_id=key, entity_id=customer.entity_id
                    )
                )
            except (UsageLimitExceeded, BackendError) as exc:
                return self._refusal(request, feature, exc)
            result = handler(request)
            self._judge(call, result)
            return result
        raise AssertionError  # pragma: no cover - ExitStack does not swallow exceptions

    async def awrap_tool_call(
        self,
        request: ToolCallRequest,
        handler: Callable[[ToolCallRequest], Awaitable[ToolResult]],
    ) -> ToolResult:
        """Async :meth:`wrap_tool_call`."""
        guarded = self._tool_guard(request)
        if guarded is None:
            return await handler(request)
        feature, customer, key = guarded
        async with AsyncExitStack() as stack:
            try:
                call = await stack.enter_async_context(
                    self.meter.aguard(
                        customer.customer_id, feature, call_id=key, entity_id=customer.entity_id
                    )
                )
            except (UsageLimitExceeded, BackendError) as exc:
                return self._refusal(request, feature, exc)
            result = await handler(request)
            self._judge(call, result)
            return result
        raise AssertionError  # pragma: no cover - AsyncExitStack does not swallow exceptions

    # -- model calls ---------------------------------------------------------------------

    def _model_customer(self, request: ModelRequest[Any]) -> CustomerRef:
        return self._customer(self._run_config(), getattr(request.runtime, "context", None))

    @staticmethod
    def _reply(result: ModelResult) -> AIMessage | None:
        if isinstance(result, ExtendedModelResponse):
            result = result.model_response
        messages = [result] if isinstance(result, AIMessage) else result.result
        return next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)

    def _usage(
        self, request: ModelRequest[Any], result: ModelResult
    ) -> tuple[TokenUsage | None, str]:
        """The tokens the reply reports, and why it is not metered when it reports none."""
        reply = self._reply(result)
        model = getattr(request.model, "model_name", None) or getattr(request.model, "model", None)
        name = model if isinstance(model, str) else None
        usage = None if reply is None else usage_from_message(reply, name)
        return usage, unmetered(name or type(request.model).__name__)

    @staticmethod
    def _prompt(request: ModelRequest[Any]) -> object:
        tools = []
        for tool in request.tools:
            try:
                tools.append(convert_to_openai_tool(tool))
            except (TypeError, ValueError):  # a provider's built-in tool: counted by name
                tools.append({"description": str(getattr(tool, "name", ""))})
        return (request.system_message, request.messages, tools)

    @staticmethod
    def _limit(request: ModelRequest[Any]) -> int | None:
        model = request.model
        bound = getattr(model, "kwargs", None)  # a model.bind(max_tokens=...)
        own = {name: getattr(model, name, None) for name in LIMIT_PARAMS}
        return completion_limit(
            request.model_settings, bound if isinstance(bound, Mapping) else None, own
        )

    def _refused(self, exc: UsageLimitExceeded) -> AIMessage:
        assert self.billing is not None  # noqa: S101 - only called with billing
        if self.billing.on_denied != "message":
            raise exc
        feature = exc.feature_id or "the model"
        return AIMessage(
            content=refusal_text(exc, feature), response_metadata={"agent_meter": "refused"}
        )

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResult:
        """Reserve the call's estimate, call the model, settle to the tokens it reports.

        Raises:
            UsageLimitExceeded: The customer cannot pay the call's estimate (with
                ``on_denied="raise"``); the model was not called.
        """
        if self.billing is None:
            return handler(request)
        customer = self._model_customer(request)
        try:
            call = self.billing.begin(
                customer, self._prompt(request), self._limit(request), call_id=new_call_id()
            )
        except UsageLimitExceeded as exc:
            return self._refused(exc)
        try:
            result = handler(request)
        except BaseException as exc:
            call.release(f"the call failed: {type(exc).__name__}")
            raise
        call.settle(*self._usage(request, result))
        return result

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResult:
        """Async :meth:`wrap_model_call`."""
        if self.billing is None:
            return await handler(request)
        customer = self._model_customer(request)
        try:
            call = await self.billing.abegin(
                customer, self._prompt(request), self._limit(request), call_id=new_call_id()
            )
        except UsageLimitExceeded as exc:
            return self._refused(exc)
        try:
            result = await handler(request)
        except BaseException as exc:
            await call.arelease(f"the call failed: {type(exc).__name__}")
            raise
        await call.asettle(*self._usage(request, result))
        return result
