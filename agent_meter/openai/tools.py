"""Run the tool calls of a chat completion through the meter's guard.

A plain OpenAI agent loop asks the model, runs the ``tool_calls`` of its reply, and sends
one ``{"role": "tool"}`` message back per call. :func:`run_tool_calls` (and its async twin
:func:`arun_tool_calls`) does the middle step with check → work → track around every call:

- arguments that are not a JSON object, and a function nobody registered, are answered
  before the guard: nothing is checked, nothing billed;
- a denial (no credit) and a billing service that cannot answer are answered with the
  refusal text every adapter uses (:func:`agent_meter.integration.refusal_text`: no
  customer id, no internal cause), so the model can tell the user; nothing is billed;
- a function that raises is answered with the error and its reservation refunded;
- a function that returns is billed; its tracks are keyed by the ``tool_call.id``, scoped
  by ``scope`` (the response id, when the caller passes the completion) and a digest of
  the arguments (:func:`agent_meter.integration.call_key`): running the same message
  again is a replay, a retry after a failure is billed, and ``call_0`` of another turn is
  another call.

Every outcome is a tool message, in the order of the calls, so the conversation always
stays valid for the next request.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from openai.types.chat import ChatCompletionToolMessageParam

from agent_meter.context import CustomerRef
from agent_meter.errors import BackendError, ConfigError, UsageLimitExceeded
from agent_meter.integration import (
    call_key,
    check_features,
    default_customer,
    refusal_text,
    resolve_customer,
)
from agent_meter.meter import GuardedCall, Meter
from agent_meter.openai.usage import field

__all__ = ["arun_tool_calls", "run_tool_calls"]

ToolFunction = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class _Answer:
    """A call answered before the guard (unknown function, malformed arguments)."""

    call_id: str
    content: str


@dataclass(frozen=True, slots=True)
class _Invocation:
    """A call to run under the guard."""

    call_id: str
    name: str
    feature_id: str
    function: ToolFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    key: str


def _customer(customer_id: str | None, entity_id: str | None) -> CustomerRef:
    """Who pays: a bound customer or LangChain run first, else ``customer_id``."""
    from langchain_core.runnables.config import var_child_runnable_config  # noqa: PLC0415

    return resolve_customer(
        var_child_runnable_config.get(), default=default_customer(customer_id, entity_id)
    )


def _check_wiring(functions: Mapping[str, ToolFunction], features: Mapping[str, str]) -> None:
    unpriced = sorted(set(functions) - set(features))
    if unpriced:
        # A function without a feature would run for free: refuse the wiring, not the call.
        msg = f"no feature for function(s) {', '.join(unpriced)}: add them to features={{...}}"
        raise ConfigError(msg)


def _plan(
    tool_call: object,
    functions: Mapping[str, ToolFunction],
    features: Mapping[str, str],
    scope: str | None,
) -> _Answer | _Invocation:
    """Decide, without running anything, what one tool call becomes."""
    call_id = field(tool_call, "id")
    if not isinstance(call_id, str) or not call_id:
        msg = f"tool call without an id: {tool_call!r}"
        raise ValueError(msg)
    kind = field(tool_call, "type") or "function"
    if kind == "custom":
        # Custom tools take free text, passed to the function as its one argument.
        custom = field(tool_call, "custom")
        name, raw = field(custom, "name"), field(custom, "input")
    else:
        function = field(tool_call, "function")
        name, raw = field(function, "name"), field(function, "arguments")
    if kind not in ("function", "custom") or name not in functions:
        known = ", ".join(sorted(functions)) or "none"
        return _Answer(call_id, f"Error: unknown function {name!r}. Available functions: {known}.")
    if kind == "custom":
        key = call_key(call_id, raw or "", scope=scope)
        return _Invocation(call_id, name, features[name], functions[name], (raw or "",), {}, key)
    try:
        arguments = json.loads(raw or "{}")
    except (TypeError, ValueError) as exc:
        return _Answer(
            call_id,
            f"Error: the arguments of {name} are not valid JSON ({exc}). "
            "Call it again with a JSON object of arguments.",
        )
    if not isinstance(arguments, dict):
        return _Answer(
            call_id,
            f"Error: the arguments of {name} must be a JSON object, "
            f"not {type(arguments).__name__}. Call it again with an object.",
        )
    key = call_key(call_id, arguments, scope=scope)
    return _Invocation(call_id, name, features[name], functions[name], (), arguments, key)


def _plans(
    message: object,
    functions: Mapping[str, ToolFunction],
    features: Mapping[str, str],
    scope: str | None,
) -> list[_Answer | _Invocation]:
    _check_wiring(functions, features)
    choices = field(message, "choices")
    if choices:  # a whole completion: its first choice's message, scoped by its id
        completion_id = field(message, "id")
        if scope is None and isinstance(completion_id, str):
            scope = completion_id
        message = field(choices[0], "message")
    return [
        _plan(tool_call, functions, features, scope)
        for tool_call in field(message, "tool_calls") or ()
    ]


def _content(result: object) -> str:
    """A function's result as the text of a tool message."""
    if isinstance(result, str):
        return result
    dump = getattr(result, "model_dump", None)
    if callable(dump):  # a pydantic model: its JSON form, not its repr
        result = dump(mode="json")
    return json.dumps(result, default=str)


def _failure(name: str, exc: Exception) -> str:
    return f"Error: {name} failed: {type(exc).__name__}: {exc}"


def _refusal(exc: UsageLimitExceeded | BackendError, feature_id: str) -> str:
    return f"Error: {refusal_text(exc, feature_id)}"


def _message(call_id: str, content: str) -> ChatCompletionToolMessageParam:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _run(
    meter: Meter, invocation: _Invocation, customer: CustomerRef
) -> ChatCompletionToolMessageParam:
    try:
        with meter.guard(
            customer.customer_id,
            invocation.feature_id,
            call_id=invocation.key,
            entity_id=customer.entity_id,
        ) as call:
            content = _invoke(invocation, call)
    except (UsageLimitExceeded, BackendError) as exc:
        content = _refusal(exc, invocation.feature_id)
    return _message(invocation.call_id, content)


def _invoke(invocation: _Invocation, call: GuardedCall) -> str:
    try:
        result = invocation.function(*invocation.args, **invocation.kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure of the tool is told to the model
        call.fail(f"{type(exc).__name__}: {exc}")
        return _failure(invocation.name, exc)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never started: closing it keeps "never awaited" warnings away
        call.fail("async function in run_tool_calls")
        return f"Error: {invocation.name} is async and cannot run here (use arun_tool_calls)."
    return _content(result)


async def _arun(
    meter: Meter, invocation: _Invocation, customer: CustomerRef
) -> ChatCompletionToolMessageParam:
    try:
        async with meter.aguard(
            customer.customer_id,
            invocation.feature_id,
            call_id=invocation.key,
            entity_id=customer.entity_id,
        ) as call:
            content = await _ainvoke(invocation, call)
    except (UsageLimitExceeded, BackendError) as exc:
        content = _refusal(exc, invocation.feature_id)
    return _message(invocation.call_id, content)


async def _ainvoke(invocation: _Invocation, call: GuardedCall) -> str:
    try:
        function = invocation.function
        if inspect.iscoroutinefunction(function):
            result = await function(*invocation.args, **invocation.kwargs)
        else:
            # A blocking tool (an HTTP client, a subprocess) must not stall the other calls.
            result = await asyncio.to_thread(function, *invocation.args, **invocation.kwargs)
            if inspect.isawaitable(result):
                result = await result
        return _content(result)
    except Exception as exc:  # noqa: BLE001 - any failure of the tool is told to the model
        call.fail(f"{type(exc).__name__}: {exc}")
        return _failure(invocation.name, exc)


def run_tool_calls(
    meter: Meter,
    message: object,
    functions: Mapping[str, ToolFunction],
    features: Mapping[str, str],
    *,
    customer_id: str | None = None,
    entity_id: str | None = None,
    scope: str | None = None,
) -> list[ChatCompletionToolMessageParam]:
    """Run every tool call of an assistant message under the guard, one after another.

    Args:
        meter: The meter that checks and bills.
        message: The assistant message (``completion.choices[0].message``), as a
            ``ChatCompletionMessage`` or its dict form; or the whole completion, whose id
            then scopes the call keys.
        functions: Function name (as the model calls it) to the Python callable; its
            keyword arguments are the JSON object the model sent. A custom tool's function
            receives the model's text as its one argument.
        features: Function name to the feature billed per call (1 unit); every function
            needs one.
        customer_id: Who pays (from trusted server-side context, never the model); None:
            the customer of the enclosing ``meter.customer(...)`` block (or LangChain run).
            A bound customer comes first, this one is the default (see
            :func:`agent_meter.integration.resolve_customer`).
        entity_id: Sub-scope of the customer.
        scope: What makes these calls' ids unique, when the server reuses them (the
            response id, a conversation turn); taken from the completion when it is
            passed whole.

    Returns:
        One ``{"role": "tool", "tool_call_id", "content"}`` message per call, in the order
        of the calls. Results that are not strings are JSON-encoded; an unknown function,
        malformed arguments, an exception and a denial become a message that starts with
        ``"Error: "`` and says what went wrong; none of them is billed.

    Raises:
        ConfigError: A function in ``functions`` has no feature.

    Example:
        >>> reply = client.chat.completions.create(model=..., messages=messages, tools=tools)
        >>> message = reply.choices[0].message
        >>> messages += [message, *run_tool_calls(meter, message, {"search": search},
        ...                                       {"search": "web_search"}, customer_id="cus_1")]
    """
    check_features(meter, features)
    customer = _customer(customer_id, entity_id)
    messages: list[ChatCompletionToolMessageParam] = []
    for plan in _plans(message, functions, features, scope):
        if isinstance(plan, _Answer):
            messages.append(_message(plan.call_id, plan.content))
        else:
            messages.append(_run(meter, plan, customer))
    return messages


async def arun_tool_calls(
    meter: Meter,
    message: object,
    functions: Mapping[str, ToolFunction],
    features: Mapping[str, str],
    *,
    customer_id: str | None = None,
    entity_id: str | None = None,
    scope: str | None = None,
) -> list[ChatCompletionToolMessageParam]:
    """Async :func:`run_tool_calls`: parallel calls run concurrently, answers in call order.

    Coroutine functions are awaited; plain functions run in a worker thread so that a
    blocking tool does not hold up the others.
    """
    check_features(meter, features)
    customer = _customer(customer_id, entity_id)

    async def answer(plan: _Answer | _Invocation) -> ChatCompletionToolMessageParam:
        if isinstance(plan, _Answer):
            return _message(plan.call_id, plan.content)
        return await _arun(meter, plan, customer)

    plans = _plans(message, functions, features, scope)
    return list(await asyncio.gather(*(answer(plan) for plan in plans)))
